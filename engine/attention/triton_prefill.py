"""Prefill attention over the paged KV cache: a batch of variable-length chunks, each on top
of its sequence's cached context (the chunk's own K/V already written into the cache).

Flash-attention style: one program handles ``BLOCK_M`` new tokens of one sequence for one query
head and streams that sequence's K/V tiles from the paged cache; every new token at position
``p`` attends to positions ``0..p`` (the cached context and the chunk's causal prefix). Tiles
wholly before the program's first token need no mask and run in a loop of their own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.attention.triton_decode import dot_precision


@triton.jit(do_not_specialize=["first_seq", "stride_bt"])  # no compile for each new table width
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, query_start_ptr, seq_lens_ptr, block_tables_ptr, out_ptr,
    scale, first_seq,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    # The grid's first axis is reversed so the longest (last, most causal work) tiles start first.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    seq = first_seq + tl.program_id(1)
    head = tl.program_id(2)
    kvh = head // GROUP

    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    m_start = tile * BLOCK_M
    if m_start >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx = seq_len - q_len

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    q_pos = ctx + offs_m  # absolute position of each new token
    q = tl.load(q_ptr + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    qk_scale = scale * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    table = block_tables_ptr + seq * stride_bt
    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_kh

    # Keys every row of the tile sees: no mask.
    full_end = (ctx + m_start) // BLOCK_N * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        pos = n0 + offs_n
        page = tl.load(table + pos // PAGE).to(tl.int64)
        row = page * stride_kb + (pos % PAGE) * stride_kt
        k = tl.load(k_base + row[:, None] + offs_d[None, :], mask=d_mask[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + row[:, None] + offs_d[None, :], mask=d_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # The diagonal: causal mask.
    end = tl.minimum(seq_len, ctx + m_start + BLOCK_M)
    for n0 in range(full_end, end, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < end
        page = tl.load(table + pos // PAGE, mask=n_mask, other=0).to(tl.int64)
        row = page * stride_kb + (pos % PAGE) * stride_kt
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where((pos[None, :] <= q_pos[:, None]) & n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # padded rows (m >= q_len) have l == 0
    tl.store(out_ptr + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def prefill_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim], the whole step's new tokens
    kv_layer: torch.Tensor,  # [num_blocks, 2, page, num_kv_heads, head_dim]
    query_start_loc: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,  # [B] int32
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    first_seq: int,  # sequences before this one are decodes, handled elsewhere
    num_seqs: int,  # prefill sequences from first_seq on
    max_query_len: int,
    scale: float,
    out: torch.Tensor,  # [T, num_heads, head_dim]; rows of the prefill tokens are written
    config: tuple[int, int, int, int] | None = None,  # (BLOCK_M, BLOCK_N, warps, stages), for tuning
) -> torch.Tensor:
    _, num_heads, head_dim = q.shape
    _, _, page, num_kv_heads, _ = kv_layer.shape
    assert q.stride(-1) == 1 and kv_layer.stride(-1) == 1 and block_tables.stride(-1) == 1
    if num_seqs == 0:
        return out
    k_cache, v_cache = kv_layer[:, 0], kv_layer[:, 1]
    head_dim_pad = triton.next_power_of_2(head_dim)
    block_m = 128
    block_n = 128 if head_dim_pad <= 128 else 32  # measured on an H200: 334 TFLOP/s against 290 with 64
    num_stages = 3
    if q.dtype == torch.float32:  # shared memory and registers for float32 tiles
        block_m, block_n, num_stages = 64, 32, 2
    num_warps = 8 if block_m * head_dim_pad >= 128 * 128 else 4
    if config is not None:
        block_m, block_n, num_warps, num_stages = config
    grid = (triton.cdiv(max_query_len, block_m), num_seqs, num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, out,
        scale, first_seq,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, PAGE=page,
        BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
