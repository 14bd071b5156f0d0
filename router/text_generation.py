"""Text generation on top of :class:`RequestFlow`: detokenization of each of the n sequences,
stop strings (matched on the router's text; the upstream request is aborted as soon as every
sequence has stopped), and usage counted from what the client actually gets. This is where
serving turns tokens into text: workers are token-in/token-out."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from protocol.outputs import FinishReason, StopReason, TokenLogprob
from protocol.sampling import SamplingParams
from router import metrics
from router.models import ServedModel
from router.request_flow import Delta, RequestFlow, Route, Usage
from router.request_window import WINDOW
from text.detokenizer import IncrementalDetokenizer


@dataclass
class ChoiceDelta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None  # "stop" | "length" | "abort" once finished


@dataclass
class Choice:
    index: int
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: StopReason = None
    upstream_finished: bool = False  # the worker ended the sequence (not a stop string seen here)

    @property
    def text(self) -> str:
        return self.detok.text


@dataclass
class GenerationResult:
    choices: list[Choice]
    usage: Usage
    route: Route


class Generation:
    """One prompt's n sequences of the served ``model``, streamed as :class:`ChoiceDelta` and summed
    up in ``result``. Its metrics are labelled with the model's name."""

    def __init__(self, flow: RequestFlow, model: ServedModel, prompt_ids: list[int], sampling: SamplingParams,
                 priority: int = 0, request_id: str | None = None) -> None:
        self.flow = flow
        self.model = model
        self.tokenizer = tokenizer = model.tokenizer
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.priority = priority
        self.request_id = request_id or uuid.uuid4().hex
        self.route = Route()
        self.choices = [Choice(i, IncrementalDetokenizer(tokenizer, sampling.stop, sampling.include_stop_str_in_output,
                                                         sampling.skip_special_tokens))
                        for i in range(sampling.n)]
        self.usage = Usage(num_prompt_tokens=len(prompt_ids))
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None
        self._last_token_time: float | None = None

    @property
    def requested_tokens(self) -> int:
        """The answer tokens it asks for at most, all sequences (0: max_tokens unset)."""
        return (self.sampling.max_tokens or 0) * self.sampling.n

    @property
    def result(self) -> GenerationResult:
        return GenerationResult(self.choices, self.usage, self.route)

    async def stream(self) -> AsyncIterator[ChoiceDelta]:
        upstream = self.flow.generate(self.request_id, self.prompt_ids, self.sampling, self.priority, self.route)
        WINDOW.arrived(len(self.prompt_ids), requested=self.requested_tokens)
        try:
            async for item in upstream:
                if isinstance(item, Usage):
                    self.usage.num_cached_tokens = item.num_cached_tokens
                    continue
                out = self._apply(item)
                if out is not None:
                    yield out
                # Every sequence done: stop reading (aborting upstream) unless the workers ended
                # them all themselves, in which case their Usage (cached tokens) comes next.
                if all(c.finish_reason is not None for c in self.choices) and \
                        not all(c.upstream_finished for c in self.choices):
                    break
        finally:
            await upstream.aclose()  # aborts the request upstream if it is still running
            self.usage.num_completion_tokens = sum(len(c.token_ids) for c in self.choices)
            ttft = None if self.first_token_time is None else self.first_token_time - self.arrival
            WINDOW.finished(len(self.prompt_ids), self.usage.num_completion_tokens, ttft,
                            time.perf_counter() - self.arrival, requested=self.requested_tokens)
        model = self.model.name
        metrics.PROMPT_TOKENS.labels(model).inc(self.usage.num_prompt_tokens)
        metrics.COMPLETION_TOKENS.labels(model).inc(self.usage.num_completion_tokens)
        metrics.E2E.labels(model).observe(time.perf_counter() - self.arrival)

    def _apply(self, delta: Delta) -> ChoiceDelta | None:
        choice = self.choices[delta.index]
        if delta.finish_reason is not None:
            choice.upstream_finished = True
        if choice.finish_reason is not None:
            return None
        now = time.perf_counter()
        if delta.token_ids:
            if self.first_token_time is None:
                self.first_token_time = now
                metrics.TTFT.labels(self.model.name).observe(now - self.arrival)
            elif self._last_token_time is not None:
                metrics.ITL.labels(self.model.name).observe((now - self._last_token_time) / len(delta.token_ids))
            self._last_token_time = now
        new_ids: list[int] = []
        new_logprobs: list[TokenLogprob] = []
        finish: str | None = None
        for k, token in enumerate(delta.token_ids):
            new_ids.append(token)
            if k < len(delta.logprobs):
                new_logprobs.append(delta.logprobs[k])
            stop = choice.detok.add(token)
            if stop is not None:
                finish, choice.stop_reason = "stop", stop
                break
        if finish is None and delta.finish_reason is not None:
            finish = delta.finish_reason.value if delta.finish_reason is not FinishReason.ABORT else "abort"
            choice.stop_reason = delta.stop_reason
        choice.token_ids += new_ids
        choice.logprobs += new_logprobs
        choice.finish_reason = finish
        text = choice.detok.delta(finish is not None)
        if not text and not new_ids and finish is None:
            return None
        return ChoiceDelta(choice.index, text, new_ids, new_logprobs, finish)


async def merge(gens: list[Generation]) -> AsyncIterator[tuple[int, ChoiceDelta]]:
    """Interleave several generations' deltas as they come, as (generation index, delta);
    failures are raised."""
    if len(gens) == 1:
        async for d in gens[0].stream():
            yield 0, d
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, g: Generation) -> None:
        try:
            async for d in g.stream():
                await queue.put((i, d))
        except BaseException as e:
            await queue.put(e)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        done = 0
        while done < len(tasks):
            item = await queue.get()
            if item is None:
                done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(gens: list[Generation]) -> None:
    """Run the generations to their end (their results are on each one)."""
    async for _ in merge(gens):
        pass
