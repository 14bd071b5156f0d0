"""The offline API: ``LLM(model).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.llm_engine import LLMEngine, default_num_threads
from engine.request import FinishReason, TokenLogprob
from engine.sampling_params import SamplingParams


@dataclass
class Completion:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None


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
                 progress: bool = True, **engine_kwargs: Any) -> None:
        config = EngineConfig(
            model=model, dtype=dtype, device=device, seed=seed, max_model_len=max_model_len,
            num_threads=num_threads or (default_num_threads() if device == "cpu" else None),
            cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, memory_bytes=kv_cache_bytes,
                              enable_prefix_caching=enable_prefix_caching),
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
        order = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params_list)):
                rid = f"gen-{next(self._ids)}"
                self.engine.add_request(rid, prompt, p, priority=priorities[i] if priorities else 0)
                tracked = self.engine._tracked[rid if p.n == 1 else f"{rid}#0"]
                results[rid] = GenerateResult(rid, list(tracked.request.prompt_token_ids),
                                              [Completion(k) for k in range(p.n)])
                order.append(rid)
        except ValueError:
            for rid in order:
                self.engine.abort(rid)
            raise
        total = sum(p.n for p in params_list)
        bar = tqdm(total=total, desc="generating", unit="seq", disable=not use_tqdm)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                res = results[out.request_id]
                c = res.outputs[out.index]
                c.text += out.new_text
                c.token_ids += out.new_token_ids
                c.logprobs += out.new_logprobs
                res.num_cached_tokens = out.num_cached_tokens
                if out.finished:
                    c.finish_reason, c.stop_reason = out.finish_reason, out.stop_reason
                    bar.update(1)
        bar.close()
        return [results[rid] for rid in order]

    def chat(self, messages: list[dict[str, Any]], sampling_params: SamplingParams | None = None) -> GenerateResult:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer")
        ids = self.tokenizer.encode_chat(messages)
        return self.generate([ids], sampling_params)[0]
