"""The router's Python heap as tracemalloc counts it, for leak tests: with ``TANDEM_TRACE_HEAP=1``
in its environment the router traces its allocations from start-up and serves ``GET /debug/heap``:
the bytes its live Python objects hold (``traced_bytes``, after a full collection);
``?baseline=1`` keeps a snapshot of them to compare with later; ``?top=N`` adds the N allocation
sites (file:line) that grew most since that baseline (``grown_bytes``, ``grown_count``), or that hold
most when there is none.

Off by default: tracing costs every allocation some time and memory, and the route is not served
at all. RSS is a poor leak gauge for a Python server (the allocator keeps what the busiest moment
needed; it follows the connections open at a moment); the traced bytes between two idle moments,
per request served between them, is one (tests/hardening/test_outage_and_load.py)."""

from __future__ import annotations

import gc
import os
import tracemalloc
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

ENV = "TANDEM_TRACE_HEAP"
PATH = "/debug/heap"


def enabled() -> bool:
    return os.environ.get(ENV, "").strip().lower() not in ("", "0", "false", "no")


def start() -> None:
    """Trace from here on (one frame per allocation: the site, not the call chain)."""
    tracemalloc.start(1)


def routes() -> list[tuple[str, Callable]]:
    """The route (path, handler) when tracing is on; none otherwise."""
    return [(PATH, _HEAP.respond)] if enabled() else []


class _HeapTrace:
    def __init__(self) -> None:
        self.baseline: tracemalloc.Snapshot | None = None

    async def respond(self, request: Request) -> JSONResponse:
        gc.collect()  # what is garbage is not held
        current, peak = tracemalloc.get_traced_memory()
        body: dict[str, Any] = {"traced_bytes": current, "peak_bytes": peak}
        top = int(request.query_params.get("top", "0"))
        if request.query_params.get("baseline") or top > 0:
            snapshot = tracemalloc.take_snapshot()
            if top > 0:
                body["top"] = self._top(snapshot, top)
            if request.query_params.get("baseline"):
                self.baseline = snapshot
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    def _top(self, snapshot: tracemalloc.Snapshot, n: int) -> list[dict[str, Any]]:
        if self.baseline is None:
            return [{"site": _site(s.traceback), "bytes": s.size, "count": s.count}
                    for s in snapshot.statistics("lineno")[:n]]
        return [{"site": _site(d.traceback), "bytes": d.size, "count": d.count, "grown_bytes": d.size_diff,
                 "grown_count": d.count_diff} for d in snapshot.compare_to(self.baseline, "lineno")[:n]]


def _site(traceback: tracemalloc.Traceback) -> str:
    return f"{traceback[0].filename}:{traceback[0].lineno}"


_HEAP = _HeapTrace()
