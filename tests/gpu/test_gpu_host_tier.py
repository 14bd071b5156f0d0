"""The host tier on the GPU, bfloat16 (pinned host memory, copies on the tier's own copy stream,
asynchronous scheduling and CUDA graphs on): a shared prefix that other prompts evicted from a small
device cache comes back from the host tier, and the greedy tokens are those of an engine whose cache
never evicted it (the same KV, bit for bit, read back); the prompts' cached tokens count the reload.
With every batch of copies held back on the copy stream (a ~10 ms sleep queued there first), the
tokens are still right: the step after the copies waits for them (a step that read a load before
it landed, or wrote a block before its offload read it, changes them). A park keeps the tier: the
woken engine loads the prefix back. (Equality with an engine without the tier, which recomputes the
prefix in other batches, is checked in float32 on the CPU: tests/engine/test_host_tier.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engine.llm import LLM  # noqa: E402
from protocol.sampling import SamplingParams  # noqa: E402

SMALL = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
             rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
BS = 16
PREFIX = 256  # 16 blocks
DEVICE_BLOCKS = 32  # 512 tokens: every fill evicts the prefix


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = transformers.LlamaConfig(**SMALL, rope_theta=500000.0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # sharper logits (tests/gpu/test_gpu_engine.py's LM_HEAD_SCALE)
        model.lm_head.weight.mul_(8.0)
    path = tmp_path_factory.mktemp("llama-host-tier")
    model.save_pretrained(path)
    return path


def _prompts() -> dict[str, list]:
    g = torch.Generator().manual_seed(5)

    def rand(n: int) -> list[int]:
        return torch.randint(3, 1000, (n,), generator=g).tolist()

    prefix = rand(PREFIX)
    return {"a": prefix + rand(20), "fill": [rand(400) for _ in range(3)], "b": prefix + rand(9),
            "c": prefix + rand(30)}


def _serve(llm: LLM, prompts: dict[str, list]) -> tuple[list[list[int]], list[int]]:
    tokens, cached = [], []
    for batch in [[prompts["a"]], *[[f] for f in prompts["fill"]], [prompts["b"], prompts["c"]]]:
        for r in llm.generate(batch, GREEDY):
            tokens.append(r.outputs[0].token_ids)
            cached.append(r.num_cached_tokens)
    return tokens, cached


KWARGS = dict(device="cuda", dtype="bfloat16", max_num_seqs=4, max_model_len=512, progress=False)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> list[list[int]]:
    expected, cached = _serve(LLM(str(model_dir), num_blocks=128, **KWARGS), _prompts())
    assert cached == [0, 0, 0, 0, PREFIX, PREFIX]
    return expected


def _tiered(model_dir: Path) -> LLM:
    llm = LLM(str(model_dir), num_blocks=DEVICE_BLOCKS, host_num_blocks=96, **KWARGS)
    tier = llm.engine.host_tier
    assert tier is not None and tier.host.is_pinned() and llm.engine.async_scheduling
    assert tier.stream is not None and tier.side_stream
    return llm


def test_evicted_prefix_comes_back_from_pinned_host_memory(model_dir: Path, reference: list[list[int]]) -> None:
    llm = _tiered(model_dir)
    tokens, cached = _serve(llm, _prompts())
    assert cached == [0, 0, 0, 0, PREFIX, PREFIX]  # B loads the prefix back, C shares it
    assert llm.engine.block_manager.host_stats.num_loaded == PREFIX // BS == llm.engine.host_tier.num_loaded
    assert tokens == reference


def test_the_next_step_waits_for_copies_held_back_on_the_copy_stream(model_dir: Path,
                                                                     reference: list[list[int]]) -> None:
    llm = _tiered(model_dir)
    tier = llm.engine.host_tier
    run, held = tier.run, []

    def late(copies, after_compute=False):  # every batch of copies starts ~10 ms late on its stream
        if copies:
            with torch.cuda.stream(tier.stream):
                torch.cuda._sleep(20_000_000)
            held.append(len(copies))
        return run(copies, after_compute)

    tier.run = late
    tokens, cached = _serve(llm, _prompts())
    assert held and cached == [0, 0, 0, 0, PREFIX, PREFIX]
    assert tokens == reference


def test_a_parked_engine_keeps_its_host_tier(model_dir: Path, reference: list[list[int]]) -> None:
    """Park (the device cache and graphs freed, the weights to pinned memory) and wake: the prefix
    evicted to the host tier before the park comes back from it, bit for bit."""
    from protocol.kv_events import BlockRemoved, Medium

    llm = _tiered(model_dir)
    prompts = _prompts()
    for batch in [[prompts["a"]], *[[f] for f in prompts["fill"]]]:
        llm.generate(batch, GREEDY)
    engine = llm.engine
    host_before = engine.kv_host_snapshot()
    engine.take_kv_events()
    engine.park()
    assert engine.runner.kv.untyped_storage().size() == 0  # the device cache is freed
    events = engine.take_kv_events()
    assert events and all(isinstance(e, BlockRemoved) and e.medium is Medium.DEVICE for e in events)
    engine.unpark()
    assert engine.kv_host_snapshot() == host_before and engine.host_tier.host.is_pinned()
    results = llm.generate([prompts["b"], prompts["c"]], GREEDY)
    assert [r.num_cached_tokens for r in results] == [PREFIX, PREFIX]
    assert [r.outputs[0].token_ids for r in results] == reference[-2:]
