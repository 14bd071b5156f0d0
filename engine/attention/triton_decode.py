"""Decode attention over the paged KV cache (one new token per sequence), GQA-aware and split
over long contexts.

One program handles one (sequence, KV head, split): it loads the KV head's whole query group
once (``group`` query heads, padded to 16 rows for the tensor cores) and streams its share of
the context's K/V tiles from the paged cache, so each K/V byte is read once per step, not
once per query head. With ``num_splits > 1`` every split writes a partial output and its
log-sum-exp, and a second kernel merges the splits.

The launch depends only on tensor *shapes* and on ``num_splits``; sequence lengths are read
on the device, so a captured CUDA graph replays it for any lengths up to the bound it was
captured with. A sequence of length 0 (a CUDA-graph padding row) produces zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Fewest tokens worth giving a split of its own: below this the merge costs more than it saves.
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 64


@triton.jit(do_not_specialize=["num_splits"])
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, seq_lens_ptr, block_tables_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    scale, num_splits,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + offs_g
    g_mask = offs_g < GROUP

    seq_len = tl.load(seq_lens_ptr + seq)
    # Every split covers a whole number of tiles; the last ones may get nothing.
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    qk_scale = scale * 1.4426950408889634  # softmax in the log2 domain

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    table = block_tables_ptr + seq * stride_bt
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < end
        page = tl.load(table + pos // PAGE, mask=n_mask, other=0).to(tl.int64)
        row = page * stride_kb + (pos % PAGE) * stride_kt + kvh * stride_kh
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [GROUP_PAD, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if not SPLIT:
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    else:
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        num_heads = tl.num_programs(1) * GROUP
        base = (seq * num_heads + heads) * num_splits + split  # [seq, head, split]
        tl.store(part_out_ptr + base[:, None] * HEAD_DIM_PAD + offs_d[None, :], out, mask=g_mask[:, None])
        tl.store(part_lse_ptr + base, lse, mask=g_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, stride_ot, stride_oh, num_splits,
    SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    s_mask = offs_s < num_splits
    base = (seq * tl.num_programs(1) + head) * num_splits
    lse = tl.load(part_lse_ptr + base + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    part = tl.load(part_out_ptr + (base + offs_s)[:, None] * HEAD_DIM_PAD + offs_d[None, :],
                   mask=s_mask[:, None], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 models get exact float32 products (tf32 would break equality with references)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def num_splits_for(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Splits per sequence: enough programs to fill the chip twice over, none shorter than
    MIN_TOKENS_PER_SPLIT tokens (at the longest sequence)."""
    want = triton.cdiv(2 * num_sms, max(1, num_seqs * num_kv_heads))
    most = max(1, max_seq_len // MIN_TOKENS_PER_SPLIT)
    return int(max(1, min(want, most, MAX_SPLITS)))


def decode_attention(
    q: torch.Tensor,  # [B, num_heads, head_dim]
    kv_layer: torch.Tensor,  # [num_blocks, 2, page, num_kv_heads, head_dim]
    seq_lens: torch.Tensor,  # [B] int32, on the device
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    scale: float,
    num_splits: int,
    out: torch.Tensor | None = None,  # [B, num_heads, head_dim]
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int | None = None,
) -> torch.Tensor:
    num_seqs, num_heads, head_dim = q.shape
    _, _, page, num_kv_heads, _ = kv_layer.shape
    group = num_heads // num_kv_heads
    head_dim_pad = triton.next_power_of_2(head_dim)
    assert q.stride(-1) == 1 and kv_layer.stride(-1) == 1 and block_tables.stride(-1) == 1
    if out is None:
        out = torch.empty(num_seqs, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if num_seqs == 0:
        return out
    k_cache, v_cache = kv_layer[:, 0], kv_layer[:, 1]
    if num_splits > 1:
        f32 = dict(dtype=torch.float32, device=q.device)
        part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim_pad, **f32)
        part_lse = torch.empty(num_seqs, num_heads, num_splits, **f32)
    else:
        part_out = part_lse = out  # unused
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, seq_lens, block_tables, out, part_out, part_lse,
        scale, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad, PAGE=page,
        BLOCK_N=block_n, SPLIT=num_splits > 1, PRECISION=dot_precision(q.dtype), num_warps=num_warps,
        num_stages=num_stages or (2 if q.dtype == torch.float32 else 3),
    )
    if num_splits > 1:
        _merge_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, out.stride(0), out.stride(1), num_splits,
            SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim,
            HEAD_DIM_PAD=head_dim_pad,
            num_warps=4,
        )
    return out
