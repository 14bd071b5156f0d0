"""Parking the engine on a GPU (the launcher's warm pool, ``LLMEngine.park``): the device memory
goes back (the weights to pinned host memory, the KV cache and the CUDA graphs freed) and,
unparked, the engine's greedy output is what it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
transformers = pytest.importorskip("transformers")

from engine.llm import LLM  # noqa: E402
from protocol.sampling import SamplingParams  # noqa: E402

SMALL = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0, rope_theta=500000.0)
KV_BYTES = 256 << 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # sharper logits: a wrong greedy pick does not hide in the noise
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path


def _greedy(llm: LLM, prompts: list[list[int]]) -> list:
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0)
    return [r.outputs[0] for r in llm.generate(prompts, params)]


def test_a_parked_engine_gives_its_gpu_memory_back_and_decodes_the_same_unparked(model_dir: Path) -> None:
    llm = LLM(str(model_dir), device="cuda", dtype="bfloat16", kv_cache_bytes=KV_BYTES, progress=False)
    engine, runner = llm.engine, llm.engine.runner
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (7, 90, 300, 33)]
    before = _greedy(llm, prompts)
    weights = sum(t.numel() * t.element_size() for _, _, t in runner._device_tensors())
    kv_ptr, kv_bytes = runner.kv.data_ptr(), runner.kv.numel() * runner.kv.element_size()  # whole blocks
    assert runner.graphs is not None  # the decode steps ran as CUDA graphs
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()

    engine.park()
    assert engine.parked and runner.graphs is None
    assert all(t.device.type == "cpu" and t.is_pinned() for _, _, t in runner._device_tensors())
    # the KV cache and the weights are gone from the device, and the allocator gave its cache back
    assert torch.cuda.memory_allocated() <= allocated - kv_bytes - 0.9 * weights
    assert torch.cuda.memory_reserved() <= reserved - kv_bytes - 0.9 * weights
    with pytest.raises(RuntimeError, match="parked"):
        llm.generate(prompts[:1], SamplingParams(max_tokens=2))

    engine.unpark()
    assert not engine.parked and runner.graphs is not None
    assert all(t.device.type == "cuda" for _, _, t in runner._device_tensors())
    assert runner.kv.numel() * runner.kv.element_size() == kv_bytes
    print(f"\nKV cache at {kv_ptr:#x}, then {runner.kv.data_ptr():#x}; unpark: {runner.unpark_s}")
    after = _greedy(llm, prompts)
    for x, y in zip(before, after):
        assert x.token_ids == y.token_ids
        for lx, ly in zip(x.logprobs, y.logprobs):
            assert abs(lx.logprob - ly.logprob) < 1e-3, (lx, ly)
    # and again: a second park and unpark (into the pinned buffers of the first park)
    engine.park()
    engine.unpark()
    assert [o.token_ids for o in _greedy(llm, prompts)] == [o.token_ids for o in before]
