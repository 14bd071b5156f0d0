"""Engine speed on the CPU: tandem against Hugging Face transformers, the same workloads in one
process, the same thread count.

Workloads (SmolLM2-135M-Instruct from the GGUF, in bfloat16 and float32):

- ``prefill N``: one prompt of ``--prefill-len`` tokens (1024) to its first token. tandem:
  ``generate(max_tokens=1)``; transformers: one forward with ``logits_to_keep=1`` (no logits for
  the other positions, as tandem computes none) and a KV cache, as tandem writes one. tandem's
  prefix cache is reset before every run, and its blocks are handed out again: after the warm-up
  the prompt's K/V goes to pages already mapped, as on a server past its first pass over the cache.
- ``generate batch B``: prompts of ``--prompt-len`` tokens (200), ``--new-tokens`` (128) each,
  ignore_eos. Batch 1 runs ``--batch1-prompts`` prompts one after another, batch 8 and 32 run
  that many distinct prompts together. tandem's prefix cache is reset before every run.

Fair to both sides: every workload runs once untimed on each side (the same shapes warm both),
then ``--repeats`` timed runs alternate tandem, transformers, tandem, ... The table gives each
side's best run (the one least slowed by other work on a shared machine), the ratio
tandem/transformers and tandem's median run; the JSON keeps every run, the medians and the load
average.

    python bench/engine.py                                   # everything
    python bench/engine.py --dtypes bfloat16 --batches 1 --repeats 5
    python bench/engine.py --only-prefill --dtypes bfloat16  # the prefill row alone

Writes ``bench/results/engine_<time>.json`` and ``.png`` (``--out DIR`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from engine.llm import LLM
from engine.loader import TORCH_DTYPES, default_model_path
from protocol.sampling import SamplingParams


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 40000, (length,), generator=g).tolist() for _ in range(n)]


def generate_tandem(llm: LLM, prompts: list[list[int]], batch: int, new_tokens: int) -> int:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.engine.reset_prefix_cache()
    n = 0
    for i in range(0, len(prompts), batch):
        for r in llm.generate(prompts[i:i + batch], params):
            n += len(r.outputs[0].token_ids)
    return n


def generate_hf(model: torch.nn.Module, prompts: list[list[int]], batch: int, new_tokens: int) -> int:
    n = 0
    for i in range(0, len(prompts), batch):
        ids = torch.tensor(prompts[i:i + batch])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        n += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return n


def prefill_tandem(llm: LLM, prompt: list[int]) -> int:
    llm.engine.reset_prefix_cache()
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1))
    return len(prompt)


def prefill_hf(model: torch.nn.Module, prompt: list[int]) -> int:
    with torch.inference_mode():
        model(torch.tensor([prompt]), logits_to_keep=1, use_cache=True)
    return len(prompt)


def timed(fn: Callable[[], int]) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t0


def measure(name: str, ours: Callable[[], int], ref: Callable[[], int] | None, repeats: int) -> dict:
    """One untimed run of each side, then ``repeats`` timed runs, alternating."""
    ours()
    if ref is not None:
        ref()
    runs: dict[str, list[float]] = {"tandem": [], "transformers": []}
    tokens = 0
    for rep in range(repeats):
        for side, fn in (("tandem", ours), ("transformers", ref)):
            if fn is None:
                continue
            tokens, dt = timed(fn)
            runs[side].append(dt)
            log(f"    {name} run {rep + 1}/{repeats}: {side} {dt:.3f} s")
    row = {"workload": name, "tokens": tokens, "runs_s": runs}
    for side, times in runs.items():
        if times:
            row[side] = {"best_s": min(times), "median_s": statistics.median(times),
                         "best_tok_s": tokens / min(times), "median_tok_s": tokens / statistics.median(times)}
    if runs["transformers"]:
        row["speedup"] = row["transformers"]["best_s"] / row["tandem"]["best_s"]
    return row


def load_hf(dtype: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=TORCH_DTYPES[dtype]).eval()


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Bars of tandem/transformers (best runs), labelled with both sides' tokens/s; tandem's
    tokens/s alone (log scale) without transformers."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(rows)), 4.5))
    labels = [f"{r['dtype']}\n{r['workload']}" for r in rows]
    x = list(range(len(rows)))
    if all("speedup" in r for r in rows):
        ax.bar(x, [r["speedup"] for r in rows], color="tab:blue")
        ax.axhline(1.0, color="gray", lw=0.8)
        for i, r in enumerate(rows):
            ax.annotate(f"{r['speedup']:.2f}x\n{r['tandem']['best_tok_s']:.0f} vs\n"
                        f"{r['transformers']['best_tok_s']:.0f} tok/s", (i, r["speedup"]), ha="center", va="bottom",
                        fontsize=7)
        ax.set_ylabel("tandem / transformers (best runs)")
        ax.set_ylim(0, 1.3 * max(r["speedup"] for r in rows))
    else:
        ax.bar(x, [r["tandem"]["best_tok_s"] for r in rows])
        ax.set_yscale("log")
        ax.set_ylabel("tandem tokens/s (best run; prefill: prompt tokens/s)")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def kernels_isa() -> str:
    """The CPU kernels' ISA tier, "none" where they are off (or, run on an older tree, absent)."""
    try:
        from engine import cpu_kernels
    except ImportError:
        return "none"
    return cpu_kernels.isa() if cpu_kernels.load() is not None else "none"


