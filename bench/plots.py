"""The bench scripts' figures (matplotlib, PNG): latency CDFs, throughput against concurrency,
goodput against request rate (the DistServe-style curve). Each function takes the JSON the
scripts write (``bench/serve.py``'s runs: a ``label``, a ``summary`` and per-request ``requests``)
and writes one PNG; none shows a window.

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", type=Path)
    p.add_argument("--out", type=Path, default=None, help="directory (default: beside the JSON)")
    args = p.parse_args(argv)
    stem = (args.out or args.json.parent) / args.json.stem
    for path in serve_figures(json.loads(args.json.read_text()), stem):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
