"""Disaggregated equals aggregated at the engine level. A prompt prefilled on one engine
(``prefill_only``: first tokens sampled, blocks pinned), its KV copied into another engine's blocks
(``add_prefilled``, ``kv_ready``) and decoded there gives the tokens, logprobs (top alternatives
included) and finish reasons of one engine doing it all: greedy and seeded sampling, penalties,
``min_tokens`` with stop tokens, in one mixed batch, with the synchronous and the asynchronous
step, in float32 and bfloat16. (n > 1 is prefilled where it decodes: the router never hands it off.)

Seeded draws are seeded by position (``engine.sampler.draw_seed``): the decode engine's second
token must not reuse the draw that gave the first one on the prefill engine."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from engine_testlib import random_prompts

from engine.llm import LLM
from engine.llm_engine import LLMEngine
from protocol.outputs import FinishReason, RequestOutput
from protocol.sampling import SamplingParams


@dataclass
class Seq:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, dict[int, float]]] = field(default_factory=list)
    finish_reason: FinishReason | None = None

    def add(self, out: RequestOutput) -> None:
        self.token_ids += out.new_token_ids
        self.logprobs += [(lp.token_id, lp.logprob, lp.top) for lp in out.new_logprobs]
        if out.finished:
            self.finish_reason = out.finish_reason


Result = dict[tuple[str, int], Seq]  # (request id, sequence index) -> what it produced


def _collect(result: Result, outputs: list[RequestOutput]) -> list[RequestOutput]:
    for out in outputs:
        result.setdefault((out.request_id, out.index), Seq()).add(out)
    return outputs


def aggregated(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> Result:
    result: Result = {}
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", prompt, p)
    while engine.has_unfinished():
        _collect(result, engine.step())
    return result


def disaggregated(prefill: LLMEngine, decode: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]
                  ) -> Result:
    """Every prompt prefilled on ``prefill``, then handed to ``decode`` one by one (some join while
    others decode), as the two tiers do with a KV handle."""
    result: Result = {}
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        prefill.add_request(f"r{i}", prompt, p, prefill_only=True)
    firsts: dict[str, int] = {}
    while prefill.has_unfinished():
        for out in _collect(result, prefill.step()):
            assert out.finished and len(out.new_token_ids) == 1
            firsts[out.request_id] = out.new_token_ids[0]
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        rid = f"r{i}"
        if result[(rid, 0)].finish_reason is not None:
            assert not prefill.unpin(rid)  # nothing was pinned: nothing to hand off
            continue
        indices = decode.add_prefilled(rid, prompt, firsts[rid], p)
        assert indices is not None
        src, dst = prefill.block_table(rid), decode.block_table(rid)
        for k in indices:
            decode.runner.kv[dst[k]] = prefill.runner.kv[src[k]]
        decode.kv_ready(rid, True)
        assert prefill.unpin(rid)
        if i % 2:
            _collect(result, decode.step())
    while decode.has_unfinished():
        _collect(result, decode.step())
    for engine in (prefill, decode):
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return result


def assert_same(got: Result, want: Result) -> None:
    assert sorted(got) == sorted(want)
    for key, w in want.items():
        g = got[key]
        assert (g.token_ids, g.finish_reason) == (w.token_ids, w.finish_reason), key
        assert [t for t, _, _ in g.logprobs] == [t for t, _, _ in w.logprobs], key
        for (_, lp_g, top_g), (_, lp_w, top_w) in zip(g.logprobs, w.logprobs):
            assert lp_g == pytest.approx(lp_w, abs=1e-5), key
            assert top_g.keys() == top_w.keys() and all(top_g[t] == pytest.approx(top_w[t], abs=1e-5) for t in top_g)


def cases(stop_ids: list[int]) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=14, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.8, seed=11, max_tokens=14, ignore_eos=True, repetition_penalty=1.3,
                       presence_penalty=0.5, frequency_penalty=0.4, logprobs=1),
        # stop tokens the sequence meets early: ignored until min_tokens
        SamplingParams(temperature=1.0, top_k=40, seed=3, max_tokens=20, min_tokens=8, stop_token_ids=stop_ids),
        SamplingParams(temperature=0.8, seed=5, max_tokens=10, ignore_eos=True, logprobs=1),
        SamplingParams(temperature=0.7, seed=9, max_tokens=1),  # finished by its first token: no handoff
    ]


def engine(path: str, dtype: str, async_scheduling: bool) -> LLMEngine:
    return LLM(path, dtype=dtype, num_blocks=96, num_threads=1, progress=False,
               async_scheduling=async_scheduling).engine


def renamed(result: Result, rid: str) -> Result:
    return {(rid, k): seq for (_, k), seq in result.items()}


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_disaggregated_equals_aggregated(tiny_llama_path: str, dtype: str, async_scheduling: bool) -> None:
    """float32: all requests in one mixed batch on each side. bfloat16: one request at a time on
    each side, as the serving tests send them (a bfloat16 row's logits depend on the batch's shape
    on the CPU, in one engine as across two: that is no handoff's doing)."""
    prompts = random_prompts([37, 20, 45, 33, 50, 18], seed=5)
    # The min_tokens case stops on tokens its unconstrained run meets among its first ones.
    probe = SamplingParams(temperature=1.0, top_k=40, seed=3, max_tokens=8, ignore_eos=True)
    early = aggregated(engine(tiny_llama_path, dtype, False), [prompts[3]], [probe])[("r0", 0)].token_ids[1:4]
    params = cases(early)
    agg = engine(tiny_llama_path, dtype, False)
    prefill, decode = engine(tiny_llama_path, dtype, async_scheduling), engine(tiny_llama_path, dtype, async_scheduling)
    if dtype == "float32":
        want = aggregated(agg, prompts, params)
        got = disaggregated(prefill, decode, prompts, params)
    else:
        want, got = {}, {}
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            for engine_ in (agg, prefill, decode):
                engine_.reset_prefix_cache()
            want.update(renamed(aggregated(agg, [prompt], [p]), f"r{i}"))
            got.update(renamed(disaggregated(prefill, decode, [prompt], [p]), f"r{i}"))
    assert_same(got, want)
    assert len(want[("r3", 0)].token_ids) >= 8  # min_tokens held the stop tokens back
    assert want[("r5", 0)].finish_reason is FinishReason.LENGTH and len(want[("r5", 0)].token_ids) == 1


def test_issue_check_seed_7_on_smollm2_shape() -> None:
    """The issue's check: dummy SmolLM2-135M weights, seed 7, alone and beside another request."""
    prompt = list(range(100, 140))
    params = [SamplingParams(temperature=0.8, seed=7, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=8, max_tokens=6, ignore_eos=True)]

    def make() -> LLMEngine:
        return LLM("dummy:smollm2-135m", dtype="float32", num_blocks=32, num_threads=1, progress=False).engine

    want = aggregated(make(), [prompt, prompt[::-1]], params)
    got = disaggregated(make(), make(), [prompt, prompt[::-1]], params)
    assert_same(got, want)
    assert len(set(want[("r0", 0)].token_ids[:2])) == 2  # (the bug: the second token repeated the first)
