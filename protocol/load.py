"""A worker's load: its queues and KV cache, as its engine last saw them. Workers publish it in
etcd about once a second (``runtime.keys.worker_load_key``, as the ``Load`` message); the
router and the planner read it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineLoad:
    num_waiting: int = 0  # queued, not yet scheduled (those waiting for a KV pull are num_pulling)
    num_running: int = 0
    num_pulling: int = 0  # admitted, waiting for their prompt's KV from a prefill worker
    num_queued_prefill_tokens: int = 0
    num_active_blocks: int = 0  # blocks referenced by running requests (decode load)
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    num_pinned_blocks: int = 0
    kv_usage: float = 0.0
    num_prompt_tokens: int = 0  # since start: prompt tokens admitted / served from cache
    num_cached_tokens: int = 0
    num_steps: int = 0
    # Since start, summed over the engine's steps (a reader differences two samples for a
    # window's means: the planner's step summaries, ``worker/step_stats.py``).
    step_time_s: float = 0.0  # wall time inside ``LLMEngine.step``
    num_step_prefill_tokens: int = 0  # prompt tokens computed (prefill chunks, recomputes)
    num_step_decode_tokens: int = 0  # decode rows: one token each for a running sequence
    num_step_kv_tokens: int = 0  # KV tokens the decode rows attended to

    @property
    def num_requests(self) -> int:
        """Requests the worker holds: queued, pulling their KV, or running."""
        return self.num_waiting + self.num_pulling + self.num_running
