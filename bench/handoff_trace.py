"""Where the first-to-second-token gap goes: joins the per-process timelines that
``TANDEM_TRACE_DIR`` makes the router and workers write (``runtime.trace``) and prints, per
disaggregated point of a sweep, the p50/p90 of each segment of a request's handoff.

    TANDEM_TRACE_DIR=T python bench/serve.py --device cuda ... --skip aggregated,llm --out DIR
    python bench/handoff_trace.py T DIR/sweep.json [--json OUT]   # OUT and OUT's .png (bench/plots.py)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

# (name, from event, to event): consecutive on the way of a request pushed to its decode worker.
SEGMENTS = (
    ("prefill (router -> answer)", "r.plan", "r.prefill_ans"),
    ("router: answer -> Generate call", "r.prefill_ans", "r.decode_call"),
    ("Generate call -> decode worker", "r.decode_call", "d.recv"),
    ("admit", "d.recv", "d.admitted"),
    ("admitted -> PushKV at P", "d.admitted", "p.pushkv"),
    ("P's prefill answered -> push starts (ahead)", "p.ans", "p.pushkv"),
    ("push at P", "p.pushkv", "p.pushed"),
    ("pushed -> landed at D", "p.pushed", "d.landed"),
    ("handoff (fetch -> landed)", "d.fetch", "d.landed"),
    ("landed -> engine has it", "d.landed", "d.ready"),
    ("engine has it -> first launch", "d.ready", "d.launch1"),
    ("first launch -> token applied", "d.launch1", "d.out1"),
    ("token applied -> message sent", "d.out1", "d.msg1"),
    ("message -> router", "d.msg1", "r.msg1"),
    ("router: 1st -> 2nd token yielded", "r.first_yield", "r.second_yield"),
    ("prefill answer -> 2nd token yielded", "r.prefill_ans", "r.second_yield"),
)


def load(trace_dir: Path) -> dict[str, dict[str, int]]:
    """request id -> event -> first time (ns) it was marked."""
    events: dict[str, dict[str, int]] = {}
    for path in trace_dir.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue  # a line cut by a killed process
            events.setdefault(e["rid"], {}).setdefault(e["ev"], e["t"])
    return events


def breakdown(events: dict[str, dict[str, int]], window: tuple[int, int] | None = None) -> dict[str, Any]:
    reqs = [ev for ev in events.values() if "r.second_yield" in ev and "d.ready" in ev
            and (window is None or window[0] <= ev.get("r.plan", 0) <= window[1])]
    out: dict[str, Any] = {"num_requests": len(reqs)}
    for name, a, b in SEGMENTS:
        xs = np.array([(ev[b] - ev[a]) / 1e6 for ev in reqs if a in ev and b in ev])
        if xs.size:
            out[name] = {"p50": float(np.percentile(xs, 50)), "p90": float(np.percentile(xs, 90)),
                         "mean": float(xs.mean()), "n": int(xs.size)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace_dir")
    p.add_argument("sweep_json", nargs="?", help="split by the sweep's points (else: all requests)")
    p.add_argument("--json", default=None, help="write the report here, and its figure beside (.png)")
    args = p.parse_args(argv)
    events = load(Path(args.trace_dir))
    points: list[tuple[str, tuple[int, int] | None]] = [("all", None)]
    if args.sweep_json:
        results = json.loads(Path(args.sweep_json).read_text())["results"]
        points = [(f"isl {r['isl']} c {r['concurrency']}", tuple(r["window_monotonic_ns"])) for r in results
                  if r["side"] == "1P+1D" and r.get("window_monotonic_ns")]
    report = {}
    for label, window in points:
        b = report[label] = breakdown(events, window)
        print(f"\n{label}: {b['num_requests']} requests handed off (ms)")
        print(f"  {'segment':<46}{'p50':>8}{'p90':>8}{'mean':>8}")
        for name, _, _ in SEGMENTS:
            if name in b:
                s = b[name]
                print(f"  {name:<46}{s['p50']:>8.2f}{s['p90']:>8.2f}{s['mean']:>8.2f}")
    if args.json:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
        from bench import plots

        Path(args.json).write_text(json.dumps(report, indent=1))
        print(plots.handoff_segments(report, Path(args.json).with_suffix(".png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
