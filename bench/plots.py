"""The bench scripts' figures (matplotlib, PNG): latency CDFs, throughput against concurrency,
goodput against request rate (the DistServe-style curve), the GPU scripts' decode steps against
the HBM ceiling, generate throughput, and kernel-variant grids. Each function takes the JSON the
scripts write (``bench/serve.py``'s runs: a ``label``, a ``summary`` and per-request ``requests``;
``bench/gpu.py``'s ``decode``/``generate``; ``bench/gpu_kernels.py``'s ``sections``) and writes
one PNG; none shows a window, none needs a GPU.

    python bench/plots.py RESULTS.json [--out DIR]     # every figure the file has data for
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _cdf(ax: Any, values_ms: Iterable[float], label: str) -> None:
    xs = sorted(v for v in values_ms if v is not None and not math.isnan(v))
    if xs:
        ax.step(xs, [(k + 1) / len(xs) for k in range(len(xs))], where="post", label=f"{label} (n={len(xs)})")


def latency_cdfs(runs: list[dict[str, Any]], path: Path, ttft_target_ms: float | None = None,
                 itl_target_ms: float | None = None) -> Path:
    """TTFT and ITL CDFs, one line per run, the SLO targets as vertical lines."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        ok = [r for r in run.get("requests", []) if r.get("ok")]
        _cdf(a, (r["ttft_s"] * 1000 for r in ok), run["label"])
        _cdf(b, (x * 1000 for r in ok for x in r.get("itls_s", [])), run["label"])
    for ax, title, target in ((a, "time to first token", ttft_target_ms), (b, "inter-token latency", itl_target_ms)):
        if target:
            ax.axvline(target, color="red", linestyle="--", label=f"SLO {target:g} ms")
        ylabel = "fraction of requests" if ax is a else "fraction of tokens"
        ax.set(title=title, xlabel="ms", ylabel=ylabel, ylim=(0, 1))
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _series(points: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        out.setdefault(p.get("series", ""), []).append(p)
    return out


def throughput_vs_concurrency(points: list[dict[str, Any]], path: Path) -> Path:
    """Output tokens/s and TTFT p50 against concurrency; ``points``: series, concurrency, summary."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for series, pts in _series(points).items():
        pts = sorted(pts, key=lambda p: p["concurrency"])
        xs = [p["concurrency"] for p in pts]
        a.plot(xs, [p["summary"]["output_throughput"] for p in pts], marker="o", label=series or None)
        b.plot(xs, [p["summary"]["ttft_ms"]["p50"] for p in pts], marker="o", label=f"{series} p50".strip())
        b.plot(xs, [p["summary"]["ttft_ms"]["p99"] for p in pts], marker="x", linestyle=":",
               label=f"{series} p99".strip())
    a.set(title="throughput against concurrency", xlabel="concurrency", ylabel="output tokens / s")
    b.set(title="TTFT against concurrency", xlabel="concurrency", ylabel="ms")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, path)


def goodput_vs_rate(points: list[dict[str, Any]], path: Path) -> Path:
    """Goodput (requests/s meeting both SLOs) and its fraction against the offered rate: the
    DistServe curve. ``points``: series, rate, summary."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    top = 0.0
    for series, pts in _series(points).items():
        pts = sorted(pts, key=lambda p: p["rate"])
        xs = [p["rate"] for p in pts]
        top = max(top, *xs)
        a.plot(xs, [p["summary"]["goodput"] for p in pts], marker="o", label=f"{series} goodput".strip())
        a.plot(xs, [p["summary"]["request_throughput"] for p in pts], marker="x", linestyle=":",
               label=f"{series} throughput".strip())
        b.plot(xs, [p["summary"]["goodput_fraction"] for p in pts], marker="o", label=series or None)
    a.plot([0, top], [0, top], color="grey", linewidth=0.8, label="offered")
    s = points[0]["summary"] if points else {}
    slo = f"TTFT <= {s.get('ttft_target_ms', 0):g} ms, ITL <= {s.get('itl_target_ms', 0):g} ms"
    a.set(title=f"goodput against rate ({slo})", xlabel="offered requests / s", ylabel="requests / s")
    b.set(title="SLO attainment against rate", xlabel="offered requests / s", ylabel="fraction meeting both",
          ylim=(0, 1.05))
    for ax in (a, b):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, path)


