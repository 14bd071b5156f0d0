"""Fit the ``sim`` engine's timing model (``engine.sim.SimProfile``) to a real engine.

Times the model runner's ``execute`` (the part the sim replaces) on prefill steps over a grid
of (new tokens, cached tokens) and on decode steps over a grid of (batch size, KV length),
fits the step-time coefficients by non-negative least squares and writes the profile:

    python bench/fit_sim.py --name cpu-smollm2-135m                       # the default model on CPU
    python bench/fit_sim.py --name h100-llama-3.1-8b --model dummy:llama-3.1-8b --device cuda --out DIR

Prints every sample with its prediction, R^2 and the median and worst relative errors.
"""

from __future__ import annotations

import argparse
import datetime
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench import plots
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.llm_engine import LLMEngine, default_num_threads
from engine.sim import COEFFICIENTS, PROFILE_DIR, SimProfile
from protocol.sampling import SamplingParams


class StepTimer:
    """Wraps the runner's ``launch`` (waiting for each step: the engine runs synchronously
    here): records (prefills, decodes, seconds) per step."""

    def __init__(self, engine: LLMEngine) -> None:
        self.samples: list[tuple[list[tuple[int, int]], list[int], float]] = []
        self.recording = False
        self._launch = engine.runner.launch
        self.cuda = engine.config.device.startswith("cuda")
        engine.runner.launch = self._timed

    def _timed(self, output, tables, prev=None):
        prefills, decodes = [], []
        for s in output.scheduled:
            c = s.request.num_computed_tokens
            if s.num_new_tokens == 1 and c > 0:
                decodes.append(c + 1)
            else:
                prefills.append((s.num_new_tokens, c))
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        handle = self._launch(output, tables, prev)
        if handle is not None:
            handle.result()  # the tokens on the host, as the engine would wait for them
        if self.cuda:
            torch.cuda.synchronize()
        if self.recording and output.scheduled:
            self.samples.append((prefills, decodes, time.perf_counter() - t0))
        return handle


