"""Linear layers of a one-row step (batch-1 decode), fused with the elementwise op before them.

At batch 1 a decode step is a chain of matrix-vector products whose inputs are tiny; between
them, cuBLAS needs an RMSNorm kernel, a SiLU-and-mul kernel and often a split-K reduction, each
a few microseconds of latency in which the memory system idles. Here one kernel computes
``y = prologue(x) @ W^T (+ b)`` for one row ``x``, the prologue being one of:

- nothing;
- RMSNorm, optionally of ``x + residual`` (the sum is written out too, by the first program);
- SiLU-and-mul of ``x = [gate, up]``.

Each program streams ``BLOCK_N`` rows of ``W``, three ``BLOCK_K``-wide tiles in flight (the loads
of the next chunks of ``x`` are issued a chunk ahead too), and recomputes the prologue on its
chunks of ``x`` (for RMSNorm it first reads the whole row for the sum of squares). The prologues
round where ``triton_ops`` rounds, so they give the unfused kernels' values; products accumulate
in float32 on the CUDA cores (float32 models stay exact).

With programmatic dependent launch (Hopper and later), a kernel lets the next one start as soon
as it runs, and waits (``gdc_wait``) for the previous one only after issuing its first loads of
``W``, which no kernel writes: the weight stream starts while the previous kernel drains.

Which layers take it (``supports``): one row, and weights of at most ``MAX_WEIGHT_ELEMENTS``
(every projection of an 8B model; on an H200 each ran as fast as cuBLAS or faster, counting the
unfused op cuBLAS needs: q/k/v + norm 15 us against 19, o 9 against 13, gate/up + norm 59 against
60, down + SiLU 29 against 35). LM heads stay with cuBLAS.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

MAX_WEIGHT_ELEMENTS = 1 << 27  # larger weights (LM heads): cuBLAS
MAX_NORM_WIDTH = 16384  # RMSNorm prologue: the whole row sits in registers
USE_PDL = True  # programmatic dependent launch, where the GPU and Triton offer it

NONE, RMS_NORM, SILU_MUL = "none", "rms_norm", "silu_mul"
_PROLOGUES = {NONE: 0, RMS_NORM: 1, SILU_MUL: 2}


@triton.jit
def _load_chunk(x_ptr, res_ptr, norm_w_ptr, k, K, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """The raw inputs of one chunk of x: (x or gate, residual or up, RMSNorm scale)."""
    k_mask = k < K
    a = tl.load(x_ptr + k, mask=k_mask, other=0.0)
    b = tl.zeros_like(a)
    g = tl.zeros_like(a)
    if PROLOGUE == 1:
        g = tl.load(norm_w_ptr + k, mask=k_mask, other=0.0).to(a.dtype)
        if HAS_RESIDUAL:
            b = tl.load(res_ptr + k, mask=k_mask, other=0.0)
    elif PROLOGUE == 2:
        b = tl.load(x_ptr + K + k, mask=k_mask, other=0.0)
    return a, b, g


@triton.jit
def _gemv_kernel(
    x_ptr, res_ptr, norm_w_ptr, w_ptr, bias_ptr, y_ptr, res_out_ptr,
    N, K, stride_wn, eps,
    PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_PAD: tl.constexpr, USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    dtype = y_ptr.dtype.element_ty
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    # No kernel writes W: its first two tiles stream in before waiting for the one that wrote x.
    w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & (offs_k < K)[None, :], other=0.0,
                eviction_policy="evict_first")
    k1 = offs_k + BLOCK_K
    w_next = tl.load(w_rows + k1[None, :], mask=n_mask[:, None] & (k1 < K)[None, :], other=0.0,
                     eviction_policy="evict_first")
    if USE_PDL:
        tl.extra.cuda.gdc_wait()

    rstd = 0.0
    if PROLOGUE == 1:
        kk = tl.arange(0, K_PAD)
        row = tl.load(x_ptr + kk, mask=kk < K, other=0.0)
        if HAS_RESIDUAL:  # the residual stream's add, rounded as torch rounds it
            row = (row.to(tl.float32) + tl.load(res_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)).to(dtype)
            if pid == 0:
                tl.store(res_out_ptr + kk, row, mask=kk < K)
        row_f = row.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(row_f * row_f, 0) / K + eps)

    a, b, g = _load_chunk(x_ptr, res_ptr, norm_w_ptr, offs_k, K, PROLOGUE, HAS_RESIDUAL)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k2 = k0 + 2 * BLOCK_K + offs_k
        w_after = tl.load(w_rows + k2[None, :], mask=n_mask[:, None] & (k2 < K)[None, :], other=0.0,
                          eviction_policy="evict_first")
        a_next, b_next, g_next = _load_chunk(x_ptr, res_ptr, norm_w_ptr, k0 + BLOCK_K + offs_k, K, PROLOGUE,
                                             HAS_RESIDUAL)
        if PROLOGUE == 0:
            xk = a.to(tl.float32)
        elif PROLOGUE == 1:
            s = a
            if HAS_RESIDUAL:
                s = (a.to(tl.float32) + b.to(tl.float32)).to(dtype)
            normed = (s.to(tl.float32) * rstd).to(dtype)
            xk = (g.to(tl.float32) * normed.to(tl.float32)).to(dtype).to(tl.float32)
        else:
            gate = a.to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            xk = (act * b.to(tl.float32)).to(dtype).to(tl.float32)
        acc += w.to(tl.float32) * xk[None, :]
        w, w_next = w_next, w_after
        a, b, g = a_next, b_next, g_next

    y = tl.sum(acc, 1)  # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(dtype), mask=n_mask)


_pdl: bool | None = None


def _pdl_available(device: torch.device) -> bool:
    """Hopper or later, and a Triton that launches with programmatic dependent launch."""
    global _pdl
    if _pdl is None:
        from triton.backends.nvidia.compiler import CUDAOptions

        _pdl = (USE_PDL and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
                and hasattr(tl.extra.cuda, "gdc_wait")
                and "launch_pdl" in {f.name for f in dataclasses.fields(CUDAOptions)})
    return _pdl


def supports(x: torch.Tensor, weight: torch.Tensor, prologue: str = NONE) -> bool:
    """Whether ``gemv`` takes this input: one row on the GPU, a weight small enough that the
    fused kernel beats cuBLAS, dtypes matching."""
    return (x.is_cuda and x.numel() == x.shape[-1] and weight.numel() <= MAX_WEIGHT_ELEMENTS
            and x.dtype == weight.dtype and weight.stride(-1) == 1
            and (prologue != RMS_NORM or weight.shape[1] <= MAX_NORM_WIDTH))


def block_sizes(k: int, prologue: str) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps): 8 rows of W by 512 columns a program (8 KB of bfloat16),
    256 with the RMSNorm prologue (fastest of the tilings tried on an H200 for Llama-3.1-8B's
    four layers; ``bench/gpu_kernels.py --only gemv``)."""
    return 8, min(256 if prologue == RMS_NORM else 512, triton.next_power_of_2(k)), 4


