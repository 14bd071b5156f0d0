"""The torch reference attention over the paged cache (CPU backend, and the oracle for the
Triton kernels). Decodes are one batched gather + matmul per layer; prefill chunks run one
scaled-dot-product attention per sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention import AttentionMetadata


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata) -> None:
    """Scatter the new tokens' K/V into their cache slots."""
    block_ids = meta.slot_mapping // meta.block_size
    offsets = meta.slot_mapping % meta.block_size
    kv_layer[block_ids, 0, offsets] = k
    kv_layer[block_ids, 1, offsets] = v


def gather_kv(kv_layer: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's K and V as ``[seq_len, num_kv_heads, head_dim]``."""
    num_blocks = -(-seq_len // kv_layer.shape[2])
    blocks = kv_layer[block_table[:num_blocks]]  # [n, 2, bs, kvh, hd]
    k = blocks[:, 0].flatten(0, 1)[:seq_len]
    v = blocks[:, 1].flatten(0, 1)[:seq_len]
    return k, v


class TorchAttention:
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        write_kv(k, v, kv_layer, meta)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(q[:nd], kv_layer, meta, scale)
        start = nd
        for i in range(nd, meta.num_seqs):
            qlen = meta.query_lens_host[i]
            slen = meta.seq_lens_host[i]
            qi = q[start:start + qlen].transpose(0, 1)  # [H, qlen, hd]
            if qlen == slen:  # no cached context: attend to the new tokens directly
                ki, vi = k[start:start + qlen], v[start:start + qlen]
                mask, causal = None, True
            else:
                ki, vi = gather_kv(kv_layer, meta.block_tables[i], slen)
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

    def _decode(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Batched decode: pad every context to the longest, mask the padding. ``index_select``
        on a flat block list and contiguous ``[B, kvh, L, hd]`` operands keep the CPU matmuls on
        their fast path (advanced indexing and strided operands cost several times more)."""
        nd = q.shape[0]
        max_len = max(meta.seq_lens_host[:nd])
        bs = kv_layer.shape[2]
        num_blocks = -(-max_len // bs)
        flat = meta.block_tables[:nd, :num_blocks].reshape(-1)
        kvh, hd = kv_layer.shape[-2], kv_layer.shape[-1]
        length = num_blocks * bs

        def gather(which: int) -> torch.Tensor:  # [B, kvh, L, hd], contiguous
            rows = kv_layer[:, which].index_select(0, flat)
            return rows.view(nd, length, kvh, hd).transpose(1, 2).contiguous()

        keys, values = gather(0), gather(1)
        group = q.shape[1] // kvh
        scores = torch.matmul(q.view(nd, kvh, group, hd), keys.mT).float() * scale  # [B, kvh, g, L]
        pad = torch.arange(length, device=q.device)[None, :] >= meta.seq_lens[:nd, None]  # [B, L]
        scores.masked_fill_(pad[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        return torch.matmul(probs, values).reshape(nd, kvh * group, hd)
