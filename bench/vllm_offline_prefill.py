"""vLLM's own offline prefill on this machine: the peer of ``bench/engine.py --only-prefill``.

Runs in vLLM's venv (``../shared/tools/vllm-cpu-peer.sh`` builds it and the Hugging Face
directory of SmolLM2-135M-Instruct), not tandem's: it imports nothing from tandem.

The workload is ``bench/engine.py``'s ``prefill N`` row: the same prompt (``--prefill-len`` random
token ids, 1024, seed 7, drawn the same way), ``LLM.generate(max_tokens=1)`` in bfloat16, prefix
caching off (and the cache reset before every run all the same), one untimed run, then ``--repeats``
timed runs. The threads: ``--threads`` OpenMP threads bound to CPUs 0..N-1
(``VLLM_CPU_OMP_THREADS_BIND``; vLLM's own default on x86, ``auto``, keeps one CPU per worker
for its scheduler process: ``--bind auto`` measures that instead).

    V=~/.cache/tandem/vllm-cpu-venv; H=~/.cache/tandem/smollm2-135m-hf
    $V/bin/python bench/vllm_offline_prefill.py --model $H --threads 2 --repeats 7

The engine core runs in this process (as tandem's LLM does; ``--mp`` for vLLM's default, its own
process). Prints the runs, the median and the best; writes ``bench/results/vllm_prefill_<time>.json``
(``--out DIR`` elsewhere). ``--profile`` (eager) times each GEMM call (a layer's ``cpu_linear``: the
kernel vLLM picked for this CPU) and each attention call inside the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_prompt(length: int, seed: int = 7) -> list[int]:
    """``bench/engine.py``'s ``make_prompts(1, length, seed)[0]``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (length,), generator=g).tolist()


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/tandem/smollm2-135m-hf"))
    ap.add_argument("--prefill-len", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2, help="OpenMP threads, bound to CPUs 0..N-1")
    ap.add_argument("--bind", default=None, help="VLLM_CPU_OMP_THREADS_BIND as is (e.g. auto); overrides --threads")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--enforce-eager", action="store_true", help="no torch.compile (vLLM's default compiles)")
    ap.add_argument("--mp", action="store_true", help="the engine core in its own process (vLLM's default)")
    ap.add_argument("--profile", action="store_true",
                    help="time every linear (its cpu_linear kernel) and attention call (eager, in this process)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    if args.profile and args.mp:
        ap.error("--profile times the engine in this process: not with --mp")
    return args


class Profile:
    """Wall time of every GEMM (a layer's ``cpu_linear``: oneDNN's matmul here) and attention call,
    wrapped in this process (eager mode: a compiled graph would not call the Python wrappers)."""

    def __init__(self) -> None:
        self.gemm_s = self.attn_s = self.flop = 0.0
        self.gemm_calls = self.attn_calls = 0
        self.kernels: set[str] = set()

    def take(self) -> dict:
        out = {"gemm_s": self.gemm_s, "gemm_calls": self.gemm_calls, "gemm_gflop": self.flop / 1e9,
               "attn_s": self.attn_s, "attn_calls": self.attn_calls}
        self.gemm_s = self.attn_s = self.flop = 0.0
        self.gemm_calls = self.attn_calls = 0
        return out

    def wrap(self, model) -> int:
        import time as t

        def timed_linear(layer, fn):
            def run(x, weight, bias):
                t0 = t.perf_counter()
                y = fn(x, weight, bias)
                self.gemm_s += t.perf_counter() - t0
                self.gemm_calls += 1
                self.flop += 2.0 * x.numel() * y.shape[-1]
                return y
            return run

        def timed_forward(fn):
            def run(*a, **kw):
                t0 = t.perf_counter()
                y = fn(*a, **kw)
                self.attn_s += t.perf_counter() - t0
                self.attn_calls += 1
                return y
            return run

        n = 0
        for name, mod in model.named_modules():
            if hasattr(mod, "cpu_linear"):
                code = getattr(mod.cpu_linear, "__code__", None)  # its closure names the kernel
                self.kernels.add(f"linear {code.co_names if code else mod.cpu_linear}")
                mod.cpu_linear = timed_linear(mod, mod.cpu_linear)
                n += 1
            elif name.endswith("self_attn.attn"):
                self.kernels.add(f"attention isa={getattr(mod, 'isa', '?')}")
                mod.forward = timed_forward(mod.forward)
                n += 1
        return n


def worker_torch_threads(model) -> int:
    import torch

    return torch.get_num_threads()


def set_env(args: argparse.Namespace) -> str:
    bind = args.bind or f"0-{args.threads - 1}"
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind  # vLLM's own worker process (--mp) only
    if not args.bind:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the engine in this process
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model's functions (--profile)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if args.mp else "0"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return bind


def main() -> None:
    args = parse()
    bind = set_env(args)
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=make_prompt(args.prefill_len))
    eager = args.enforce_eager or args.profile
    t0 = time.perf_counter()
    llm = LLM(model=args.model, dtype="bfloat16", max_model_len=2048, enable_prefix_caching=False,
              enforce_eager=eager, seed=0)
    load_s = time.perf_counter() - t0
    # vLLM's own worker process (--mp) cannot unpickle a function of this script: its log gives the
    # OpenMP binding ("core ids") there.
    worker_threads = None if args.mp else llm.apply_model(worker_torch_threads)[0]
    prof = Profile() if args.profile else None
    if prof is not None:
        log(f"profiling {llm.apply_model(prof.wrap)[0]} modules")
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=1)

    def once() -> tuple[float, int, float]:
        llm.reset_prefix_cache()
        t = time.perf_counter()
        out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        dt = time.perf_counter() - t
        tok = out.token_ids[0]
        return dt, tok, out.logprobs[0][tok].logprob

    load_before = os.getloadavg()[0]
    once()
    runs, first, profiles = [], None, []
    if prof is not None:
        prof.take()
    for i in range(args.repeats):
        dt, tok, lp = once()
        first = first or (tok, lp)
        runs.append(dt)
        extra = ""
        if prof is not None:
            profiles.append(prof.take())
            p = profiles[-1]
            extra = (f" (GEMM {1e3 * p['gemm_s']:.1f} ms in {p['gemm_calls']} calls, "
                     f"{p['gemm_gflop'] / p['gemm_s']:.0f} GFLOP/s; attention {1e3 * p['attn_s']:.1f} ms)")
        log(f"    vllm prefill {args.prefill_len} run {i + 1}/{args.repeats}: {dt:.3f} s{extra}")
    load_after = os.getloadavg()[0]
    med, best = statistics.median(runs), min(runs)
    meta = {"vllm": vllm.__version__, "torch": torch.__version__, "worker_torch_threads": worker_threads,
            "bind": bind, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "enforce_eager": eager,
            "profiled": args.profile, "multiprocessing": args.mp, "prefill_len": args.prefill_len,
            "repeats": args.repeats,
            "load_s": load_s, "load_average": [load_before, load_after], "cpus": os.cpu_count(),
            "first_token": first[0], "first_logprob": first[1], "runs_s": runs, "median_s": med, "best_s": best,
            "profile": profiles}
    print(f"\nvllm {vllm.__version__} bind={bind} worker_torch_threads={worker_threads} "
          f"eager={eager} mp={args.mp}; load average {load_before:.1f} -> {load_after:.1f}")
    if profiles:
        pm = {k: statistics.median(p[k] for p in profiles) for k in profiles[0]}
        print(f"profile (medians): GEMM {1e3 * pm['gemm_s']:.1f} ms in {pm['gemm_calls']:.0f} calls, "
              f"{pm['gemm_gflop']:.1f} GFLOP, {pm['gemm_gflop'] / pm['gemm_s']:.0f} GFLOP/s "
              f"({sorted(prof.kernels)}); attention {1e3 * pm['attn_s']:.1f} ms in {pm['attn_calls']:.0f} calls")
    print(f"prefill {args.prefill_len}: median {med:.3f} s, best {best:.3f} s over {args.repeats} runs "
          f"(first token {first[0]}, logprob {first[1]:.4f})")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / time.strftime("vllm_prefill_%Y%m%d_%H%M%S.json")
    path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