def bench_dtype(dtype: str, args: argparse.Namespace, threads: int, batches: list[int]) -> list[dict]:
    log(f"[{dtype}] loading tandem{'' if args.skip_hf else ' and transformers (its GGUF loader)'}...")
    llm = LLM("default", dtype=dtype, progress=False, kv_cache_bytes=1 << 30, num_threads=threads)
    hf = None if args.skip_hf else load_hf(dtype)
    on_kernels = getattr(llm.engine.runner.model, "lm_head_cpu", None) is not None
    prompt = make_prompts(1, args.prefill_len, seed=7)[0]
    rows = [measure(f"prefill {args.prefill_len}", lambda: prefill_tandem(llm, prompt),
                    None if hf is None else (lambda: prefill_hf(hf, prompt)), args.repeats)]
    for batch in batches:
        prompts = make_prompts(args.batch1_prompts if batch == 1 else batch, args.prompt_len, seed=batch)
        rows.append(measure(f"generate batch {batch}",
                            lambda p=prompts, b=batch: generate_tandem(llm, p, b, args.new_tokens),
                            None if hf is None else (lambda p=prompts, b=batch: generate_hf(hf, p, b, args.new_tokens)),
                            args.repeats))
    return [{"dtype": dtype, "cpu_kernels": on_kernels, **r} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch1-prompts", type=int, default=8, help="prompts run one by one at batch 1")
    ap.add_argument("--prefill-len", type=int, default=1024)
    ap.add_argument("--only-prefill", action="store_true", help="skip the generate workloads")
    ap.add_argument("--skip-hf", action="store_true", help="tandem alone (no ratios)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all the process may use)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per workload and side")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    batches = [] if args.only_prefill else [int(b) for b in args.batches.split(",")]
    rows: list[dict] = []
    load_before = os.getloadavg()[0]
    for dtype in args.dtypes.split(","):
        rows += bench_dtype(dtype, args, threads, batches)
    load_after = os.getloadavg()[0]
    isa = kernels_isa()
    header = (f"threads={threads} torch={torch.__version__} cpu_kernels={isa} prompt_len={args.prompt_len} "
              f"new_tokens={args.new_tokens}; best of {args.repeats} alternating runs after one warm-up each; "
              f"load average {load_before:.1f} at the start, {load_after:.1f} at the end, on {os.cpu_count()} CPUs")
    print("\n" + header)
    print(f"{'dtype':9} {'workload':18} {'tandem':>22} {'transformers':>22} {'tandem/transformers':>20} "
          f"{'tandem median':>14}")
    for r in rows:
        def cell(side: str, r: dict = r) -> str:
            if side not in r:
                return "-"
            s = r[side]
            return f"{s['best_s']:.3f} s {s['best_tok_s']:8.1f} tok/s"

        ratio = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        print(f"{r['dtype']:9} {r['workload']:18} {cell('tandem'):>22} {cell('transformers'):>22} {ratio:>20} "
              f"{r['tandem']['median_s']:12.3f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / time.strftime("engine_%Y%m%d_%H%M%S")
    meta = {"threads": threads, "torch": torch.__version__, "cpu_kernels": isa, "repeats": args.repeats,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "prefill_len": args.prefill_len,
            "load_average": [load_before, load_after], "cpus": os.cpu_count()}
    stem.with_suffix(".json").write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    plot(rows, stem.with_suffix(".png"), header)
    print(f"# wrote {stem}.json and .png")


if __name__ == "__main__":
    main()
