"""The engine loop: requests in, token/text deltas out. One ``step()`` = schedule, execute,
update, detokenize. Used by the offline API and by the workers.

With asynchronous scheduling (``EngineConfig.async_scheduling``, on by default on CUDA) a step
overlaps the host's work with the device's: ``step()`` plans and launches step N+1 first (its
in-flight decodes read their input ids from step N's sampled tokens on the device), then waits
for step N's tokens and applies them (scheduler update, stop checks, detokenization, outputs),
while the device runs N+1. So ``step()`` returns the outputs of the step launched by the call
before it. Outputs are token for token those of the synchronous engine: a request found finished
at step N (EOS, a stop token or string) gets no token from the row N+1 computed for it, and
nothing is planned for a token certain to be the last. Where a launch needs step N's tokens on
the host (repetition/presence/frequency penalties of a request sampled at N), step N is applied
first: that step runs synchronously. A pull into this engine's blocks (``add_prefilled``) first
waits for the launched step: a freed block may still take its write."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch

from engine.block_manager import BlockManager, KVEvent
from engine.config import EngineConfig
from engine.loader import read_arch, resolve_model
from engine.model_runner import ModelRunner, StepHandle
from engine.request import FinishReason, Request, TokenLogprob
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.tokenizer import IncrementalDetokenizer, TextTokenizer


@dataclass
class RequestOutput:
    """What one step produced for one sequence (``index`` is its place among n > 1)."""

    request_id: str
    index: int
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprob]
    finished: bool
    finish_reason: FinishReason | None
    stop_reason: str | int | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int


@dataclass
class _Tracked:
    request: Request
    group_id: str
    index: int
    detok: IncrementalDetokenizer | None
    num_sent: int = 0
    logprobs_sent: int = 0
    done: bool = False
    extra: dict = field(default_factory=dict)


def load_tokenizer(config: EngineConfig) -> TextTokenizer | None:
    fmt, path, _ = resolve_model(config)
    if fmt == "dummy" or path is None:
        return None
    if fmt == "gguf":
        from engine.gguf_file import GGUFFile

        return TextTokenizer.from_gguf(GGUFFile(path).metadata)
    if (path / "tokenizer.json").exists():
        return TextTokenizer.from_dir(path)
    return None


class LLMEngine:
    def __init__(self, config: EngineConfig, progress: bool = True) -> None:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.arch = read_arch(config)
        self.tokenizer = load_tokenizer(config)
        max_len = min(self.arch.max_position_embeddings, config.max_model_len or 1 << 30)
        eos = self.tokenizer.eos_token_ids if self.tokenizer else ()
        self.eos_token_ids = tuple(dict.fromkeys((*eos, *self.arch.eos_token_ids)))
        if config.backend == "sim":
            from engine.sim import SimRunner

            self.runner = SimRunner(config, self.arch, max_len, eos_token_ids=self.eos_token_ids)
        else:
            self.runner = ModelRunner(config, self.arch, max_len, progress=progress)
        self.block_manager = BlockManager(self.runner.num_blocks, config.cache.block_size,
                                          config.cache.enable_prefix_caching)
        # A lone request must always fit in the cache, so the context is capped by it too.
        self.max_model_len = min(max_len, self.runner.num_blocks * config.cache.block_size)
        if not config.scheduler.enable_chunked_prefill:
            # Unchunked, a prompt (or a preempted sequence's recompute) must fit one step's budget.
            self.max_model_len = min(self.max_model_len, config.scheduler.max_num_batched_tokens)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self._tracked: dict[str, _Tracked] = {}
        self._groups: dict[str, list[str]] = {}
        self.num_steps = 0
        # May be switched between steps (a benchmark compares both in one process).
        self.async_scheduling = config.use_async_scheduling
        # The launched step whose tokens the host has not applied yet (asynchronous scheduling).
        self._inflight: tuple[SchedulerOutput, StepHandle] | None = None

    # ---- requests ------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        sampling: SamplingParams | None = None,
        priority: int = 0,
        prefill_only: bool = False,
    ) -> None:
        """Queue a request. Bad input raises ValueError and changes nothing.

        ``prefill_only`` (prefill tier): the request stops after its first token and its
        blocks stay pinned until :meth:`unpin`; its last output has ``finish_reason`` None
        unless it genuinely finished (EOS, max_tokens=1)."""
        sampling = sampling or SamplingParams()
        if prefill_only and sampling.n != 1:
            raise ValueError("prefill-only requests take n = 1")
        prompt_ids = self._validate(request_id, prompt, sampling)
        ids = [request_id] if sampling.n == 1 else [f"{request_id}#{i}" for i in range(sampling.n)]
        requests = []
        for i, rid in enumerate(ids):
            params = sampling
            if sampling.n > 1:
                seed = None if sampling.seed is None else sampling.seed + i
                params = replace(sampling, n=1, seed=seed)
            requests.append(Request(rid, prompt_ids, params, self.eos_token_ids, self.max_model_len, priority,
                                    prefill_only=prefill_only))
        parent = requests[0]
        for child in requests[1:]:
            child.parent = parent
            parent.children.append(child)
        self.scheduler.add_request(parent)
        self._groups[request_id] = ids
        for i, r in enumerate(requests):
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, sampling.stop, sampling.include_stop_str_in_output,
                                               sampling.skip_special_tokens)
            self._tracked[r.request_id] = _Tracked(r, request_id, i, detok)

    def add_prefilled(self, request_id: str, prompt_ids: list[int], first_token: int,
                      sampling: SamplingParams, priority: int = 0) -> list[int] | None:
        """Admit a request whose prompt was prefilled on another worker, which sampled
        ``first_token``. Returns the indices of prompt blocks to pull into
        ``block_manager.block_table(request_id)`` (then call :meth:`kv_ready`), or None when
        the prompt will be recomputed here instead."""
        if sampling.n != 1:
            raise ValueError("a prefilled request takes n = 1")
        prompt_ids = self._validate(request_id, prompt_ids, sampling)
        request = Request(request_id, prompt_ids, sampling, self.eos_token_ids, self.max_model_len, priority)
        request.append_token(first_token)
        self.wait_for_device()  # the pull must not race a launched step's write into a freed block
        self._groups[request_id] = [request_id]
        detok = None
        if self.tokenizer is not None and sampling.stop:
            detok = IncrementalDetokenizer(self.tokenizer, sampling.stop, sampling.include_stop_str_in_output,
                                           sampling.skip_special_tokens)
            detok.add(first_token)
        tracked = self._tracked[request_id] = _Tracked(request, request_id, 0, detok)
        tracked.num_sent = 1  # the first token already went out from the prefill tier
        return self.scheduler.add_prefilled(request)

    def kv_ready(self, request_id: str, ok: bool) -> None:
        self.scheduler.kv_ready(request_id, ok)

    def unpin(self, request_id: str) -> bool:
        return self.scheduler.unpin(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    def wait_for_device(self) -> None:
        """Until the device has run every launched step (its tokens stay to be applied)."""
        if self._inflight is not None:
            self._inflight[1].wait()

    def _validate(self, request_id: str, prompt: str | list[int], sampling: SamplingParams) -> list[int]:
        if request_id in self._groups or request_id in self.scheduler.pinned:
            raise ValueError(f"duplicate request id {request_id!r}")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids")
            prompt_ids = self.tokenizer.encode(prompt)
        else:
            prompt_ids = [int(t) for t in prompt]
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if any(t < 0 or t >= self.arch.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.arch.vocab_size})")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is {self.max_model_len} "
                f"tokens and at least one must be left to generate"
            )
        if sampling.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        return prompt_ids

    def abort(self, request_id: str) -> None:
        """Abort a request (all n of its sequences); its blocks are freed at once."""
        for rid in self._groups.pop(request_id, []):
            self.scheduler.abort(rid)
            self.runner.sampler.forget(rid)
            self._tracked.pop(rid, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def take_kv_events(self) -> list[KVEvent]:
        return self.block_manager.take_events()

    # ---- the loop --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        prev, self._inflight = self._inflight, None
        outputs: list[RequestOutput] = []
        if prev is not None and (not self.async_scheduling or self._needs_host_tokens(prev[0])):
            outputs += self._apply(*prev)
            prev = None
        output = self.scheduler.schedule()
        tables = {s.request.request_id: self.block_manager.block_table(s.request.request_id)
                  for s in output.scheduled}
        handle = self.runner.launch(output, tables, prev[1] if prev is not None else None)
        self.scheduler.on_launch(output)
        self.num_steps += 1
        if prev is not None:  # the device runs the new step meanwhile
            outputs += self._apply(*prev)
        if handle is None or not self.async_scheduling:
            outputs += self._apply(output, handle)
        else:
            self._inflight = (output, handle)
        return outputs

    @staticmethod
    def _needs_host_tokens(output: SchedulerOutput) -> bool:
        """Whether planning the next step needs this step's tokens on the host: the sampler's
        penalties read every token of a request."""
        return any(r.sampling.has_penalties for r, _ in output.sample_rows)

    def _apply(self, output: SchedulerOutput, handle: StepHandle | None) -> list[RequestOutput]:
        """Wait for a launched step's tokens and apply them: scheduler update, stop strings, outputs."""
        sampled = handle.result() if handle is not None else {}
        updated = self.scheduler.update_from_output(output, sampled)
        outputs = []
        for request in updated:
            tracked = self._tracked.get(request.request_id)
            if tracked is None:
                continue
            if tracked.detok is not None:
                stop = tracked.detok.add(request.token_ids[-1])
                if stop is not None and not request.is_finished:
                    request.stop_reason = stop
                    self.scheduler.finish(request, FinishReason.STOP)
            outputs.append(self._output(tracked))
        return outputs

    def _output(self, t: _Tracked) -> RequestOutput:
        r = t.request
        new_ids = r.output_token_ids[t.num_sent:]
        t.num_sent = r.num_output_tokens
        new_logprobs = r.logprobs[t.logprobs_sent:]
        t.logprobs_sent = len(r.logprobs)
        finished = r.is_finished
        text = t.detok.delta(finished) if t.detok is not None else ""
        if finished:
            self.runner.sampler.forget(r.request_id)
            self._tracked.pop(r.request_id, None)
            group = self._groups.get(t.group_id)
            if group is not None and all(rid not in self._tracked for rid in group):
                del self._groups[t.group_id]
        return RequestOutput(
            request_id=t.group_id, index=t.index, new_token_ids=new_ids, new_text=text,
            new_logprobs=new_logprobs, finished=finished, finish_reason=r.finish_reason,
            stop_reason=r.stop_reason, num_prompt_tokens=r.num_prompt_tokens,
            num_output_tokens=r.num_output_tokens, num_cached_tokens=r.num_cached_tokens,
        )


def default_num_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
