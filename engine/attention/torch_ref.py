"""The torch reference attention over the paged cache (CPU backend, and the oracle for the
Triton kernels).

The cache is addressed in rows of ``num_kv_heads * head_dim`` elements: a layer's view of the
cache, read through one 2-D strided view, holds token ``o`` of block ``b`` (K, or V one block
further) at the same row in every layer. The rows a step writes and reads are computed once per
step (the first layer that sees its metadata) and reused by every layer; each layer then does
one ``index_copy_`` per K and V, one ``index_select`` of its decodes' K and V, and one
scaled-dot-product attention for all decodes, plus one per prefill chunk. Decodes fold each KV
head's query group into the query length (``[B, kvh, group, hd]``), so GQA needs no repeated
K/V, and read K/V strided straight from the gathered rows: a ``.contiguous()`` transpose of
bfloat16 costs several times the attention itself on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention import AttentionMetadata

# Decode steps reading at most this many (padded) KV tokens take torch's fused attention; larger
# ones take two batched matmuls, which beat its CPU kernel there (2x at 8 x 256 tokens).
SDPA_MAX_TOKENS = 512


@dataclass
class _StepRows:
    """Row indices for one step's metadata and one cache layout."""

    write_k: torch.Tensor  # [T] rows of the new tokens' K (V: + v_offset)
    write_v: torch.Tensor
    decode_kv: torch.Tensor | None  # [2 * num_decodes * kvh * length] head-sized rows: K, then V
    decode_len: int  # padded context length the decodes read
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, length] bool, None where no row is padded


def _row_strides(kv_layer: torch.Tensor) -> tuple[int, int]:
    """(block, K -> V) strides of ``kv_layer`` in rows (a token's row follows the one before)."""
    _, _, _, kvh, hd = kv_layer.shape
    row = kvh * hd
    s = kv_layer.stride()
    if s[4] != 1 or s[3] != hd or s[2] != row or s[1] % row or s[0] % row:
        raise ValueError(f"a layer's cache must hold each token's K (and V) as one run of rows, not strides {s}")
    return s[0] // row, s[1] // row


def _rows_view(kv_layer: torch.Tensor, strides: tuple[int, int]) -> torch.Tensor:
    """``kv_layer`` as ``[rows, kvh * hd]`` starting at its own storage offset."""
    num_blocks, _, bs, kvh, hd = kv_layer.shape
    n = (num_blocks - 1) * strides[0] + strides[1] + bs
    return kv_layer.as_strided((n, kvh * hd), (kvh * hd, 1))


def gather_kv(flat: torch.Tensor, strides: tuple[int, int], block_table: torch.Tensor, seq_len: int,
              block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's K and V rows, ``[seq_len, kvh * hd]`` each, from a layer's row view."""
    num_blocks = -(-seq_len // block_size)
    offsets = torch.arange(block_size, device=flat.device)
    k_rows = (block_table[:num_blocks].to(torch.int64)[:, None] * strides[0] + offsets).reshape(-1)[:seq_len]
    kv = flat.index_select(0, torch.cat([k_rows, k_rows + strides[1]]))
    return kv[:seq_len], kv[seq_len:]


class TorchAttention:
    def __init__(self) -> None:
        self._meta: AttentionMetadata | None = None
        self._strides: tuple[int, int] | None = None
        self._rows: _StepRows | None = None

    def _step_rows(self, meta: AttentionMetadata, strides: tuple[int, int], bs: int, num_kv_heads: int) -> _StepRows:
        if meta is self._meta and strides == self._strides and self._rows is not None:
            return self._rows
        block_stride, v_offset = strides
        slots = meta.slot_mapping
        write_k = (slots // bs) * block_stride + slots % bs
        nd = meta.num_decodes
        decode_kv, mask, length = None, None, 0
        if nd:
            lens = meta.seq_lens_host[:nd]
            num_blocks = -(-max(lens) // bs)
            length = num_blocks * bs
            tables = meta.block_tables[:nd, :num_blocks].to(torch.int64)
            k_rows = (tables[:, :, None] * block_stride + torch.arange(bs, device=slots.device)).view(nd, 1, length)
            # Head-sized sub-rows in [K/V, sequence, KV head, position] order: the gather lands
            # contiguous in the layout the matmuls want.
            heads = torch.arange(num_kv_heads, device=slots.device).view(1, num_kv_heads, 1)
            decode_kv = torch.stack([k_rows, k_rows + v_offset]) * num_kv_heads + heads
            decode_kv = decode_kv.reshape(-1)
            if any(n != length for n in lens):
                pos = torch.arange(length, device=slots.device)
                mask = (pos[None, :] < meta.seq_lens[:nd, None])[:, None, None, :]
        self._meta, self._strides = meta, strides
        self._rows = _StepRows(write_k, write_k + v_offset, decode_kv, length, mask)
        return self._rows

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        strides = _row_strides(kv_layer)
        rows = self._step_rows(meta, strides, kv_layer.shape[2], kv_layer.shape[3])
        flat = _rows_view(kv_layer, strides)
        t = k.shape[0]
        flat.index_copy_(0, rows.write_k, k.reshape(t, -1))
        flat.index_copy_(0, rows.write_v, v.reshape(t, -1))
        nd = meta.num_decodes
        if nd == meta.num_seqs:
            return self._decode(q, kv_layer, scale, rows, flat)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self._decode(q[:nd], kv_layer, scale, rows, flat)
        start = nd
        for i in range(nd, meta.num_seqs):
            qlen = meta.query_lens_host[i]
            slen = meta.seq_lens_host[i]
            qi = q[start:start + qlen].transpose(0, 1)  # [H, qlen, hd]
            if qlen == slen:  # no cached context: attend to the new tokens directly
                ki, vi = k[start:start + qlen], v[start:start + qlen]
                mask, causal = None, True
            else:
                ki, vi = gather_kv(flat, strides, meta.block_tables[i], slen, kv_layer.shape[2])
                ki, vi = ki.view(slen, *k.shape[1:]), vi.view(slen, *k.shape[1:])
                ctx = slen - qlen
                mask = torch.ones(qlen, slen, dtype=torch.bool, device=q.device).tril(diagonal=ctx)
                causal = False
            # 4-D inputs: torch's CPU flash kernel takes them (3-D ones fall back to the math path).
            o = F.scaled_dot_product_attention(
                qi[None], ki.transpose(0, 1)[None], vi.transpose(0, 1)[None], attn_mask=mask, is_causal=causal,
                scale=scale, enable_gqa=True,
            )
            out[start:start + qlen] = o[0].transpose(0, 1)
            start += qlen
        return out

    def _decode(self, q: torch.Tensor, kv_layer: torch.Tensor, scale: float, rows: _StepRows,
                flat: torch.Tensor) -> torch.Tensor:
        """All decodes in one attention: contexts padded to the longest, the padding masked, each
        KV head's query group as its query rows (GQA without repeating K/V)."""
        nd, num_heads, hd = q.shape
        kvh = kv_layer.shape[-2]
        length, mask = rows.decode_len, rows.decode_mask
        kv = flat.view(-1, hd).index_select(0, rows.decode_kv).view(2, nd, kvh, length, hd)
        keys, values = kv[0], kv[1]
        q = q.view(nd, kvh, num_heads // kvh, hd)
        if nd * length <= SDPA_MAX_TOKENS:
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
            return o.reshape(nd, num_heads, hd)
        scores = torch.matmul(q, keys.mT).float() * scale  # [B, kvh, group, L]
        if mask is not None:
            scores.masked_fill_(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        return torch.matmul(probs, values).reshape(nd, num_heads, hd)
