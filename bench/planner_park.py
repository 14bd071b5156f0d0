"""How fast a parked worker's engine gives its GPU back and takes it again (the launcher's warm
pool; ``bench/planner.py --wake-s`` models the second): one engine on a GPU, timed through its
start-up (what a new worker costs), then ``--repeat`` times park, unpark and the first step after.

    python bench/planner_park.py                                   # Llama-3.1-8B's shapes, random weights
    python bench/planner_park.py --model /models/Llama-3.1-8B-Instruct --repeat 5
    python bench/planner_park.py --enforce-eager                   # no CUDA graphs to capture again

Prints one line per phase and writes a JSON (``--out``): seconds, the bytes moved, and the GPU's
memory (allocated, reserved, free) around each step. Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from engine.llm import LLM
from protocol.sampling import SamplingParams

GIB = 1 << 30


def memory() -> dict[str, float]:
    free, total = torch.cuda.mem_get_info()
    return {"allocated_gib": torch.cuda.memory_allocated() / GIB, "reserved_gib": torch.cuda.memory_reserved() / GIB,
            "free_gib": free / GIB, "total_gib": total / GIB}


def first_step_s(llm: LLM) -> float:
    """A short request's wall time: a decode of a few tokens after a 128-token prompt."""
    t0 = time.perf_counter()
    llm.generate([list(range(10, 138))], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dummy:llama-3.1-8b", help="model path or dummy preset")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-cache-gib", type=float, default=0.0, help="0: sized from the GPU (0.9 of it)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--out", default="planner-park.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    t0 = time.perf_counter()
    llm = LLM(args.model, device="cuda", dtype=args.dtype, kv_cache_bytes=int(args.kv_cache_gib * GIB),
              progress=False, enforce_eager=args.enforce_eager)
    startup_s = time.perf_counter() - t0
    engine, runner = llm.engine, llm.engine.runner
    weights = sum(t.numel() * t.element_size() for _, _, t in runner._device_tensors())
    kv = runner.kv.numel() * runner.kv.element_size()
    report = {"model": args.model, "device": torch.cuda.get_device_name(), "weights_gib": weights / GIB,
              "kv_gib": kv / GIB, "startup_s": startup_s, "first_request_s": first_step_s(llm),
              "serving": memory(), "rounds": []}
    print(f"{report['device']}: {args.model} weights {weights / GIB:.2f} GiB, KV {kv / GIB:.2f} GiB; start-up "
          f"{startup_s:.2f} s (weights, KV, graphs), first request {report['first_request_s']:.3f} s")
    for i in range(args.repeat):
        park_s = engine.park()
        parked = memory()
        unpark_s = engine.unpark()
        row = {"park_s": park_s, "parked": parked, "unpark_s": unpark_s, "unpark_parts_s": dict(runner.unpark_s),
               "first_request_s": first_step_s(llm), "serving": memory(),
               "weights_gbps_to_gpu": weights / 1e9 / runner.unpark_s["weights"] if runner.unpark_s else None}
        report["rounds"].append(row)
        print(f"round {i}: park {park_s:.2f} s (GPU allocated {parked['allocated_gib']:.2f} GiB, reserved "
              f"{parked['reserved_gib']:.2f}, free {parked['free_gib']:.1f} of {parked['total_gib']:.1f}); unpark "
              f"{unpark_s:.2f} s ({', '.join(f'{k} {v:.2f}' for k, v in runner.unpark_s.items())}; weights at "
              f"{row['weights_gbps_to_gpu'] or 0:.1f} GB/s); first request after {row['first_request_s']:.3f} s")
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
