"""What a step of the engine produces for one sequence: new token ids, their logprobs, and why
the sequence finished. Token ids only: text is the router's (and the offline API's) business."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"


StopReason = str | int | None  # the stop string or stop token id that finished a sequence; None for EOS


@dataclass
class TokenLogprob:
    """The sampled token's log-probability and the top alternatives (token id -> logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float]


@dataclass
class RequestOutput:
    """What one step produced for one sequence (``index`` is its place among n > 1)."""

    request_id: str
    index: int
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob]
    finished: bool
    finish_reason: FinishReason | None
    stop_reason: StopReason
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    # On a sequence's first output with tokens (None otherwise): its wait in the queue (arrival in
    # the engine to its first scheduled step) and its prefill (that step to its first token; None
    # when the first token came from elsewhere: a prefilled request handed over).
    queue_wait_s: float | None = None
    prefill_s: float | None = None
