"""What both client APIs (OpenAI HTTP, KServe gRPC) do with a request before it is routed: its
sampling fields become :class:`SamplingParams` (one mapping, :func:`to_sampling`), and its prompt
is checked against the model's vocabulary and context (one check, :func:`check_prompt`). Errors
are :class:`RequestError` naming the field at fault, as the client spelled it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from protocol.sampling import SamplingParams
from router.errors import RequestError
from router.models import ServedModel

# Bounds on what one request may ask for (each breach is a 400 naming the field): the work a
# single request can make the cluster do, and what the router keeps per request.
MAX_SEQUENCES = 128  # n, or prompts x n in one completions request
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 256

# The sampling fields a request may carry, by their OpenAI/vLLM names (= SamplingParams' names),
# with the type a value is coerced to (None: a string or a list, normalized below).
SAMPLING_FIELDS: dict[str, type | None] = {
    "n": int, "max_tokens": int, "min_tokens": int, "temperature": float, "top_p": float, "top_k": int,
    "min_p": float, "seed": int, "repetition_penalty": float, "presence_penalty": float, "frequency_penalty": float,
    "ignore_eos": bool, "stop": None, "stop_token_ids": None, "include_stop_str_in_output": bool,
    "skip_special_tokens": bool, "logprobs": int,
}


def to_sampling(fields: Mapping[str, Any], names: Mapping[str, str] | None = None) -> SamplingParams:
    """SamplingParams from a request's sampling fields (absent or None: the default). ``names``
    maps a field to what the client called it (``max_tokens`` -> ``max_completion_tokens``), for
    the error's ``param``."""
    names = names or {}
    values: dict[str, Any] = {}
    for name, value in fields.items():
        if name not in SAMPLING_FIELDS:
            raise RequestError(f"unknown sampling parameter {name!r}", param=names.get(name, name))
        if value is not None:
            values[name] = _coerce(name, value, names.get(name, name))
    try:
        sampling = SamplingParams(**values)
    except (TypeError, ValueError) as e:  # the message starts with the field's name
        name = str(e).split(" ", 1)[0]
        raise RequestError(str(e), param=names.get(name, name) if name in fields else None) from None
    _check_bounds(sampling, names)
    return sampling


def _check_bounds(sampling: SamplingParams, names: Mapping[str, str]) -> None:
    if sampling.n > MAX_SEQUENCES:
        raise RequestError(f"n must be at most {MAX_SEQUENCES}, got {sampling.n}", param=names.get("n", "n"))
    param = names.get("stop", "stop")
    if len(sampling.stop) > MAX_STOP_STRINGS:
        raise RequestError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(sampling.stop)}", param=param)
    if any(len(s) > MAX_STOP_STRING_CHARS for s in sampling.stop):
        raise RequestError(f"a stop string may have at most {MAX_STOP_STRING_CHARS} characters", param=param)
    if len(sampling.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise RequestError(f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids",
                           param=names.get("stop_token_ids", "stop_token_ids"))


def _coerce(name: str, value: Any, param: str) -> Any:
    kind = SAMPLING_FIELDS[name]
    if name == "stop":
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list | tuple):
            raise RequestError(f"{param} must be a string or a list of strings, got {value!r}", param=param)
        return tuple(value)
    if name == "stop_token_ids":
        if not isinstance(value, list | tuple):
            raise RequestError(f"{param} must be a list of token ids, got {value!r}", param=param)
        return tuple(value)
    assert kind is not None
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if kind is bool or isinstance(value, bool | list | dict | tuple):
        raise RequestError(f"{param} must be of type {kind.__name__}, got {value!r}", param=param)
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise RequestError(f"{param} must be an integer, got {value!r}", param=param)
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise RequestError(f"{param} must be of type {kind.__name__}, got {value!r}", param=param) from None


def check_prompt(model: ServedModel, prompt_ids: list[int], max_tokens: int | None, *, prompt_param: str = "prompt",
                 max_tokens_param: str = "max_tokens") -> None:
    """The prompt is not empty, its ids are in the vocabulary, and it fits the model's context
    with ``max_tokens`` (None: at least one) more tokens."""
    if not prompt_ids:
        raise RequestError("the prompt is empty", param=prompt_param)
    vocab_size = model.tokenizer.vocab_size
    if any(not 0 <= t < vocab_size for t in prompt_ids):
        raise RequestError(f"prompt token ids must be in [0, {vocab_size})", param=prompt_param)
    limit, num_prompt = model.max_model_len, len(prompt_ids)
    total = num_prompt + (max_tokens or 1)
    if num_prompt >= limit or total > limit:
        raise RequestError(f"this model's maximum context length is {limit} tokens; the request needs {total} "
                           f"({num_prompt} in the prompt, {max_tokens or 1} to generate)",
                           param=prompt_param if num_prompt >= limit else max_tokens_param,
                           code="context_length_exceeded")


def prepare(model: ServedModel, prompt_ids: list[int], fields: Mapping[str, Any], *, prompt_param: str = "prompt",
            names: Mapping[str, str] | None = None) -> SamplingParams:
    """Check the prompt and build its sampling parameters: what a request needs to be routed."""
    names = names or {}
    if not prompt_ids:
        raise RequestError("the prompt is empty", param=prompt_param)
    sampling = to_sampling(fields, names)
    vocab_size = model.tokenizer.vocab_size
    if any(t >= vocab_size for t in sampling.stop_token_ids):
        raise RequestError(f"stop_token_ids must be in [0, {vocab_size})",
                           param=names.get("stop_token_ids", "stop_token_ids"))
    check_prompt(model, prompt_ids, sampling.max_tokens, prompt_param=prompt_param,
                 max_tokens_param=names.get("max_tokens", "max_tokens"))
    return sampling
