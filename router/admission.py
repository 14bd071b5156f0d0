"""Admission control: a bound on the requests (and their prompt tokens) each tier has queued,
past which the router answers at once (429 / RESOURCE_EXHAUSTED with a retry-after) instead of
letting time to first token grow without limit.

A request is *queued* on the tier that computes its prompt (the prefill tier for a remote
prefill, else the decode tier) from its routing decision until its first token comes (or it
ends): that is the wait a new request would join. Running requests do not count: the workers'
own batch limits (``max_num_seqs``, the KV cache) bound them. Bounds are this router's; replicas
each keep their own. Pure bookkeeping, no I/O: :meth:`Admission.admit` is called on the event
loop, and the :class:`Permit` it returns is released exactly once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from router.errors import OverloadedError

_EWMA = 0.2  # weight of the newest queue wait in the retry-after estimate
_MAX_RETRY_AFTER_S = 30


@dataclass(frozen=True)
class AdmissionLimits:
    """Per tier: most queued requests and queued prompt tokens (0: no bound)."""

    max_queued_requests: int = 0
    max_queued_tokens: int = 0


@dataclass
class _Queue:
    num_requests: int = 0
    num_tokens: int = 0
    wait_s: float = 1.0  # moving average of admission -> first token
    num_rejected: int = 0


@dataclass
class Permit:
    """One admitted request's place in its tier's queue until :meth:`release` (first token, or end)."""

    queue: _Queue
    num_tokens: int
    admitted_at: float = field(default_factory=time.monotonic)
    released: bool = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.queue.num_requests -= 1
        self.queue.num_tokens -= self.num_tokens
        waited = time.monotonic() - self.admitted_at
        self.queue.wait_s += _EWMA * (waited - self.queue.wait_s)


class Admission:
    """The router's per-tier queues and their bounds."""

    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self.queues: dict[str, _Queue] = {}

    def admit(self, tier: str, num_prompt_tokens: int) -> Permit:
        """A permit, or OverloadedError when the tier's queue is full. A request larger than the
        token bound is admitted into an empty queue (it could never be otherwise)."""
        queue = self.queues.setdefault(tier, _Queue())
        limits = self.limits
        full = (limits.max_queued_requests and queue.num_requests >= limits.max_queued_requests) or \
            (limits.max_queued_tokens and queue.num_requests
             and queue.num_tokens + num_prompt_tokens > limits.max_queued_tokens)
        if full:
            queue.num_rejected += 1
            raise OverloadedError(
                f"the {tier} tier is overloaded ({queue.num_requests} requests, {queue.num_tokens} prompt tokens "
                f"queued); retry later", self.retry_after_s(tier))
        queue.num_requests += 1
        queue.num_tokens += num_prompt_tokens
        return Permit(queue, num_prompt_tokens)

    def retry_after_s(self, tier: str) -> int:
        """When a rejected request should come back: about one queue wait, 1..30 s."""
        queue = self.queues.get(tier)
        wait = queue.wait_s if queue is not None else 1.0
        return min(_MAX_RETRY_AFTER_S, max(1, math.ceil(wait)))

    def queued(self, tier: str) -> tuple[int, int]:
        """(requests, prompt tokens) queued on ``tier`` now."""
        queue = self.queues.get(tier)
        return (queue.num_requests, queue.num_tokens) if queue is not None else (0, 0)
