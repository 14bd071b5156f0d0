"""The engine's CPU speed against a baseline tree, in one run: decode steps (the serving path's
unit: ITL at concurrency c is about one decode step of batch c plus the prefills mixed in) and a
long prefill, for this tree and for a git ref (default ``main``) side by side.

Each side runs in its own process (its own CPU kernels, built on first use), the sides alternate
``--repeats`` times, and the table keeps each side's best run (the least disturbed on a shared
machine) with the ratio baseline/this (above 1: this tree is faster). SmolLM2-135M from the GGUF,
bfloat16, random prompts, greedy, ignore_eos.

    python bench/cpu_speed.py                                 # against main
    python bench/cpu_speed.py --baseline HEAD~1 --batches 8 --threads 1

Workloads: ``decode batch B`` (``--threads``, 1 by default: what ``tandem serve`` gives an engine on
2 cores): B prompts of ``--prompt-len`` tokens prefilled, then ``--new-tokens`` decode steps; the
figure is the median step. ``prefill N`` (``--prefill-threads``, default all cores): one prompt of
N tokens to its first token. Writes ``bench/results/cpu_speed_<time>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in the side's own process, on its tree (sys.path[0]); prints one JSON line.
_WORKER = r"""
import json, os, statistics, sys, time
import torch
from engine.llm import LLM
from protocol.sampling import SamplingParams
spec = json.loads(sys.argv[1])
torch.manual_seed(0)
llm = LLM("default", dtype="bfloat16", progress=False, kv_cache_bytes=1 << 30, num_threads=spec["threads"])
e = llm.engine
g = torch.Generator().manual_seed(0)
out = {}
for b in spec["batches"]:
    torch.set_num_threads(spec["threads"])
    prompts = [torch.randint(100, 40000, (spec["prompt_len"],), generator=g).tolist() for _ in range(b)]
    params = SamplingParams(temperature=0.0, max_tokens=spec["new_tokens"], ignore_eos=True)
    steps = []
    for rep in range(2):  # the first run warms up
        e.reset_prefix_cache()
        for i, p in enumerate(prompts):
            e.add_request(f"r{rep}-{b}-{i}", p, params)
        e.step()  # the prefill
        steps = []
        while e.has_unfinished():
            t0 = time.perf_counter()
            e.step()
            steps.append(time.perf_counter() - t0)
    out[f"decode batch {b}"] = statistics.median(steps)
if spec["prefill_len"]:
    torch.set_num_threads(spec["prefill_threads"])
    prompt = torch.randint(100, 40000, (spec["prefill_len"],), generator=g).tolist()
    best = float("inf")
    for _ in range(3):
        e.reset_prefix_cache()
        t0 = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1))
        best = min(best, time.perf_counter() - t0)
    out[f"prefill {spec['prefill_len']}"] = best
print("RESULT " + json.dumps(out))
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def export_tree(ref: str, dest: Path) -> Path:
    """The files of ``ref`` (a git ref of this repository) under ``dest``."""
    archive = dest / "tree.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), ref], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest / "tree", filter="data")
    return dest / "tree"


def run_side(tree: Path, spec: dict) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tree)!r})\n" + _WORKER,
                           json.dumps(spec)], env=env, capture_output=True, text=True, cwd=tree)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"the run on {tree} failed:\n{proc.stderr[-3000:]}")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(rows)), 4.0))
    x = list(range(len(rows)))
    ax.bar(x, [r["ratio"] for r in rows], color="tab:blue")
    ax.axhline(1.0, color="gray", lw=0.8)
    for i, r in enumerate(rows):
        ax.annotate(f"{r['ratio']:.2f}x\n{r['baseline_ms']:.1f} -> {r['this_ms']:.1f} ms", (i, r["ratio"]),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [r["workload"] for r in rows], fontsize=8)
    ax.set_ylabel("baseline time / this tree's time (best runs)")
    ax.set_ylim(0, 1.3 * max(r["ratio"] for r in rows))
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="main", help="git ref to compare against")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=1, help="engine threads of the decode workloads")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill-len", type=int, default=1024, help="0: no prefill workload")
    ap.add_argument("--prefill-threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    spec = {"batches": [int(b) for b in args.batches.split(",") if b], "threads": args.threads,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "prefill_len": args.prefill_len,
            "prefill_threads": args.prefill_threads}
    with tempfile.TemporaryDirectory() as tmp:
        baseline = export_tree(args.baseline, Path(tmp))
        runs: dict[str, list[dict[str, float]]] = {"baseline": [], "this": []}
        load_before = os.getloadavg()[0]
        for rep in range(args.repeats):
            for side, tree in (("baseline", baseline), ("this", ROOT)):
                result = run_side(tree, spec)
                runs[side].append(result)
                log(f"  run {rep + 1}/{args.repeats} {side}: " +
                    ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in result.items()))
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    rows = []
    for workload in runs["this"][0]:
        base = min(r[workload] for r in runs["baseline"])
        this = min(r[workload] for r in runs["this"])
        rows.append({"workload": workload, "baseline_ms": base * 1e3, "this_ms": this * 1e3, "ratio": base / this,
                     "baseline_runs_ms": [r[workload] * 1e3 for r in runs["baseline"]],
                     "this_runs_ms": [r[workload] * 1e3 for r in runs["this"]]})
    title = (f"engine on the CPU: {args.baseline} vs this tree ({head}); decode {args.threads} thread(s), "
             f"prompts {args.prompt_len}, {args.new_tokens} steps; prefill {args.prefill_threads} threads")
    print(title)
    print(f"| workload | {args.baseline} ms | this ms | {args.baseline}/this |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['baseline_ms']:.1f} | {r['this_ms']:.1f} | {r['ratio']:.2f}x |")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / time.strftime("cpu_speed_%Y%m%d_%H%M%S")
    stem.with_suffix(".json").write_text(json.dumps(
        {"title": title, "baseline": args.baseline, "head": head, "spec": spec, "rows": rows,
         "load_avg_before": load_before, "load_avg_after": os.getloadavg()[0]}, indent=1))
    plot(rows, stem.with_suffix(".png"), title)
    log(f"wrote {stem}.json and .png")


if __name__ == "__main__":
    main()
