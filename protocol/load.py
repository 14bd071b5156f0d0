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

    @property
    def num_requests(self) -> int:
        """Requests the worker holds: queued, pulling their KV, or running."""
        return self.num_waiting + self.num_pulling + self.num_running
