"""The GPU attention backend: Triton kernels over the paged KV cache.

A step's batch (decodes first, then prefill chunks) runs as at most three launches per layer:
the fused rotary + cache write over every new token, the split-K decode kernel over the
decodes, and the prefill kernel over the chunks, which reads its keys (cached context and
the chunk itself) back from the cache. A decode-only step of a few sequences is one launch
(plus the split merge): the decode kernel rotates q and the new k and writes the cache.
The torch backend (``torch_ref``) is the oracle.

Host-side lengths in ``AttentionMetadata`` only size the launches (how many decodes, the longest
chunk, the longest context); no launch reads a device value on the host, so a decode-only step
can be captured in a CUDA graph (whose metadata holds the bounds the graph was captured for).
"""

from __future__ import annotations

import torch

from engine.attention import AttentionMetadata
from engine.attention.triton_decode import decode_attention, num_splits_for
from engine.attention.triton_prefill import prefill_attention
from engine.attention.triton_rope_cache import rope_and_write_kv

# Decode-only steps of at most this many sequences rotate inside the decode kernel (saving the
# rotary kernel's launch, which is what costs at small batches); larger ones keep the separate
# rotary kernel, whose cost is lost in theirs.
FUSED_ROTARY_MAX_SEQS = 16


class TritonAttention:
    """``batch_invariant`` (``EngineConfig.batch_invariant``): every row, decodes included, attends
    through the prefill kernel, after the separate rotary + cache write. A program of that kernel
    holds rows of one sequence and one head and walks its keys in tiles at fixed absolute
    positions, so a row's output depends on neither the other sequences of the step (the decode
    kernel's split count follows the batch) nor on how its sequence was cut into steps (a decode
    is a chunk of one token; a prompt prefilled whole, in chunks, recomputed after a preemption or
    on top of a cached prefix gives the same K/V and outputs)."""

    supports_cuda_graphs = True  # launches are sized from host metadata only

    def __init__(self, batch_invariant: bool = False) -> None:
        self._num_sms: int | None = None
        self.batch_invariant = batch_invariant

    def num_sms(self, device: torch.device) -> int:
        if self._num_sms is None:
            self._num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                             if device.type == "cuda" else 4)
        return self._num_sms

    def _splits(self, meta: AttentionMetadata, kv_layer: torch.Tensor, device: torch.device) -> int:
        nd = meta.num_decodes
        return num_splits_for(nd, kv_layer.shape[3], max(meta.seq_lens_host[:nd]), self.num_sms(device))

    def forward_with_rotary(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim], not yet rotated (rotated in place)
        k: torch.Tensor,  # [T, num_kv_heads, head_dim], not yet rotated
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        cos: torch.Tensor,  # [T, 1, head_dim], each new token's rotary table row
        sin: torch.Tensor,
        kv_layer: torch.Tensor,  # [num_blocks, 2, block_size, num_kv_heads, head_dim] view
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        nd = meta.num_decodes
        if 0 < nd == meta.num_seqs <= FUSED_ROTARY_MAX_SEQS and not self.batch_invariant:
            # one launch rotates, writes the cache, attends
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            return decode_attention(q, kv_layer, meta.seq_lens, meta.block_tables, scale,
                                    self._splits(meta, kv_layer, q.device), out=out,
                                    rope=(k, v, cos, sin, meta.slot_mapping))
        rope_and_write_kv(q, k, v, cos, sin, kv_layer, meta.slot_mapping)
        return self._attend(q, kv_layer, meta, scale)

    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim], rotary applied
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """The plain backend contract (rotary already applied): write the cache, then attend."""
        num_tokens, _, head_dim = k.shape
        ones = torch.ones(num_tokens, 1, head_dim, dtype=q.dtype, device=q.device)
        q = q.contiguous()
        rope_and_write_kv(q, k, v, ones, torch.zeros_like(ones), kv_layer, meta.slot_mapping)
        return self._attend(q, kv_layer, meta, scale)

    def _attend(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if self.batch_invariant:
            return prefill_attention(q, kv_layer, meta.query_start_loc, meta.seq_lens, meta.block_tables, 0,
                                     meta.num_seqs, max(meta.query_lens_host), scale, out)
        nd = meta.num_decodes
        if nd:
            decode_attention(q[:nd], kv_layer, meta.seq_lens, meta.block_tables, scale,
                             self._splits(meta, kv_layer, q.device), out=out[:nd])
        num_prefills = meta.num_seqs - nd
        if num_prefills:
            prefill_attention(
                q, kv_layer, meta.query_start_loc, meta.seq_lens, meta.block_tables, nd, num_prefills,
                max(meta.query_lens_host[nd:]), scale, out,
            )
        return out
