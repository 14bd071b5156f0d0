"""Attention over the paged KV cache.

The KV cache of a worker is ONE tensor ``kv`` of shape
``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``: one block (every layer,
K and V) is one contiguous byte range, which is what ``kv_transfer`` moves. A layer's K cache
is the strided view ``kv[:, layer, 0]`` of shape ``[num_blocks, block_size, num_kv_heads,
head_dim]``.

A step's batch is flattened: ``T`` new tokens of ``B`` sequences, decodes (one new token)
first, then prefill chunks (any number of new tokens on top of an already cached context).
A backend writes the step's new K/V into the cache at ``slot_mapping`` and computes every
new token's attention over its sequence's context plus the new tokens before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class AttentionMetadata:
    """Where each sequence's KV lives. Tensors are on the model's device; the ``*_host`` lists
    are the same numbers on the host (no device sync needed to read them)."""

    num_decodes: int  # the first num_decodes sequences have exactly one new token
    query_start_loc: torch.Tensor  # [B + 1] int32, offsets of each sequence's new tokens
    seq_lens: torch.Tensor  # [B] int32, context + new tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [T] int64, block_id * block_size + offset of each new token
    query_lens_host: list[int]
    seq_lens_host: list[int]
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_host, default=0)


class AttentionBackend(Protocol):
    """Writes the new tokens' K/V into the paged cache and returns their attention output.

    A backend may also offer ``forward_with_rotary(q, k, v, cos, sin, kv_layer, meta, scale)``,
    taking q and k before rotary (``cos``/``sin``: ``[T, 1, head_dim]``) and applying it itself,
    fused with the cache write; the model calls it where it exists. A backend whose launches
    read no host-side lengths but those in ``meta`` sets ``supports_cuda_graphs = True``.
    """

    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim], rotary applied
        k: torch.Tensor,  # [T, num_kv_heads, head_dim], rotary applied
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_layer: torch.Tensor,  # [num_blocks, 2, block_size, num_kv_heads, head_dim] view
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        ...


def make_backend(name: str, device: torch.device, cpu_kernels: bool = False) -> AttentionBackend:
    """``auto``: Triton on CUDA; on the CPU the kernels' backend for a model on the CPU kernels
    (``cpu_kernels``), else the torch one."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "cpu" if cpu_kernels else "torch"
    if name == "torch":
        from engine.attention.torch_ref import TorchAttention

        return TorchAttention()
    if name == "cpu":
        from engine.attention.cpu_backend import CpuAttention

        return CpuAttention()
    if name == "triton":
        from engine.attention.triton_backend import TritonAttention  # type: ignore[import-not-found]

        return TritonAttention()
    raise ValueError(f"unknown attention backend {name!r}")
