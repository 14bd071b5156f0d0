"""A request's timeline across processes, for benchmarks: ``TANDEM_TRACE_DIR=DIR`` makes each
process append ``{"t": monotonic ns, "rid": request id, "ev": event}`` lines to ``DIR/<pid>.jsonl``
(CLOCK_MONOTONIC is one clock for every process of a machine). Unset (always, outside a
benchmark): ``mark`` is one attribute test. ``bench/handoff_trace.py`` joins the files.

Events of a disaggregated request, in order: ``r.plan`` (router), ``p.recv``, ``p.out``,
``p.ans`` (prefill worker), ``r.prefill_ans``, ``r.decode_call``, ``d.recv``, ``d.admitted``,
``p.pushkv``, ``p.pushed``, ``d.landed``, ``d.ready`` (the engine took the blocks),
``d.launch1`` (the first step computing it), ``d.out1`` (its token applied), ``d.msg1``,
``r.msg1`` (the router got it), ``r.first_yield`` / ``r.second_yield`` (handed to the client's
stream; a first token held: ``r.hold``, then ``r.msg1`` before ``r.first_yield``)."""

from __future__ import annotations

import json
import os
import threading
import time

_DIR = os.environ.get("TANDEM_TRACE_DIR", "")
enabled = bool(_DIR)
_lock = threading.Lock()
_file = None


def mark(request_id: str, event: str) -> None:
    """Record that ``event`` happened to ``request_id`` now (nothing unless tracing is on)."""
    if not enabled:
        return
    global _file
    line = json.dumps({"t": time.monotonic_ns(), "rid": request_id, "ev": event}) + "\n"
    with _lock:
        if _file is None:
            os.makedirs(_DIR, exist_ok=True)
            _file = open(os.path.join(_DIR, f"{os.getpid()}.jsonl"), "a", buffering=1)  # noqa: SIM115
        _file.write(line)
