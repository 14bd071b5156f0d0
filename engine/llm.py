"""The offline API: ``LLM(model).generate(prompts, SamplingParams(...))``.

Text is handled here, above the token-in/token-out engine, with the same code the router
serves with (``text``): prompts are encoded, each sequence's tokens are detokenized as they
come, and a stop string found in the text finishes its sequence (``LLMEngine.stop_sequence``)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any

from tqdm import tqdm

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.llm_engine import LLMEngine, default_num_threads
from protocol.outputs import FinishReason, RequestOutput, StopReason, TokenLogprob
from protocol.sampling import SamplingParams
from text.detokenizer import IncrementalDetokenizer


@dataclass
class Completion:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: StopReason = None
    detok: IncrementalDetokenizer | None = field(default=None, repr=False, compare=False)


@dataclass
class GenerateResult:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[Completion]
    num_cached_tokens: int = 0


class LLM:
    def __init__(self, model: str = "default", *, dtype: str = "bfloat16", device: str = "cpu",
                 block_size: int = 16, num_blocks: int | None = None, kv_cache_bytes: int = 1 << 30,
                 enable_prefix_caching: bool = True, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, enable_chunked_prefill: bool = True,
                 max_model_len: int | None = None, seed: int = 0, num_threads: int | None = None,
                 progress: bool = True, gpu_memory_fraction: float = 0.9, host_kv_cache_bytes: int = 0,
                 host_num_blocks: int | None = None, **engine_kwargs: Any) -> None:
        config = EngineConfig(
            model=model, dtype=dtype, device=device, seed=seed, max_model_len=max_model_len,
            num_threads=num_threads or (default_num_threads() if device == "cpu" else None),
            cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, memory_bytes=kv_cache_bytes,
                              enable_prefix_caching=enable_prefix_caching, gpu_memory_fraction=gpu_memory_fraction,
                              host_memory_bytes=host_kv_cache_bytes, host_num_blocks=host_num_blocks),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                      enable_chunked_prefill=enable_chunked_prefill),
            **engine_kwargs,
        )
        self.engine = LLMEngine(config, progress=progress)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
        priorities: list[int] | None = None,
    ) -> list[GenerateResult]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("one SamplingParams per prompt, or one for all")
        results: dict[str, GenerateResult] = {}
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params_list)):
                rid = f"gen-{next(self._ids)}"
                results[rid] = self._add(rid, prompt, p, priorities[i] if priorities else 0)
        except ValueError:
            for rid in results:
                self.engine.abort(rid)
            raise
        bar = tqdm(total=sum(p.n for p in params_list), desc="generating", unit="seq", disable=not use_tqdm)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if self._apply(results[out.request_id], out):
                    bar.update(1)
        bar.close()
        return list(results.values())

    def _add(self, rid: str, prompt: str | list[int], p: SamplingParams, priority: int) -> GenerateResult:
        """Encode and queue one prompt (stop strings stay here: the engine sees token ids only)."""
        if self.tokenizer is None and (isinstance(prompt, str) or p.stop):
            raise ValueError("this model has no tokenizer: pass token ids, and no stop strings")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        self.engine.add_request(rid, ids, replace(p, stop=()), priority=priority)
        completions = [Completion(k) for k in range(p.n)]
        if self.tokenizer is not None:
            for c in completions:
                c.detok = IncrementalDetokenizer(self.tokenizer, p.stop, p.include_stop_str_in_output,
                                                 p.skip_special_tokens)
        return GenerateResult(rid, ids, completions)

    def _apply(self, res: GenerateResult, out: RequestOutput) -> bool:
        """Add a step's output to its completion; whether the completion is now finished."""
        c = res.outputs[out.index]
        if c.finish_reason is not None:  # stopped here by a stop string
            return False
        res.num_cached_tokens = out.num_cached_tokens
        for k, token in enumerate(out.new_token_ids):
            c.token_ids.append(token)
            if k < len(out.new_logprobs):
                c.logprobs.append(out.new_logprobs[k])
            stop = c.detok.add(token) if c.detok is not None else None
            if stop is not None:
                c.finish_reason, c.stop_reason = FinishReason.STOP, stop
                self.engine.stop_sequence(res.request_id, out.index, stop)
                break
        else:
            if out.finished:
                c.finish_reason, c.stop_reason = out.finish_reason, out.stop_reason
        if c.detok is not None:
            c.text += c.detok.delta(c.finish_reason is not None)
        return c.finish_reason is not None

    def chat(self, messages: list[dict[str, Any]], sampling_params: SamplingParams | None = None) -> GenerateResult:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer")
        ids = self.tokenizer.encode_chat(messages)
        return self.generate([ids], sampling_params)[0]