def policy_bars(runs_by_engine: dict[str, dict[str, Any]], path: Path) -> Path:
    """``bench/routing.py``'s policies side by side, a row per engine: TTFT mean and p99, prefix
    hit rate, output tokens/s. ``runs_by_engine``: engine -> policy -> {"summary": ...}."""
    panels = (("TTFT ms (bar: mean, tick: p99)", None), ("prefix hit rate", "prefix_hit_rate"),
              ("output tokens / s", "output_throughput"))
    fig, axes = plt.subplots(len(runs_by_engine), len(panels), figsize=(13, 3.6 * len(runs_by_engine)),
                             squeeze=False)
    for row, (engine, runs) in zip(axes, runs_by_engine.items()):
        names = list(runs)
        xs = range(len(names))
        for ax, (title, key) in zip(row, panels):
            if key is None:
                ax.bar(xs, [runs[n]["summary"]["ttft_ms"]["mean"] for n in names], color="tab:blue")
                ax.scatter(xs, [runs[n]["summary"]["ttft_ms"]["p99"] for n in names], marker="_", s=400,
                           color="black", zorder=3)
            else:
                ax.bar(xs, [runs[n]["summary"][key] for n in names], color="tab:green")
            ax.set_xticks(list(xs), names, rotation=20, fontsize=8)
            ax.set_title(f"{engine}: {title}" if engine else title, fontsize=9)
            ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def fit_scatter(measured_s: Any, modelled_s: Any, is_prefill: Any, title: str, path: Path) -> Path:
    """``bench/fit_sim.py``'s fit: each timed step's measured against modelled time (log-log),
    prefill and decode steps apart, the diagonal where the model is exact."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for mask, label in ((is_prefill, "prefill steps"), (~is_prefill, "decode steps")):
        ax.scatter(measured_s[mask] * 1000, modelled_s[mask] * 1000, s=14, label=f"{label} (n={int(mask.sum())})")
    lo = float(min(measured_s.min(), modelled_s.min())) * 1000
    hi = float(max(measured_s.max(), modelled_s.max())) * 1000
    ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8)
    ax.set(title=f"sim step-time model: {title}", xlabel="measured ms", ylabel="modelled ms",
           xscale="log", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def serve_figures(result: dict[str, Any], stem: Path) -> list[Path]:
    """Every figure of a ``bench/serve.py`` JSON: ``<stem>_latency_cdf.png`` from its runs,
    ``<stem>_concurrency.png`` and ``<stem>_goodput.png`` from its sweeps."""
    args = result.get("args", {})
    written = []
    runs = result.get("runs", []) + [p for p in result.get("sweep", [])]
    if runs:
        written.append(latency_cdfs(runs, stem.with_name(stem.name + "_latency_cdf.png"),
                                    args.get("ttft_target_ms"), args.get("itl_target_ms")))
    by_concurrency = [p for p in result.get("sweep", []) if p.get("rate") is None]
    if len(by_concurrency) > 1:
        written.append(throughput_vs_concurrency(by_concurrency, stem.with_name(stem.name + "_concurrency.png")))
    by_rate = [p for p in result.get("sweep", []) if p.get("rate") is not None]
    if len(by_rate) > 1:
        written.append(goodput_vs_rate(by_rate, stem.with_name(stem.name + "_goodput.png")))
    return written


# ---- bench/gpu.py and bench/gpu_kernels.py ---------------------------------------------------------


def gpu_decode_steps(decode: list[dict[str, Any]], path: Path, device: str = "") -> Path:
    """``bench/gpu.py``'s decode steps: step time against context, a line per batch; and the
    fraction of HBM copy bandwidth the step (solid) and its forward alone (dashed) reach."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    by_batch: dict[int, list[dict[str, Any]]] = {}
    for row in decode:
        by_batch.setdefault(row["batch"], []).append(row)
    for batch, rows in sorted(by_batch.items()):
        rows = sorted(rows, key=lambda r: r["context"])
        ctx = [r["context"] for r in rows]
        (line,) = a.plot(ctx, [r["step_ms"] for r in rows], marker="o", label=f"batch {batch}")
        b.plot(ctx, [r["hbm_fraction"] for r in rows], marker="o", color=line.get_color(), label=f"batch {batch}")
        b.plot(ctx, [r["forward_hbm_fraction"] for r in rows], linestyle="--", color=line.get_color())
    a.set(title=f"decode step {device}".strip(), xlabel="context tokens", ylabel="ms per step", xscale="log")
    top = max([1.0] + [r[k] for r in decode for k in ("hbm_fraction", "forward_hbm_fraction")])
    b.set(title="fraction of HBM bandwidth (dashed: forward only)", xlabel="context tokens",
          ylabel="bytes moved / step time / copy bandwidth", xscale="log", ylim=(0, 1.05 * top))
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def gpu_generate(result: dict[str, Any], path: Path) -> Path:
    """``bench/gpu.py``'s generate throughput per batch: tandem against transformers, and tandem's
    synchronous against its asynchronous step (``generate_modes``)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    rows = result.get("generate", [])
    xs = range(len(rows))
    a.bar([x - 0.2 for x in xs], [r["tandem_tok_s"] for r in rows], width=0.4, label="tandem")
    if any(r["transformers_tok_s"] for r in rows):  # None: --skip-hf
        a.bar([x + 0.2 for x in xs], [r["transformers_tok_s"] or 0 for r in rows], width=0.4, label="transformers")
    a.set_xticks(list(xs), [f"batch {r['batch']}" for r in rows])
    a.set(title="generate", ylabel="output tokens / s")
    modes = result.get("generate_modes", {})
    batches = sorted({int(k) for by_batch in modes.values() for k in by_batch})
    for k, (mode, by_batch) in enumerate(sorted(modes.items())):
        values = {int(key): v for key, v in by_batch.items()}  # JSON keys are strings
        b.bar([x + (k - 0.5) * 0.4 for x in range(len(batches))], [values.get(bt, 0) for bt in batches], width=0.4,
              label=f"{mode} step")
    b.set_xticks(list(range(len(batches))), [f"batch {bt}" for bt in batches])
    b.set(title="tandem: sync vs async step", ylabel="output tokens / s")
    for ax in (a, b):
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def variant_grid(section: dict[str, Any], path: Path) -> Path:
    """One of ``bench/gpu_kernels.py``'s sections: a case (row) by variant (column) grid of the
    fraction of the ceiling each variant reaches (``values``; blank where it failed), each row's
    best outlined."""
    cases, variants = section["cases"], section["variants"]
    grid = [[math.nan if v is None else v for v in row] for row in section["values"]]
    fig, ax = plt.subplots(figsize=(max(5.0, 2.5 + 1.25 * len(variants)), max(3.0, 1.5 + 0.5 * len(cases))))
    ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i, row in enumerate(grid):
        finite = [v for v in row if not math.isnan(v)]
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=8,
                        color="white" if v < 0.6 else "black")
        if finite:
            best = row.index(max(finite))
            ax.add_patch(plt.Rectangle((best - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(cases)), cases, fontsize=8)
    ax.set_title(f"{section['title']}: {section['unit']}", fontsize=9)
    return _save(fig, path)


def gpu_figures(result: dict[str, Any], stem: Path) -> list[Path]:
    """Every figure of a ``bench/gpu.py`` JSON: ``<stem>_decode.png``, ``<stem>_generate.png``."""
    written = []
    if result.get("decode"):
        written.append(gpu_decode_steps(result["decode"], stem.with_name(stem.name + "_decode.png"),
                                        result.get("device", "")))
    if result.get("generate") or result.get("generate_modes"):
        written.append(gpu_generate(result, stem.with_name(stem.name + "_generate.png")))
    return written


def gpu_kernels_figures(result: dict[str, Any], stem: Path) -> list[Path]:
    """Every figure of a ``bench/gpu_kernels.py`` JSON: ``<stem>_<section>.png`` per section."""
    return [variant_grid(section, stem.with_name(f"{stem.name}_{name}.png"))
            for name, section in result.get("sections", {}).items() if section["cases"]]


def engine_cpu_time(result: dict[str, Any], path: Path) -> Path:
    """``bench/engine_cpu_time.py --json``: tokens per CPU-second per workload, tandem beside
    transformers, the ratio over each pair."""
    rows = result["engine_cpu_time"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = [float(i) for i in range(len(rows))]
    ours = [r["tokens"] / r["tandem_cpu_s"] for r in rows]
    ref = [r["tokens"] / r["transformers_cpu_s"] for r in rows]
    ax.bar([x - 0.2 for x in xs], ours, 0.4, label="tandem")
    ax.bar([x + 0.2 for x in xs], ref, 0.4, label="transformers")
    for x, o, r in zip(xs, ours, ref):
        ax.annotate(f"{o / r:.2f}x", (x, max(o, r)), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs, [r["workload"] for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("tokens per CPU-second (1 thread)")
    ax.set_title("engine work per CPU-second")
    ax.legend()
    return _save(fig, path)


# the gap's consecutive parts after the prefill's answer (bench/handoff_trace.py's segment names)
GAP_PARTS = ("P's prefill answered -> push starts (ahead)", "push at P", "pushed -> landed at D",
             "landed -> engine has it", "engine has it -> first launch", "first launch -> token applied",
             "token applied -> message sent", "message -> router")
GAP_TOTAL = "router: 1st -> 2nd token yielded"


def handoff_segments(report: dict[str, dict[str, Any]], path: Path) -> Path:
    """``bench/handoff_trace.py --json``'s report: per sweep point, the p50 of each part of the
    first-to-second-token gap stacked, beside the gap's own p50 (a dot)."""
    points = [(label, b) for label, b in report.items() if any(name in b for name in GAP_PARTS)]
    fig, ax = plt.subplots(figsize=(9, 3.2 + 0.55 * max(len(points), 1)))
    colors = plt.get_cmap("tab10").colors
    for row, (_, b) in enumerate(points):
        left = 0.0
        for i, name in enumerate(GAP_PARTS):
            width = b.get(name, {}).get("p50", 0.0)
            ax.barh(row, width, left=left, color=colors[i % len(colors)], label=name if row == 0 else None)
            left += width
        if GAP_TOTAL in b:
            ax.plot(b[GAP_TOTAL]["p50"], row, "ko", label="gap p50 (measured)" if row == 0 else None)
    ax.set_yticks(range(len(points)), [f"{label} ({b['num_requests']})" for label, b in points])
    ax.invert_yaxis()
    ax.set_xlabel("ms (p50 of each part, stacked)")
    ax.set_title("where the first-to-second-token gap goes")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3)
    return _save(fig, path)


