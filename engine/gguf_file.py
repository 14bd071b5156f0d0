"""Reading a llama.cpp GGUF file: architecture, dequantized weights in HF naming, tokenizer
metadata and chat template."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.config import ModelArch
from text.gguf import Header, TensorInfo, read_header

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
_ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
          "qwen3": "Qwen3ForCausalLM"}


@functools.lru_cache(maxsize=4)
def _header(path: str) -> Header:
    """Metadata and tensor table, read once per file and process (``text.gguf``: a fraction of
    a second, where ``gguf.GGUFReader`` takes seconds on a 49k-token vocabulary)."""
    return read_header(path)


class GGUFFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.header = _header(str(self.path.resolve()))

    @property
    def num_tensors(self) -> int:
        return len(self.header.tensors)

    @property
    def metadata(self) -> dict[str, Any]:
        return self.header.metadata

    def arch(self) -> ModelArch:
        md = self.metadata
        name = md["general.architecture"]
        if name not in _ARCHS:
            raise ValueError(f"unsupported GGUF architecture {name!r}")
        tensor_names = {t.name for t in self.header.tensors}
        num_heads = int(md[f"{name}.attention.head_count"])
        hidden = int(md[f"{name}.embedding_length"])
        vocab = md.get(f"{name}.vocab_size") or len(md["tokenizer.ggml.tokens"])
        cfg = {
            "architectures": [_ARCHS[name]],
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(md[f"{name}.feed_forward_length"]),
            "num_hidden_layers": int(md[f"{name}.block_count"]),
            "num_attention_heads": num_heads,
            "num_key_value_heads": int(md.get(f"{name}.attention.head_count_kv", num_heads)),
            "head_dim": int(md.get(f"{name}.attention.key_length", hidden // num_heads)),
            "rms_norm_eps": float(md[f"{name}.attention.layer_norm_rms_epsilon"]),
            "rope_theta": float(md.get(f"{name}.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(md.get(f"{name}.context_length", 4096)),
            "tie_word_embeddings": "output.weight" not in tensor_names,
            "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
        }
        return ModelArch.from_hf(cfg)

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Dequantized float32 tensors in HF naming. llama.cpp stores Q and K with their rows
        permuted for its rotary layout; HF's rotate-half layout is restored here."""
        arch = self.arch()
        permuted = arch.architecture in ("llama", "mistral")  # llama.cpp permutes these only
        from gguf import quants

        raw = np.memmap(self.path, dtype=np.uint8, mode="r")
        for t in self.header.tensors:
            rows_cols = tuple(reversed(t.dims))
            data = quants.dequantize(_tensor_data(raw, t), t.ggml_type)
            data = np.asarray(data, dtype=np.float32).reshape(rows_cols)
            name = self.hf_name(t.name)
            if permuted and name.endswith("self_attn.q_proj.weight"):
                data = _unpermute(data, arch.num_heads)
            elif permuted and name.endswith("self_attn.k_proj.weight"):
                data = _unpermute(data, arch.num_kv_heads)
            yield name, torch.from_numpy(np.array(data, dtype=np.float32, order="C", copy=True))

    @staticmethod
    def hf_name(name: str) -> str:
        if name in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[name]
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
            return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
        raise ValueError(f"unexpected GGUF tensor {name!r}")


def _tensor_data(raw: np.ndarray, t: TensorInfo) -> np.ndarray:
    """The tensor's stored data as ``gguf.quants.dequantize`` takes it (what ``GGUFReader``
    gives): plain types as their numpy dtype in numpy's shape, quantized ones as bytes, each row
    its blocks' bytes."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    kind = GGMLQuantizationType(t.ggml_type)
    shape = tuple(reversed(t.dims))
    block_size, type_size = GGML_QUANT_SIZES[kind]
    num_bytes = int(np.prod(t.dims, dtype=np.int64)) * type_size // block_size
    data = raw[t.offset:t.offset + num_bytes]
    if len(data) != num_bytes:
        raise ValueError(f"GGUF tensor {t.name!r} runs past the end of the file")
    if kind.name in _PLAIN_TYPES:
        return data.view(_PLAIN_TYPES[kind.name]).reshape(shape)
    return data.reshape(quant_shape_to_byte_shape(shape, kind))


_PLAIN_TYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                "I32": np.int32, "I64": np.int64}


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
