"""The batch-invariant matmul of the GPU engine's batch-invariant mode (``EngineConfig.batch_invariant``).

``y = x @ W^T (+ b)`` where row ``i`` of ``y`` has the same bits whatever the number of rows ``M``
and whatever the other rows hold: one tile configuration per weight shape ``(N, K)`` (never per
``M``), no split-K, and each output element accumulated in float32 over ``K`` in ``BLOCK_K`` steps
from ``k = 0`` up, inside one program. cuBLAS (``F.linear``) picks its kernel, tiles and split-K by
``M``, and the one-row GEMV (``triton_gemv``) reduces in another order again: a request's tokens
then depend on the batch it shares.

The tiles (``config_for``): 128 x 128 (``BLOCK_K`` 64, 8 warps) where that still gives ``ONE_WAVE``
programs over ``N`` (gate/up, LM heads), else 64 x 64 (a small batch's step is a weight stream: too
few programs leave the memory system idle). On an H200 (8B shapes, 2048 rows) these ran the q/k/v
projection in 347 us against 463 for 64 x 32 tiles, and 128 x 128 ran it in 203 (cuBLAS: 160), but
gives a 4096-wide weight 32 programs. ``M`` is not specialized on (``do_not_specialize``), so one
compiled kernel serves every batch size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_K = 64
ONE_WAVE = 128  # programs over N wanted: about one per SM of an H200 (132)


@triton.jit(do_not_specialize=["M"])
def _matmul_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        x = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def config_for(n: int, k: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for a weight ``[n, k]`` of ``dtype``: a
    function of the weight alone, never of the number of rows."""
    stages = 2 if dtype == torch.float32 else None
    if triton.cdiv(n, 128) >= ONE_WAVE:  # wide weights (gate/up, LM heads): big tiles, still a wave
        return 128, 128, BLOCK_K, 8, stages or 3
    return 64, 64, BLOCK_K, 4, stages or 4


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, batch-invariant: ``x`` ``[..., K]``, ``weight`` ``[N, K]``;
    the output in ``x``'s dtype (16-bit inputs on the tensor cores with float32 accumulators;
    float32 ones in exact float32 products, which the engine's mode does not use: see
    ``EngineConfig.batch_invariant``)."""
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    assert weight.stride(-1) == 1 and x.dtype == weight.dtype
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        block_m, block_n, block_k, warps, stages = config_for(n, k, weight.dtype)
        _matmul_kernel[(triton.cdiv(n, block_n), triton.cdiv(m, block_m))](
            x2, weight, bias if bias is not None else weight, y, m, n, k, x2.stride(0), weight.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages,
        )
    return y.view(*lead, n)
