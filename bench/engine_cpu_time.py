"""Decode work per CPU-second, tandem vs transformers, one thread: a comparison that holds up
on a shared, loaded machine (wall-clock figures there mostly measure the neighbours).

SmolLM2-135M-Instruct bf16, 200-token prompts, ``--new-tokens`` tokens (ignore_eos), batch 1
and 8, both in this process with ``torch.set_num_threads(1)``.

    python bench/engine_cpu_time.py [--new-tokens 64] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from engine.llm import LLM
from engine.loader import TORCH_DTYPES, default_model_path
from protocol.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    print("loading transformers and tandem...", file=sys.stderr, flush=True)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              dtype=TORCH_DTYPES[args.dtype]).eval()
    llm = LLM("default", dtype=args.dtype, progress=False, num_threads=1)
    g = torch.Generator().manual_seed(0)
    n = args.new_tokens
    for batch in (1, 8):
        prompts = [torch.randint(100, 40000, (200,), generator=g).tolist() for _ in range(batch)]
        llm.engine.reset_prefix_cache()
        c, w = time.process_time(), time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        ours, ours_w = time.process_time() - c, time.perf_counter() - w
        ids = torch.tensor(prompts)
        c, w = time.process_time(), time.perf_counter()
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=0)
        ref, ref_w = time.process_time() - c, time.perf_counter() - w
        print(f"batch {batch}: tandem {batch * n / ours:.1f} tok per CPU-s (wall {batch * n / ours_w:.1f} tok/s), "
              f"transformers {batch * n / ref:.1f} tok per CPU-s (wall {batch * n / ref_w:.1f} tok/s); "
              f"ratio {ref / ours:.2f}x", flush=True)


if __name__ == "__main__":
    main()
