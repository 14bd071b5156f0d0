"""Rotary embedding fused with the KV-cache write: one pass over a step's new Q/K/V.

One program per new token: rotates its query heads in place (rotate-half convention, the
model's per-token cos/sin), rotates its key heads and stores them with its value heads into the
token's cache slot. A slot below 0 (a CUDA-graph padding row) is not written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_half(x1, x2, c1, c2, s1, s2):
    # [x1, x2] * cos + [-x2, x1] * sin, in float32
    return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2


@triton.jit
def _rope_cache_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr, k_cache_ptr, v_cache_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct,
    stride_cb, stride_ck, stride_ch,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, PAGE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, HALF_PAD)
    d_mask = offs < HALF
    c1 = tl.load(cos_ptr + t * stride_ct + offs, mask=d_mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_ct + HALF + offs, mask=d_mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_ct + offs, mask=d_mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_ct + HALF + offs, mask=d_mask, other=0.0).to(tl.float32)

    hq = tl.arange(0, HEADS_PAD)
    q_mask = (hq < NUM_HEADS)[:, None] & d_mask[None, :]
    q_row = q_ptr + t * stride_qt + hq[:, None] * stride_qh + offs[None, :]
    q1 = tl.load(q_row, mask=q_mask, other=0.0).to(tl.float32)
    q2 = tl.load(q_row + HALF, mask=q_mask, other=0.0).to(tl.float32)
    o1, o2 = _rotate_half(q1, q2, c1[None, :], c2[None, :], s1[None, :], s2[None, :])
    tl.store(q_row, o1.to(q_ptr.dtype.element_ty), mask=q_mask)
    tl.store(q_row + HALF, o2.to(q_ptr.dtype.element_ty), mask=q_mask)

    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        hk = tl.arange(0, KV_HEADS_PAD)
        kv_mask = (hk < NUM_KV_HEADS)[:, None] & d_mask[None, :]
        k_row = k_ptr + t * stride_kt + hk[:, None] * stride_kh + offs[None, :]
        k1 = tl.load(k_row, mask=kv_mask, other=0.0).to(tl.float32)
        k2 = tl.load(k_row + HALF, mask=kv_mask, other=0.0).to(tl.float32)
        r1, r2 = _rotate_half(k1, k2, c1[None, :], c2[None, :], s1[None, :], s2[None, :])
        dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_ck + hk[:, None] * stride_ch + offs[None, :]
        tl.store(k_cache_ptr + dst, r1.to(k_cache_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(k_cache_ptr + dst + HALF, r2.to(k_cache_ptr.dtype.element_ty), mask=kv_mask)
        v_row = v_ptr + t * stride_vt + hk[:, None] * stride_vh + offs[None, :]
        tl.store(v_cache_ptr + dst, tl.load(v_row, mask=kv_mask), mask=kv_mask)
        tl.store(v_cache_ptr + dst + HALF, tl.load(v_row + HALF, mask=kv_mask), mask=kv_mask)


def rope_and_write_kv(
    q: torch.Tensor,  # [T, num_heads, head_dim], rotated in place
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    v: torch.Tensor,  # [T, num_kv_heads, head_dim]
    cos: torch.Tensor,  # [T, head_dim] (or [T, 1, head_dim])
    sin: torch.Tensor,
    kv_layer: torch.Tensor,  # [num_blocks, 2, page, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [T] int64, -1 = do not write
) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    page = kv_layer.shape[2]
    cos, sin = cos.reshape(num_tokens, head_dim), sin.reshape(num_tokens, head_dim)
    assert head_dim % 2 == 0 and cos.stride() == sin.stride() and cos.stride(-1) == 1
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1 and kv_layer.stride(-1) == 1
    if num_tokens == 0:
        return q
    k_cache, v_cache = kv_layer[:, 0], kv_layer[:, 1]
    half = head_dim // 2
    _rope_cache_kernel[(num_tokens,)](
        q, k, v, cos, sin, slot_mapping, k_cache, v_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_heads),
        KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads), HALF=half, HALF_PAD=triton.next_power_of_2(half),
        PAGE=page, num_warps=4,
    )
    return q