def features(prefills: list[tuple[int, int]], decodes: list[int]) -> list[float]:
    return [1.0, float(bool(prefills)), float(sum(n for n, _ in prefills)),
            float(sum(n * (c + n / 2) for n, c in prefills)), float(len(decodes)), float(sum(decodes))]


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0 (active set: drop negatives, refit)."""
    free = list(range(a.shape[1]))
    while True:
        x = np.zeros(a.shape[1])
        sol, *_ = np.linalg.lstsq(a[:, free], b, rcond=None)
        x[free] = sol
        negative = [i for i in free if x[i] < 0]
        if not negative:
            return x
        free.remove(min(negative, key=lambda i: x[i]))


Sample = tuple[list[tuple[int, int]], list[int], float]  # prefills (new, cached), decode KV lengths, seconds


def fit_samples(samples: list[Sample], figure: Path | None = None) -> tuple[np.ndarray, dict]:
    """NNLS fit of the step-time coefficients; prints every sample beside its prediction and,
    given ``figure``, plots them there (measured against modelled, prefill and decode apart).

    The prefill term is a hinge, max(prefill_min_s, linear): each prefill sample is assigned to
    the floor or the linear regime by the current fit, and the fit is repeated until the
    assignment is stable."""
    x = np.array([features(pf, dc) for pf, dc, _ in samples])
    y = np.array([t for _, _, t in samples])
    is_prefill = x[:, 1] > 0
    # Relative errors matter (a 5 ms step and a 1 s step alike): weight rows by 1 / time, and
    # give prefill steps (what TTFT is made of) as much weight in all as decode steps.
    w = 1.0 / np.maximum(y, 1e-6)
    n_prefill, n_decode = int(is_prefill.sum()), int((~is_prefill).sum())
    if n_prefill and n_decode:
        w[is_prefill] *= n_decode / n_prefill
    floor = is_prefill & (x[:, 2] <= np.median(x[is_prefill, 2])) if n_prefill else is_prefill
    for _ in range(50):
        a = x.copy()
        a[floor, 2:4] = 0.0  # floor regime: prefill_min_s only
        a[is_prefill & ~floor, 1] = 0.0  # linear regime: no floor
        coef = nnls(a * w[:, None], y * w)
        linear = x[:, 2:4] @ coef[2:4]
        new_floor = is_prefill & (linear < coef[1])
        if (new_floor == floor).all():
            break
        floor = new_floor
    x = a
    pred = x @ coef
    rel = np.abs(pred - y) / y
    r2 = 1.0 - float(np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2))
    print(f"{'prefill (new, cached)':>24}{'decodes (n, kv)':>18}{'measured ms':>13}{'model ms':>10}")
    for (pf, dc, t), pr in zip(samples, pred):
        pf_s = ",".join(f"({n},{c})" for n, c in pf) or "-"
        dc_s = f"({len(dc)},{round(sum(dc) / len(dc))})" if dc else "-"
        print(f"{pf_s:>24}{dc_s:>18}{t * 1000:>13.2f}{pr * 1000:>10.2f}")
    if figure is not None:
        print(f"figure: {plots.fit_scatter(y, pred, is_prefill, f'R^2 {r2:.3f}', figure)}")
    fit = {"num_samples": len(y), "r2": round(r2, 4), "median_rel_error": round(float(np.median(rel)), 4),
           "p90_rel_error": round(float(np.percentile(rel, 90)), 4), "max_rel_error": round(float(rel.max()), 4),
           "prefill_median_rel_error": round(float(np.median(rel[is_prefill])), 4) if n_prefill else None,
           # the samples themselves: ``--refit`` fits them again
           "samples": [[[list(c) for c in pf], [len(dc), sum(dc)], round(t, 6)] for pf, dc, t in samples]}
    return coef, fit


def run(engine: LLMEngine, timer: StepTimer, prompts: list[list[int]], max_tokens: int, record: str | None) -> None:
    """Run ``prompts`` together to completion, recording steps of kind ``record`` (prefill, decode
    or None: nothing)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for p in prompts:
        engine.add_request(f"r{random.getrandbits(48)}", p, params)
    while engine.has_unfinished():
        timer.recording = record is not None
        before = len(timer.samples)
        engine.step()
        if len(timer.samples) > before:
            prefills, decodes, _ = timer.samples[-1]
            if (record == "prefill" and (decodes or len(prefills) != 1)) or (record == "decode" and prefills):
                timer.samples.pop()
    timer.recording = False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="profile name (the file is NAME.json)")
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: all)")
    p.add_argument("--new", default="16,64,256,512,1024,2048", help="prefill grid: new tokens")
    p.add_argument("--cached", default="0,512,1024", help="prefill grid: cached tokens")
    p.add_argument("--batch", default="1,4,16,32", help="decode grid: batch sizes")
    p.add_argument("--kv", default="128,512,1024,2048", help="decode grid: KV length per sequence")
    p.add_argument("--kv-cache-gib", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup-passes", type=int, default=0,
                   help="run the grid this many times unrecorded first (JIT compilation, allocator growth)")
    p.add_argument("--decode-steps", type=int, default=6)
    p.add_argument("--out", default=str(PROFILE_DIR), help="directory to write NAME.json in")
    p.add_argument("--figure-dir", default=str(Path(__file__).parent / "results"),
                   help="where fit_sim_NAME.png goes (measured against modelled step times)")
    p.add_argument("--refit", default=None, metavar="PROFILE",
                   help="fit the samples stored in an existing profile again (nothing is run)")
    args = p.parse_args(argv)
    if args.refit:
        old = SimProfile.load(args.refit)
        samples = [([tuple(c) for c in pf], [sum_kv // n] * n if n else [], t)
                   for pf, (n, sum_kv), t in old.fit["samples"]]
        coef, fit = fit_samples(samples, Path(args.figure_dir) / f"fit_sim_{args.name}.png")
        return save(SimProfile(args.name, *(float(c) for c in coef), fitted_on=old.fitted_on, fit=fit), args.out)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731

    new_grid, cached_grid, batch_grid, kv_grid = ints(args.new), ints(args.cached), ints(args.batch), ints(args.kv)
    longest = max(max(new_grid) + max(cached_grid), max(kv_grid)) + args.decode_steps + 16
    threads = args.threads or (default_num_threads() if args.device == "cpu" else None)
    config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device, num_threads=threads,
                          max_model_len=longest + 64, async_scheduling=False,
                          cache=CacheConfig(memory_bytes=int(args.kv_cache_gib * (1 << 30))),
                          scheduler=SchedulerConfig(max_num_seqs=max(batch_grid),
                                                    max_num_batched_tokens=max(max(new_grid), max(batch_grid))))
    engine = LLMEngine(config, progress=False)
    timer = StepTimer(engine)
    vocab = engine.arch.vocab_size
    rng = random.Random(0)
    ids = lambda n: [rng.randrange(100, min(vocab, 30000)) for _ in range(n)]  # noqa: E731

    print("warm-up", file=sys.stderr, flush=True)
    run(engine, timer, [ids(256)], 4, None)
    bs = config.cache.block_size
    for rep in range(args.warmup_passes + args.repeats):
        if rep == args.warmup_passes:
            timer.samples.clear()
        for cached in cached_grid:
            for new in new_grid:
                prefix = ids(cached)
                if cached:  # cache the prefix's blocks first
                    run(engine, timer, [[*prefix, *ids(1)]], 1, None)
                n_before = len(timer.samples)
                run(engine, timer, [[*prefix, *ids(new)]], 1, "prefill")
                got = timer.samples[n_before:]
                if got and got[0][0][0][1] != cached - cached % bs:
                    print(f"  (cached {cached}: the engine reused {got[0][0][0][1]})", file=sys.stderr)
        for batch in batch_grid:
            for kv in kv_grid:
                run(engine, timer, [ids(kv) for _ in range(batch)], args.decode_steps, "decode")
        print(f"{len(timer.samples)} samples", file=sys.stderr, flush=True)

    samples = timer.samples
    coef, fit = fit_samples(samples, Path(args.figure_dir) / f"fit_sim_{args.name}.png")
    fitted_on = {"model": args.model, "device": torch.cuda.get_device_name() if args.device.startswith("cuda")
                 else f"cpu ({threads} threads)", "dtype": args.dtype, "torch": torch.__version__,
                 "date": datetime.date.today().isoformat(), "grid": {"new": new_grid, "cached": cached_grid,
                                                                     "batch": batch_grid, "kv": kv_grid}}
    return save(SimProfile(args.name, *(float(c) for c in coef), fitted_on=fitted_on, fit=fit), args.out)


def save(profile: SimProfile, out_dir: str) -> int:
    profile = replace(profile, **{k: float(f"{getattr(profile, k):.4g}") for k in COEFFICIENTS})
    out = Path(out_dir) / f"{profile.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    profile.save(out)
    fit = {k: v for k, v in profile.fit.items() if k != "samples"}
    print("\n" + "  ".join(f"{k}={getattr(profile, k):.3g}" for k in COEFFICIENTS))
    print(f"fit: {fit}\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
