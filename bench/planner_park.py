"""How fast a parked worker's engine gives its GPU back and takes it again (the launcher's warm
pool; ``bench/planner.py --wake-s`` models the second): one engine on a GPU, timed through its
start-up (what a new worker costs), then park, unpark and the first requests after, in rounds that
alternate how it was done before (``base``: fresh pinned host buffers at every park, freed at unpark;
every decode CUDA graph captured at unpark) and now (``new``: the first park's pinned buffers kept
and reused; at unpark only the graphs replayed before the park, the others on their first use).
The first round is ``new`` (the first park pins its buffers), then ``--repeat`` pairs base, new.
First requests: one (a 128-token prompt, 4 tokens: the graph of size 1, replayed before), then 16
at once (size 16: captured on that step in ``new`` rounds), then 16 again.

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

from engine.cuda_graphs import graph_sizes
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


def batch_s(llm: LLM, n: int = 16) -> float:
    """``n`` requests at once (decode steps of ``n`` rows): their wall time."""
    t0 = time.perf_counter()
    llm.generate([list(range(10 + i, 74 + i)) for i in range(n)],
                 SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dummy:llama-3.1-8b", help="model path or dummy preset")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-cache-gib", type=float, default=0.0, help="0: sized from the GPU (0.9 of it)")
    ap.add_argument("--repeat", type=int, default=2, help="pairs of rounds (base, new) after the first")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--only", choices=("base", "new"), help="every round (after the first) of this kind")
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
    report["batch16_s"] = batch_s(llm)
    all_sizes = set(graph_sizes(engine.config.scheduler.max_num_seqs))
    kinds = ["new"] + (["base", "new"] * args.repeat if not args.only else [args.only] * (2 * args.repeat))
    for i, kind in enumerate(kinds):
        if runner.graphs is not None:  # what the park keeps of the graphs used: one request's size only
            runner.graphs.used = {1}
        kept = runner._pinned
        if kind == "base":
            runner._pinned = []  # the park pins fresh buffers, as before
        park_s = engine.park()
        parked = memory()
        if kind == "base":
            runner._graph_sizes_used = set(all_sizes)  # every graph captured at unpark, as before
        unpark_s = engine.unpark()
        if kind == "base":  # before, the unpark dropped the pinned copies
            t0 = time.perf_counter()
            runner._pinned = kept
            unpark_s += time.perf_counter() - t0
        graphs = runner.graphs
        row = {"kind": kind, "park_s": park_s, "parked": parked, "unpark_s": unpark_s,
               "unpark_parts_s": dict(runner.unpark_s), "graphs_at_unpark": len(graphs.graphs) if graphs else 0,
               "first_request_s": first_step_s(llm), "first_batch16_s": batch_s(llm), "second_batch16_s": batch_s(llm),
               "lazy_captures": graphs.num_lazy if graphs else 0, "serving": memory(),
               "weights_gbps_to_gpu": weights / 1e9 / runner.unpark_s["weights"] if runner.unpark_s else None}
        del graphs  # (else the next park keeps these graphs' memory)
        report["rounds"].append(row)
        print(f"round {i} ({kind}): park {park_s:.2f} s (GPU allocated {parked['allocated_gib']:.2f} GiB, reserved "
              f"{parked['reserved_gib']:.2f}, free {parked['free_gib']:.1f} of {parked['total_gib']:.1f}); unpark "
              f"{unpark_s:.2f} s ({', '.join(f'{k} {v:.2f}' for k, v in runner.unpark_s.items())}, "
              f"{row['graphs_at_unpark']} graphs; weights at {row['weights_gbps_to_gpu'] or 0:.1f} GB/s); first "
              f"request {row['first_request_s']:.3f} s, 16 requests {row['first_batch16_s']:.3f} s then "
              f"{row['second_batch16_s']:.3f} s")
    summary: dict[str, dict[str, float]] = {}
    for kind in ("base", "new"):
        rows = [r for r in report["rounds"][1:] if r["kind"] == kind]
        if not rows:
            continue
        summary[kind] = {k: sum(r[k] for r in rows) / len(rows) for k in
                         ("park_s", "unpark_s", "first_request_s", "first_batch16_s", "second_batch16_s")}
    report["summary"] = summary
    if len(summary) == 2:
        summary["ratio_new_to_base"] = {k: summary["new"][k] / summary["base"][k] for k in summary["new"]}
        print("mean over the paired rounds: " + "; ".join(
            f"{k} base {summary['base'][k]:.3f} s, new {summary['new'][k]:.3f} s "
            f"({summary['ratio_new_to_base'][k]:.2f}x)" for k in summary["new"]))
    else:
        print("mean over the rounds after the first: " + "; ".join(
            f"{kind}: " + ", ".join(f"{k} {v:.3f} s" for k, v in row.items()) for kind, row in summary.items()))
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