def start_aborts(result: dict[str, Any], path: Path) -> Path:
    """``bench/start_abort.py --json``: per start, its time to ready (a bar; a start that died
    before ready is a red mark at the top, with its exit code) and its exit time after SIGTERM."""
    rows = result["starts"]
    summary = result["summary"]
    fig, (ax_ready, ax_exit) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    xs = [r["index"] for r in rows]
    ax_ready.bar(xs, [r.get("ready_s", 0.0) for r in rows], color="tab:blue", label="ready")
    top = max([r.get("ready_s", 0.0) for r in rows] + [1.0])
    died = [r for r in rows if r["outcome"] != "ok"]
    ax_ready.plot([r["index"] for r in died], [top] * len(died), "rv", label="died before ready")
    for r in died:
        ax_ready.annotate(f"{r['outcome']} {r.get('code', '')}", (r["index"], top), fontsize=7, rotation=90,
                          ha="center", va="top")
    ax_ready.set_ylabel("s to ready")
    ax_ready.legend(fontsize=8)
    ax_ready.set_title(f"{summary['starts']} starts, transport {summary['transport']}, spawner's gRPC "
                       f"{summary['spawner_grpc']}: {len(died)} died before ready")
    ax_exit.bar(xs, [r.get("exit_s", 0.0) for r in rows], color="tab:green")
    ax_exit.axhline(1.0, color="k", linestyle="--", linewidth=0.8)
    ax_exit.set_ylabel("s to exit after SIGTERM (idle)")
    ax_exit.set_xlabel("start")
    return _save(fig, path)


def figures(result: dict[str, Any], stem: Path) -> list[Path]:
    """The figures of any bench JSON this module knows the shape of."""
    if "starts" in result and "summary" in result:
        return [start_aborts(result, stem.with_suffix(".png"))]
    if "sections" in result:
        return gpu_kernels_figures(result, stem)
    if "hbm_copy_bytes_per_s" in result:
        return gpu_figures(result, stem)
    if "engine_cpu_time" in result:
        return [engine_cpu_time(result, stem.with_suffix(".png"))]
    if any(isinstance(b, dict) and "num_requests" in b for b in result.values()):
        return [handoff_segments(result, stem.with_suffix(".png"))]
    return serve_figures(result, stem)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", type=Path)
    p.add_argument("--out", type=Path, default=None, help="directory (default: beside the JSON)")
    args = p.parse_args(argv)
    stem = (args.out or args.json.parent) / args.json.stem
    for path in figures(json.loads(args.json.read_text()), stem):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
