"""Engine work per CPU-second, tandem vs transformers, one thread: a comparison that holds up on
a shared, loaded machine (wall-clock figures there mostly measure the neighbours).

SmolLM2-135M-Instruct (``--dtype``, bfloat16 by default), both in this process with
``torch.set_num_threads(1)``: a ``--prefill-len`` (1024) token prefill to its first token
(transformers: ``logits_to_keep=1``), and 200-token prompts decoding ``--new-tokens`` tokens
(ignore_eos) at batch 1 and 8. Each workload runs once untimed on each side, then ``--repeats``
times alternating tandem and transformers; the least CPU time of each side counts.

    python bench/engine_cpu_time.py [--new-tokens 64] [--dtype bfloat16] [--repeats 3] [--json OUT]

``--json OUT`` writes the rows and OUT's .png (tokens per CPU-second per workload, both sides).
"""

from __future__ import annotations

import argparse
import json
import os
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


def cpu_seconds(fn: Callable[[], None]) -> tuple[float, float]:
    c, w = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c, time.perf_counter() - w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill-len", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the rows here and the figure beside (.png)")
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
    greedy = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    def ours_generate(prompts: list[list[int]]) -> None:
        llm.engine.reset_prefix_cache()
        llm.generate(prompts, greedy)

    def ref_generate(prompts: list[list[int]]) -> None:
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=0)

    def ours_prefill(prompts: list[list[int]]) -> None:
        llm.engine.reset_prefix_cache()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1))

    def ref_prefill(prompts: list[list[int]]) -> None:
        with torch.inference_mode():
            hf(torch.tensor(prompts), logits_to_keep=1, use_cache=True)

    prefill = [torch.randint(100, 40000, (args.prefill_len,), generator=g).tolist()]
    workloads = [(f"prefill {args.prefill_len}", args.prefill_len, prefill, ours_prefill, ref_prefill)]
    for batch in (1, 8):
        prompts = [torch.randint(100, 40000, (200,), generator=g).tolist() for _ in range(batch)]
        workloads.append((f"decode batch {batch}", batch * n, prompts, ours_generate, ref_generate))
    print(f"torch {torch.__version__}, {args.dtype}, 1 thread; least CPU time of {args.repeats} alternating runs "
          f"after one warm-up each; load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for name, tokens, prompts, ours, ref in workloads:
        ours(prompts)
        ref(prompts)
        times: dict[str, list[tuple[float, float]]] = {"tandem": [], "transformers": []}
        for _ in range(args.repeats):
            times["tandem"].append(cpu_seconds(lambda p=prompts, f=ours: f(p)))
            times["transformers"].append(cpu_seconds(lambda p=prompts, f=ref: f(p)))
        (oc, ow), (rc, rw) = min(times["tandem"]), min(times["transformers"])
        print(f"{name}: tandem {tokens / oc:.1f} tok per CPU-s (wall {tokens / ow:.1f} tok/s), "
              f"transformers {tokens / rc:.1f} tok per CPU-s (wall {tokens / rw:.1f} tok/s); "
              f"tandem/transformers {rc / oc:.2f}x", flush=True)
        rows.append({"workload": name, "tokens": tokens, "tandem_cpu_s": oc, "tandem_wall_s": ow,
                     "transformers_cpu_s": rc, "transformers_wall_s": rw})
    if args.json:
        from bench import plots

        result = {"args": vars(args), "load_average": os.getloadavg()[0], "engine_cpu_time": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(plots.engine_cpu_time(result, Path(args.json).with_suffix(".png")))


if __name__ == "__main__":
    main()