def gemv(
    x: torch.Tensor,  # one row, [..., K] (``[..., 2K]`` for SILU_MUL)
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,
    prologue: str = NONE,
    norm_weight: torch.Tensor | None = None,  # RMS_NORM's scale, [K]
    eps: float = 0.0,
    residual: torch.Tensor | None = None,  # RMS_NORM of x + residual
    config: tuple[int, int, int] | None = None,  # (BLOCK_N, BLOCK_K, num_warps), to tune
    pdl: bool | None = None,  # programmatic dependent launch (default: where available)
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``prologue(x) @ weight.T + bias`` for one row; with ``residual``, ``(y, x + residual)``."""
    n, k = weight.shape
    lead = x.shape[:-1]
    assert x.numel() == x.shape[-1] == (2 * k if prologue == SILU_MUL else k) and weight.stride(-1) == 1
    x1 = x.reshape(-1).contiguous()
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    r1 = res_out = x1  # unused without a residual
    if residual is not None:
        r1 = residual.reshape(-1).contiguous()
        res_out = torch.empty(k, dtype=x.dtype, device=x.device)
    block_n, block_k, warps = config or block_sizes(k, prologue)
    if pdl is None:
        pdl = _pdl_available(x.device)
    extra = {"launch_pdl": True} if pdl else {}
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x1, r1, norm_weight if norm_weight is not None else weight, weight,
        bias if bias is not None else weight, y, res_out,
        n, k, weight.stride(0), eps,
        PROLOGUE=_PROLOGUES[prologue], HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, K_PAD=triton.next_power_of_2(k) if prologue == RMS_NORM else 1,
        USE_PDL=pdl, num_warps=warps, **extra,
    )
    y = y.view(*lead, n)
    if residual is None:
        return y
    return y, res_out.view(*lead, k)
