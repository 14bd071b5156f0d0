"""A request's state inside the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from protocol.outputs import FinishReason, TokenLogprob
from protocol.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    max_model_len: int = 1 << 30
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    # A child of an n > 1 request waits for its parent's prefill and then shares its blocks.
    parent: Request | None = None
    # Prefill tier: stop after the first token and keep the blocks pinned for a KV handle.
    prefill_only: bool = False

    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    # Tokens sampled by a launched step whose ids have not reached the host (0 or 1; 2 while the
    # next step is launched before the last one's tokens are read). Asynchronous scheduling only.
    num_inflight_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first schedule
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_preemptions: int = 0
    first_token_time: float | None = None
    # monotonic: its first scheduled step (a prefilled request: its KV landed and it had a seat)
    scheduled_time: float | None = None
    children: list[Request] = field(default_factory=list)
    # Chained hashes of the prompt's full blocks (the scheduler's block size), computed once when
    # first needed: which prompts share blocks a step is computing (Scheduler, shared prefixes).
    prompt_block_hashes: list[int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def max_total_tokens(self) -> int:
        limit = self.max_model_len
        if self.sampling.max_tokens is not None:
            limit = min(limit, self.num_prompt_tokens + self.sampling.max_tokens)
        return limit

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()

    def check_stop_token(self) -> FinishReason | None:
        """Stop on EOS / stop token ids / length, after the last appended token."""
        last = self.token_ids[-1]
        if self.num_output_tokens >= self.sampling.min_tokens:
            if not self.sampling.ignore_eos and last in self.eos_token_ids:
                self.stop_reason = None
                return FinishReason.STOP
            if last in self.sampling.stop_token_ids:
                self.stop_reason = last
                return FinishReason.STOP
        if self.num_tokens >= self.max_total_tokens:
            return FinishReason.LENGTH
        return None
