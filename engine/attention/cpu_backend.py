"""The CPU attention backend for bfloat16 models: the kernels of :mod:`engine.cpu_kernels`.

``forward_with_rotary`` applies rotary to q and k, writes the step's K and V into the paged
cache, then attends, in two kernels per layer. Each query row's result depends only on its own
sequence's context (see ``engine/csrc/attention.h``): a prompt gives the same bits prefilled in
one step or in chunks, here or on another worker, with any thread count.
"""

from __future__ import annotations

import torch

from engine import cpu_kernels
from engine.attention import AttentionMetadata


class CpuAttention:
    supports_cuda_graphs = False

    def __init__(self) -> None:
        self._checked: AttentionMetadata | None = None

    def _check(self, meta: AttentionMetadata, num_tokens: int, kv_layer: torch.Tensor) -> None:
        if meta is not self._checked:  # once per step: every layer reads the same metadata
            if kv_layer.shape[2] != meta.block_size:
                raise ValueError(f"a cache of {kv_layer.shape[2]}-token blocks for metadata of {meta.block_size}")
            cpu_kernels.check_tables(meta.query_start_loc, meta.seq_lens, meta.block_tables, meta.block_size,
                                     num_tokens, kv_layer.shape[0])
            self._checked = meta

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Attention with rotary already applied to q and k (the torch backend's contract)."""
        t, _, hd = q.shape
        ones = torch.ones(t, 1, hd, dtype=q.dtype)
        return self.forward_with_rotary(q, k, v, ones, torch.zeros_like(ones), kv_layer, meta, scale)

    def forward_with_rotary(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata,
                            scale: float) -> torch.Tensor:
        self._check(meta, q.shape[0], kv_layer)
        if q.shape[0] > 1 and not q.stride(0) == k.stride(0) == v.stride(0):  # e.g. Qwen3's q/k norms
            q, k, v = (torch.cat([q, k, v], dim=1).split([q.shape[1], k.shape[1], v.shape[1]], dim=1))
        q_rot = cpu_kernels.rotary_cache_write(q, k, v, cos, sin, kv_layer, meta.slot_mapping)
        return cpu_kernels.attention(q_rot, kv_layer, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale)
