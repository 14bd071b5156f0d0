"""OpenAI request bodies (with vLLM-style extra sampling fields), validated by pydantic, and
their sampling fields by name (``router.request_params`` turns them into SamplingParams)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # extras, as vLLM names them
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0

    def unsupported(self) -> str | None:
        if self.logit_bias:
            return "logit_bias"
        return None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
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
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
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
