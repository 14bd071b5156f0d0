"""Engine throughput on CPU: tandem vs HF transformers ``generate``, same workload, one process.

Workload (issue 2): SmolLM2-135M-Instruct, prompts of 200 tokens, 128 new tokens (ignore_eos),
batch 1, 8 and 32, in bfloat16 and float32; and one 1024-token prefill. Batch 1 runs the 8
prompts one after another, batch 8 runs them together, batch 32 runs 32 distinct prompts.
tandem's prefix cache is reset before every run so no run reuses another's prompts.

Each generate workload runs ``--repeats`` times, tandem and transformers alternating, and the
table gives each one's best run (the run least slowed by other work on a shared machine); the
median runs and the machine's load average are printed too.

    python bench/engine.py                      # everything
    python bench/engine.py --dtypes bfloat16 --batches 1,8 --skip-hf
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
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


def run_tandem(llm: LLM, prompts: list[list[int]], batch: int, new_tokens: int) -> tuple[int, float]:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.engine.reset_prefix_cache()
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(prompts), batch):
        for r in llm.generate(prompts[i:i + batch], params):
            n += len(r.outputs[0].token_ids)
    return n, time.perf_counter() - t0


def run_hf(model, prompts: list[list[int]], batch: int, new_tokens: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(prompts), batch):
        ids = torch.tensor(prompts[i:i + batch])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        n += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return n, time.perf_counter() - t0


def prefill_tandem(llm: LLM, prompt: list[int]) -> float:
    llm.engine.reset_prefix_cache()
    t0 = time.perf_counter()
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1))
    return time.perf_counter() - t0


def prefill_hf(model, prompt: list[int]) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(torch.tensor([prompt]))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch1-prompts", type=int, default=8, help="prompts run one by one at batch 1")
    ap.add_argument("--prefill-len", type=int, default=1024)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="runs per generate workload (best one reported)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    rows, medians = [], []
    load_before = os.getloadavg()[0]
    for dtype in args.dtypes.split(","):
        log(f"[{dtype}] loading tandem...")
        llm = LLM("default", dtype=dtype, progress=False, kv_cache_bytes=1 << 30, num_threads=torch.get_num_threads())
        hf = None
        if not args.skip_hf:
            log(f"[{dtype}] loading transformers (GGUF reference loader)...")
            from transformers import AutoModelForCausalLM

            path = default_model_path()
            hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                      dtype=TORCH_DTYPES[dtype]).eval()
        log(f"[{dtype}] warm-up...")
        warm = make_prompts(2, 32, seed=99)
        run_tandem(llm, warm, 2, 4)
        if hf is not None:
            run_hf(hf, warm, 2, 4)
        for batch in batches:
            n_prompts = args.batch1_prompts if batch == 1 else batch
            prompts = make_prompts(n_prompts, args.prompt_len, seed=batch)
            ours_runs, ref_runs = [], []
            for rep in range(args.repeats):
                log(f"[{dtype}] batch {batch}, run {rep + 1}/{args.repeats}: tandem ({n_prompts} prompts x "
                    f"{args.new_tokens} tokens)...")
                n, dt = run_tandem(llm, prompts, batch, args.new_tokens)
                ours_runs.append(n / dt)
                if hf is not None:
                    log(f"[{dtype}] batch {batch}, run {rep + 1}/{args.repeats}: transformers...")
                    n, dt = run_hf(hf, prompts, batch, args.new_tokens)
                    ref_runs.append(n / dt)
            ours, ref = max(ours_runs), max(ref_runs) if ref_runs else None
            rows.append((dtype, f"generate batch {batch}", f"{ours:8.1f} tok/s",
                         f"{ref:8.1f} tok/s" if ref else "-", f"{ours / ref:5.2f}x" if ref else "-"))
            medians.append(f"{dtype} batch {batch}: median tandem {statistics.median(ours_runs):.1f} tok/s"
                           + (f", transformers {statistics.median(ref_runs):.1f} tok/s" if ref_runs else "")
                           + f" (runs: {', '.join(f'{x:.1f}' for x in ours_runs)}"
                           + (f" / {', '.join(f'{x:.1f}' for x in ref_runs)})" if ref_runs else ")"))
            log(f"    {rows[-1]}")
        log(f"[{dtype}] {args.prefill_len}-token prefill...")
        prompt = make_prompts(1, args.prefill_len, seed=7)[0]
        prefill_tandem(llm, prompt)  # warm the larger shapes
        ours = min(prefill_tandem(llm, prompt) for _ in range(3))
        ref = min(prefill_hf(hf, prompt) for _ in range(3)) if hf is not None else None
        rows.append((dtype, f"prefill {args.prefill_len}", f"{ours:8.3f} s", f"{ref:8.3f} s" if ref else "-",
                     f"{ref / ours:5.2f}x" if ref else "-"))
        log(f"    {rows[-1]}")
        del llm, hf
    print(f"\nthreads={torch.get_num_threads()} torch={torch.__version__} prompt_len={args.prompt_len} "
          f"new_tokens={args.new_tokens}; best of {args.repeats} runs; load average {load_before:.1f} at the "
          f"start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} CPUs")
    print(f"{'dtype':9} {'workload':22} {'tandem':>14} {'transformers':>14} {'speedup':>8}")
    for r in rows:
        print(f"{r[0]:9} {r[1]:22} {r[2]:>14} {r[3]:>14} {r[4]:>8}")
    for m in medians:
        print(m)


if __name__ == "__main__":
    main()
