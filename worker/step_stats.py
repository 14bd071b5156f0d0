"""A worker's step summary for the planner: what its engine did over the last metrics window,
published about once a second as a ``WorkerStepStats`` message under
``/tandem/{ns}/metrics/steps/{worker_id}`` (lease-bound).

The engine keeps totals since it started (``EngineLoad.step_time_s``, ``num_step_*``); a
:class:`StepWindow` differences the load it saw last time with the load now, so a window's means
are exact whatever the publishing jitter, and a window without steps has no means (unset fields).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from protocol.load import EngineLoad
from runtime.pb import tandem_control_pb2 as cpb
from runtime.pb import tandem_worker_pb2 as pb

ROLE_TO_PB = {"prefill": pb.WORKER_ROLE_PREFILL, "decode": pb.WORKER_ROLE_DECODE}
STATE_TO_PB = {"serving": cpb.WorkerStepStats.STATE_SERVING, "draining": cpb.WorkerStepStats.STATE_DRAINING,
               "switching": cpb.WorkerStepStats.STATE_SWITCHING}


class StepWindow:
    """Call :meth:`sample` once per window: the summary since the previous call."""

    def __init__(self, worker_id: str, block_size: int, load: Callable[[], EngineLoad],
                 role: Callable[[], str], state: Callable[[], str],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.worker_id = worker_id
        self.block_size = block_size
        self._load, self._role, self._state, self._clock = load, role, state, clock
        self._last = load()
        self._last_t = clock()

    def sample(self) -> cpb.WorkerStepStats:
        now, load = self._clock(), self._load()
        last, window_s = self._last, max(1e-9, now - self._last_t)
        self._last, self._last_t = load, now
        steps = load.num_steps - last.num_steps
        prefill = load.num_step_prefill_tokens - last.num_step_prefill_tokens
        decode = load.num_step_decode_tokens - last.num_step_decode_tokens
        msg = cpb.WorkerStepStats(
            worker_id=self.worker_id, role=ROLE_TO_PB[self._role()], state=STATE_TO_PB[self._state()],
            window_s=window_s, num_waiting=load.num_waiting + load.num_pulling, num_running=load.num_running,
            num_queued_prefill_tokens=load.num_queued_prefill_tokens,
            num_active_kv_tokens=load.num_active_blocks * self.block_size, kv_usage=load.kv_usage,
            num_steps=max(0, steps), tokens_per_s=max(0, prefill + decode) / window_s,
            decode_tokens_per_s=max(0, decode) / window_s,
            num_prompt_tokens=max(0, load.num_prompt_tokens - last.num_prompt_tokens),
            num_cached_tokens=max(0, load.num_cached_tokens - last.num_cached_tokens),
            pid=os.getpid(), published_at_unix_ms=int(time.time() * 1000))
        if steps > 0:
            msg.step_s = (load.step_time_s - last.step_time_s) / steps
            msg.step_prefill_tokens = prefill / steps
            msg.step_decode_tokens = decode / steps
            msg.step_kv_tokens = (load.num_step_kv_tokens - last.num_step_kv_tokens) / steps
        return msg
