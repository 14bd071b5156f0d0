"""OpenAI request bodies (with vLLM-style extra sampling fields), validated by pydantic, and
their sampling fields by name (``router.request_params`` turns them into SamplingParams).

The sampling fields' ranges are declared in the OpenAPI schema (``_range``: what schemathesis and
clients read) but checked by ``router.request_params``, whose 400 names the field as the client
spelled it; pydantic checks types only."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from protocol.sampling import INT32_MAX, INT64_MAX, INT64_MIN, UINT32_MAX
from router.request_params import MAX_SEQUENCES, MAX_STOP_TOKEN_IDS


def _range(default: Any, **bounds: int) -> Any:
    """A field whose schema declares ``bounds`` (minimum, maximum, exclusiveMinimum, maxItems),
    as exact integers, without pydantic checking them."""
    return Field(default, json_schema_extra=lambda schema: schema.update(bounds))


TokenId = Annotated[int, WithJsonSchema({"type": "integer", "minimum": 0, "maximum": UINT32_MAX})]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error the HTTP API answers (``router.http_io.APIError.body``), as OpenAI's."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class _Common(BaseModel):
    # strict: a value is of the type the schema says (0 is not false, "4" not 4, 1.0 not 1); ints
    # are still numbers
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    n: int = _range(1, minimum=1, maximum=MAX_SEQUENCES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = _range(None, minimum=0)
    top_p: float | None = _range(None, exclusiveMinimum=0, maximum=1)
    stop: str | list[str] | None = None
    seed: int | None = _range(None, minimum=INT64_MIN, maximum=INT64_MAX)
    presence_penalty: float = _range(0.0, minimum=-2, maximum=2)
    frequency_penalty: float = _range(0.0, minimum=-2, maximum=2)
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # extras, as vLLM names them
    top_k: int = _range(0, minimum=-1, maximum=INT32_MAX)
    min_p: float = _range(0.0, minimum=0, maximum=1)
    repetition_penalty: float = _range(1.0, exclusiveMinimum=0)
    min_tokens: int = _range(0, minimum=0, maximum=UINT32_MAX)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = _range(None, maxItems=MAX_STOP_TOKEN_IDS)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0

    def unsupported(self) -> str | None:
        if self.logit_bias:
            return "logit_bias"
        return None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = _range(16, minimum=1, maximum=UINT32_MAX)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> str | None:
        if self.suffix:
            return "suffix"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of"
        return super().unsupported()


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = _range(None, minimum=1, maximum=UINT32_MAX)
    max_completion_tokens: int | None = _range(None, minimum=1, maximum=UINT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True

    def unsupported(self) -> str | None:
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format"
        if self.tools:
            return "tools"
        return super().unsupported()

    def rendered_messages(self) -> list[dict[str, Any]]:
        """Messages as the chat template expects them: text parts joined into one string."""
        out = []
        for m in self.messages:
            content = m.content
            if isinstance(content, list):
                texts = []
                for part in content:
                    if part.get("type") != "text":
                        raise ValueError(f"message content of type {part.get('type')!r} is not supported")
                    texts.append(str(part.get("text", "")))
                content = "".join(texts)
            role = "system" if m.role == "developer" else m.role
            out.append({"role": role, "content": content or ""})
        return out


def sampling_fields(req: CompletionRequest | ChatCompletionRequest, max_tokens: int | None) -> dict[str, Any]:
    """The request's sampling fields, named as ``router.request_params.SAMPLING_FIELDS``."""
    if isinstance(req, ChatCompletionRequest):
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        logprobs = req.logprobs
    return dict(
        n=req.n, max_tokens=max_tokens, min_tokens=req.min_tokens, temperature=req.temperature, top_p=req.top_p,
        top_k=req.top_k, min_p=req.min_p, seed=req.seed, repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, stop=req.stop,
        stop_token_ids=req.stop_token_ids, include_stop_str_in_output=req.include_stop_str_in_output,
        ignore_eos=req.ignore_eos, logprobs=logprobs, skip_special_tokens=req.skip_special_tokens,
    )
