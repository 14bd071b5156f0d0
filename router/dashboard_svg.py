"""The dashboard's charts, drawn here as SVG (the page loads nothing from elsewhere): line charts
of the router's 1 Hz samples (``router.dashboard.Dashboard.history``) with SLO lines."""

from __future__ import annotations

import itertools
import math
from html import escape
from typing import Any

W, H = 460, 170  # the chart's size in px
PAD_L, PAD_R, PAD_T, PAD_B = 46, 10, 22, 20
COLORS = ("#2b7bb9", "#e6862a", "#c0392b", "#27ae60", "#8e44ad")
SLO_COLOR = "#c0392b"


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.3g}"
    return f"{v:.2g}"


def line_chart(title: str, times: list[float], lines: list[tuple[str, list[float | None]]],
               hlines: list[tuple[str, float]] = (), y_max: float | None = None) -> str:
    """An SVG line chart: ``lines`` are (label, one value per time, None for a gap); ``hlines``
    are horizontal (label, value) lines such as an SLO target."""
    values = [v for _, vs in lines for v in vs if v is not None and math.isfinite(v)]
    top = y_max if y_max is not None else max([*values, *(v for _, v in hlines), 0.0]) * 1.1 or 1.0
    x0, x1, y0, y1 = PAD_L, W - PAD_R, H - PAD_B, PAD_T
    t0, t1 = (times[0], times[-1]) if times else (0.0, 1.0)
    span = max(t1 - t0, 1e-9)

    def x(t: float) -> float:
        return x0 + (t - t0) / span * (x1 - x0)

    def y(v: float) -> float:
        return y0 - min(max(v / top, 0.0), 1.0) * (y0 - y1)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
             f'role="img" aria-label="{escape(title)}">',
             f'<text x="{x0}" y="14" font-size="12" font-weight="bold">{escape(title)}</text>',
             f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#999"/>',
             f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="#999"/>']
    for frac in (0.0, 0.5, 1.0):
        v = top * frac
        parts.append(f'<text x="{x0 - 4}" y="{y(v) + 4:.1f}" font-size="10" text-anchor="end">{_fmt(v)}</text>')
    if times:
        parts.append(f'<text x="{x1}" y="{H - 5}" font-size="10" text-anchor="end">last {span:.0f} s</text>')
    for label, v in hlines:
        parts.append(f'<line class="slo" x1="{x0}" y1="{y(v):.1f}" x2="{x1}" y2="{y(v):.1f}" stroke="{SLO_COLOR}" '
                     f'stroke-dasharray="5,4"/><text x="{x1}" y="{y(v) - 3:.1f}" font-size="10" '
                     f'text-anchor="end" fill="{SLO_COLOR}">{escape(label)}</text>')
    legend_x = x0 + 8
    for k, (label, vs) in enumerate(lines):
        color = COLORS[k % len(COLORS)]
        segments: list[list[str]] = [[]]
        for t, v in zip(times, vs):
            if v is None or not math.isfinite(v):
                if segments[-1]:
                    segments.append([])
                continue
            segments[-1].append(f"{x(t):.1f},{y(v):.1f}")
        for seg in segments:
            if len(seg) == 1:
                cx, cy = seg[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{color}"/>')
            elif seg:
                parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{" ".join(seg)}"/>')
        parts.append(f'<text x="{legend_x}" y="{y1 + 10}" font-size="10" fill="{color}">{escape(label)}</text>')
        legend_x += 8 + 7 * len(label)
    parts.append("</svg>")
    return "".join(parts)


def _rates(history: list[dict[str, Any]], key: str) -> list[float | None]:
    out: list[float | None] = [None]
    for a, b in itertools.pairwise(history):
        dt = b["t"] - a["t"]
        out.append((b[key] - a[key]) / dt if dt > 0 else None)
    return out


def charts(history: list[dict[str, Any]], ttft_slo_ms: float, itl_slo_ms: float) -> dict[str, str]:
    """Every chart of the page, by name."""
    times = [s["t"] for s in history]
    roles = sorted({r for s in history for r in s["tiers"]})
    q = ("p50", "p90", "p99")

    def tier(key: str) -> list[tuple[str, list[float | None]]]:
        return [(role, [s["tiers"].get(role, {}).get(key) for s in history]) for role in roles]

    return {
        "ttft": line_chart("TTFT (ms)", times, [(p, [s["ttft_ms"][p] for s in history]) for p in q],
                           [(f"SLO {ttft_slo_ms:g} ms", ttft_slo_ms)]),
        "itl": line_chart("ITL (ms)", times, [(p, [s["itl_ms"][p] for s in history]) for p in q],
                          [(f"SLO {itl_slo_ms:g} ms", itl_slo_ms)]),
        "attainment": line_chart("SLO attainment", times,
                                 [(t, [s["attainment"][t] for s in history]) for t in ("ttft", "itl", "both")],
                                 y_max=1.0),
        "request_rate": line_chart("Requests / s", times, [("finished", _rates(history, "requests_total"))]),
        "tokens_per_s": line_chart("Generated tokens / s", times,
                                   [("tokens", _rates(history, "completion_tokens_total"))]),
        "kv_usage": line_chart("KV usage (mean of the tier)", times, tier("kv_usage"), y_max=1.0),
        "queue": line_chart("Queued requests", times, tier("waiting")),
        "running": line_chart("Running requests", times, tier("running")),
        "prefix_hit": line_chart("Prefix hit ratio", times,
                                 [(role, [s["prefix_hit_ratio"].get(role) for s in history]) for role in roles],
                                 y_max=1.0),
        "kv_handoff": line_chart("KV handoff (ms)", times,
                                 [(p, [s["kv_handoff_ms"][p] for s in history]) for p in ("p50", "p99")]),
    }
