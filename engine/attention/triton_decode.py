"""Decode attention over the paged KV cache (one new token per sequence), GQA-aware and split
over long contexts.

One program handles one (sequence, KV head, split): it loads the KV head's whole query group
once (``group`` query heads, padded to 16 rows for the tensor cores) and streams its share of
the context's K/V tiles from the paged cache, so each K/V byte is read once per step, not
once per query head. With ``num_splits > 1`` every split writes a partial output and its
log-sum-exp, and a second kernel merges the splits. For a decode-only step the kernel also
does the rotary embedding and the new token's cache write (``rope=``), saving a launch per layer.

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


# Not specialized on the split count or the block table's width (which varies from step to step
# in eager steps): a new value must not stall a running engine on a compile.
@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, seq_lens_ptr, block_tables_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    k_new_ptr, v_new_ptr, cos_ptr, sin_ptr, slot_ptr,
    scale, num_splits,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_bt,
    stride_ot, stride_oh,
    stride_knt, stride_knh, stride_vnt, stride_vnh, stride_ct,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr, ROPE: tl.constexpr,
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
    q_mask = g_mask[:, None] & d_mask[None, :]
    q_rows = q_ptr + seq * stride_qt + heads[:, None] * stride_qh
    q = tl.load(q_rows + offs_d[None, :], mask=q_mask, other=0.0)
    cached_end = end  # positions read from the cache: [start, cached_end)
    if ROPE:
        # q and the new token's k come unrotated: rotate-half them here, rounding to the dtype
        # where the separate rotary kernel rounds. The new token (position seq_len - 1) is not
        # in the cache yet: its k/v come from registers, and the split that holds it writes them.
        half = HEAD_DIM // 2
        lower = offs_d < half
        partner = tl.where(lower, offs_d + half, offs_d - half)
        sign = tl.where(lower, -1.0, 1.0)
        cos = tl.load(cos_ptr + seq * stride_ct + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + seq * stride_ct + offs_d, mask=d_mask, other=0.0).to(tl.float32) * sign
        q_p = tl.load(q_rows + partner[None, :], mask=q_mask, other=0.0)
        q = (q.to(tl.float32) * cos[None, :] + q_p.to(tl.float32) * sin[None, :]).to(q.dtype)
        k_row = k_new_ptr + seq * stride_knt + kvh * stride_knh
        k_new = tl.load(k_row + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        k_new_p = tl.load(k_row + partner, mask=d_mask, other=0.0).to(tl.float32)
        k_new = (k_new * cos + k_new_p * sin).to(k_ptr.dtype.element_ty)
        v_new = tl.load(v_new_ptr + seq * stride_vnt + kvh * stride_vnh + offs_d, mask=d_mask, other=0.0)
        last = seq_len - 1
        cached_end = tl.minimum(end, last)
        slot = tl.load(slot_ptr + seq)
        if (start <= last) & (last < end) & (slot >= 0):
            dst = (slot // PAGE) * stride_kb + (slot % PAGE) * stride_kt + kvh * stride_kh + offs_d
            tl.store(k_ptr + dst, k_new, mask=d_mask)
            tl.store(v_ptr + dst, v_new.to(v_ptr.dtype.element_ty), mask=d_mask)
    qk_scale = scale * 1.4426950408889634  # softmax in the log2 domain

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    table = block_tables_ptr + seq * stride_bt
    for n0 in range(start, cached_end, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < cached_end
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
    if ROPE:
        if (start <= last) & (last < end):  # this split holds the new token: one more softmax column
            s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * qk_scale  # [GROUP_PAD]
            m_new = tl.maximum(m_i, s_new)
            alpha = tl.exp2(m_i - m_new)
            p_new = tl.exp2(s_new - m_new)
            l_i = l_i * alpha + p_new
            p_v = p_new.to(v_new.dtype).to(tl.float32)[:, None] * v_new.to(tl.float32)[None, :]
            acc = acc * alpha[:, None] + p_v
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
    rope: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """Attention of each sequence's one new token over its context.

    With ``rope = (k, v, cos, sin, slot_mapping)`` (``k``/``v``: ``[B, num_kv_heads, head_dim]``,
    ``cos``/``sin``: ``[B, head_dim]``, ``slot_mapping``: ``[B]``), ``q`` and ``k`` come before
    rotary: the kernel rotates them and writes the new token's K/V into the cache (slot -1: not
    written), as ``rope_and_write_kv`` followed by this function would, in one launch.
    Otherwise the new token's K/V are already in the cache and ``q`` is rotated."""
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
    if rope is not None:
        k_new, v_new, cos, sin, slots = rope
        cos, sin = cos.reshape(num_seqs, head_dim), sin.reshape(num_seqs, head_dim)
        assert head_dim % 2 == 0 and k_new.stride(-1) == 1 and v_new.stride(-1) == 1
        assert cos.stride() == sin.stride() and cos.stride(-1) == 1
        rope_strides = (k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), cos.stride(0))
    else:
        k_new = v_new = cos = sin = slots = q  # unused
        rope_strides = (0, 0, 0, 0, 0)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, seq_lens, block_tables, out, part_out, part_lse,
        k_new, v_new, cos, sin, slots,
        scale, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        *rope_strides,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad, PAGE=page,
        BLOCK_N=block_n, SPLIT=num_splits > 1, PRECISION=dot_precision(q.dtype), ROPE=rope is not None,
        num_warps=num_warps, num_stages=num_stages or (2 if q.dtype == torch.float32 else 3),
    )
    if num_splits > 1:
        _merge_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, out.stride(0), out.stride(1), num_splits,
            SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim,
            HEAD_DIM_PAD=head_dim_pad,
            num_warps=4,
        )
    return out
