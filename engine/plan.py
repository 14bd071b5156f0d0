"""The plan of one engine step, and what it sampled: the scheduler's output (what the runner
executes) and its input back (``Scheduler.update_from_output``). Pure data, no torch.

A step samples a list of tokens per request: one today, several once a step can verify
speculated tokens; the scheduler appends them in order and stops a request at its first
finishing token."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.request import Request
from protocol.outputs import TokenLogprob


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # computed this step, from request.num_computed_tokens on
    sample: bool  # the step reaches the request's last token: sample the next one
    num_computed_after: int = 0  # the request's computed tokens once this step ran (set by on_launch)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    # (request, index into ``scheduled`` whose last-token logits it samples from). An n > 1
    # child samples its first token from its parent's row.
    sample_rows: list[tuple[Request, int]]
    block_copies: list[tuple[int, int]]  # (src, dst) blocks to copy before the forward pass
    preempted: list[Request] = field(default_factory=list)
    launched: bool = False  # on_launch counted its tokens
    joined: list[str] = field(default_factory=list)  # prefilled requests decoding here for the first time

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class SampledToken:
    token_id: int
    logprob: TokenLogprob | None = None


SampledTokens = dict[str, list[SampledToken]]  # request id -> the tokens the step sampled for it, in order
