"""The CPU fast paths change no result: bfloat16 weights prepacked for oneDNN give bit-identical
logprobs to plain ``F.linear`` (untied and tied LM heads, a q/k/v bias), over prefill, chunked
prefill on a cached prefix, and batched decodes of different lengths."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from engine_testlib import TinyModel, random_prompts

from engine.llm import LLM
from engine.loader import build_model
from engine.model import Linear
from protocol.sampling import SamplingParams


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_prepacked_bf16_weights_are_bit_identical(tiny_model: Callable[[str], TinyModel], name: str) -> None:
    path = str(tiny_model(name).path)
    kwargs = dict(dtype="bfloat16", num_blocks=64, max_num_batched_tokens=48, progress=False)
    packed, plain = LLM(path, **kwargs), LLM(path, **kwargs)
    runner = plain.engine.runner
    runner.model = build_model(runner.config, runner.arch, runner.arch.max_position_embeddings, progress=False,
                               prepack=False)
    if packed.engine.runner.model.lm_head_packed is None:
        pytest.skip("oneDNN's prepacked matmul is not bit-exact with F.linear on this CPU: not used here")
    linears = [m for m in packed.engine.runner.model.modules() if isinstance(m, Linear)]
    assert linears and all(m.packed is not None for m in linears)
    assert all(m.packed is None for m in runner.model.modules() if isinstance(m, Linear))

    # A shared 40-token prefix: the later prompts prefill on top of cached blocks, in 48-token chunks.
    prefix = random_prompts([40], seed=1)[0]
    prompts = [prefix + p for p in random_prompts([3, 30, 70], seed=2)] + random_prompts([5], seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
    for prompt in (prompts[0], None):  # the first prompt alone caches the prefix, then all of them
        batch = [prompt] if prompt is not None else prompts
        ours, ref = packed.generate(batch, params), plain.generate(batch, params)
        for a, b in zip(ours, ref):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            assert [lp.logprob for lp in a.outputs[0].logprobs] == [lp.logprob for lp in b.outputs[0].logprobs]
            assert [lp.top for lp in a.outputs[0].logprobs] == [lp.top for lp in b.outputs[0].logprobs]
    assert ours[1].num_cached_tokens >= 32


def test_prepack_leaves_float32_alone(tiny_model: Callable[[str], TinyModel]) -> None:
    llm = LLM(str(tiny_model("llama").path), dtype="float32", num_blocks=16, progress=False)
    model = llm.engine.runner.model
    assert model.lm_head_packed is None
    assert all(m.packed is None and m.weight.dtype == torch.float32 for m in model.modules() if isinstance(m, Linear))
