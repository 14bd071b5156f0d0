"""The host tier on the GPU, bfloat16 (pinned host memory, copies queued on the stream, asynchronous
scheduling and CUDA graphs on): a shared prefix that other prompts evicted from a small device cache
comes back from the host tier, and the greedy tokens are those of an engine whose cache never
evicted it (the same KV, bit for bit, read back); the prompts' cached tokens count the reload.
(Equality with an engine without the tier, which recomputes the prefix in other batches, is
checked in float32 on the CPU: tests/engine/test_host_tier.py.)"""

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


def test_evicted_prefix_comes_back_from_pinned_host_memory(model_dir: Path) -> None:
    prompts = _prompts()
    kwargs = dict(device="cuda", dtype="bfloat16", max_num_seqs=4, max_model_len=512, progress=False)
    reference = LLM(str(model_dir), num_blocks=128, **kwargs)
    expected, cached = _serve(reference, prompts)
    assert cached == [0, 0, 0, 0, PREFIX, PREFIX]
    del reference

    llm = LLM(str(model_dir), num_blocks=DEVICE_BLOCKS, host_num_blocks=96, **kwargs)
    tier = llm.engine.host_tier
    assert tier is not None and tier.host.is_pinned() and llm.engine.async_scheduling
    tokens, cached = _serve(llm, prompts)
    assert cached == [0, 0, 0, 0, PREFIX, PREFIX]  # B loads the prefix back, C shares it
    assert llm.engine.block_manager.host_stats.num_loaded == PREFIX // BS == tier.num_loaded
    assert tokens == expected
