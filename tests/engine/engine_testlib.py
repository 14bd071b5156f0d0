"""Helpers for the engine tests: tiny random HF models, random prompts, and HF transformers'
greedy reference.

Tiny models get weights with a large std (and non-trivial norm weights and biases) so their
logits are far from flat: greedy ties cannot flip on float32 rounding, and a wrong rotary,
GQA mapping, bias or norm changes the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.llm import LLM

VOCAB = 512

# name -> (config class name, config kwargs, save kwargs)
TINY_CONFIGS: dict[str, tuple[str, dict, dict]] = {
    # Llama: untied embeddings, GQA (4 query heads over 2 KV heads).
    "llama": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                  rope_theta=10000.0), {}),
    # Llama 3.1 style: llama3 rope scaling whose original context (64) is shorter than the
    # prompts, so high, medium and low frequency bands are all exercised; a non-default theta;
    # saved as several safetensors shards.
    "llama3-rope": ("LlamaConfig", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=5000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64),
    ), dict(max_shard_size="200KB")),
    # Qwen2: q/k/v bias, tied embeddings, a single KV head.
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                                  rope_theta=20000.0), {}),
    # Qwen3: RMSNorm on q and k per head, head_dim * heads != hidden size.
    "qwen3": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                  tie_word_embeddings=False, rope_theta=10000.0), {}),
}


@dataclass
class TinyModel:
    name: str
    path: Path
    hf_model: torch.nn.Module


def build_tiny(name: str, path: Path) -> TinyModel:
    import transformers

    cls_name, kwargs, save_kwargs = TINY_CONFIGS[name]
    config = getattr(transformers, cls_name)(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, **kwargs,
    )
    torch.manual_seed(0)
    model_cls = getattr(transformers, cls_name.replace("Config", "ForCausalLM"))
    model = model_cls(config).eval()
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(path, **save_kwargs)
    return TinyModel(name, path, model)


def make_tiny_llm(path: str, **kwargs) -> LLM:
    kwargs.setdefault("num_blocks", 64)
    return LLM(path, dtype="float32", progress=False, **kwargs)


def random_prompts(lengths: list[int], vocab: int = VOCAB, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    # Skip the low ids (BOS/EOS live there in the tiny configs).
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


@torch.inference_mode()
def hf_greedy(
    model: torch.nn.Module, prompt: list[int], max_new_tokens: int
) -> tuple[list[int], list[torch.Tensor]]:
    """HF transformers' greedy continuation of one prompt (EOS ignored), with the log-softmax
    row of every step."""
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    tokens: list[int] = []
    rows: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        logits = out.logits[0, -1].float()
        token = int(logits.argmax())
        tokens.append(token)
        rows.append(torch.log_softmax(logits, dim=-1))
        if step + 1 < max_new_tokens:
            out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values,
                        use_cache=True)
    return tokens, rows
