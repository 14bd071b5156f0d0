"""Random paged-attention cases: the Triton backend against the torch reference.

Shared by the GPU tests (``test_gpu_kernels.py``) and the CPU run under Triton's interpreter
(``tests/engine/test_triton_interpret.py`` runs this file as a script with
``TRITON_INTERPRET=1``, which must be set before triton is imported).

A case is a batch of sequences ``(context_len, new_tokens)``: decodes (one new token) first,
then prefill chunks; their blocks are scattered at random over a cache with a second layer
beside the one under test, so the kernels must honour the cache's strides. The reference is
``TorchAttention`` in float32 on upcast copies of the same inputs.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata
from engine.attention.torch_ref import TorchAttention
from engine.model import apply_rotary

LAYER = 1  # the layer under test, of 2


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cos: torch.Tensor  # [T, 1, head_dim]
    sin: torch.Tensor
    kv: torch.Tensor  # the whole cache, [num_blocks, 2, 2, block_size, kvh, hd]
    meta: AttentionMetadata
    scale: float


def make_case(
    seqs: list[tuple[int, int]],  # (cached context, new tokens); decodes (new == 1) first
    num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
    device: str, seed: int = 0, spare_blocks: int = 3,
) -> Case:
    rng = random.Random(seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    seq_lens = [c + n for c, n in seqs]
    need = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(need) + spare_blocks
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    tables, at = [], 0
    for n in need:
        tables.append(ids[at:at + n])
        at += n
    width = max(need) + rng.randint(0, 2)  # padding past the longest table, as the runner may have
    padded = [t + [0] * (width - len(t)) for t in tables]
    slots, query_start = [], [0]
    for (ctx, new), table in zip(seqs, tables):
        slots += [table[p // block_size] * block_size + p % block_size for p in range(ctx, ctx + new)]
        query_start.append(query_start[-1] + new)
    num_tokens = query_start[-1]
    num_decodes = 0
    for _, new in seqs:
        if new != 1:
            break
        num_decodes += 1

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    # Positions far apart, so the rotation matters; cos/sin in the model's dtype, as the model passes them.
    positions = torch.tensor([p for ctx, new in seqs for p in range(ctx, ctx + new)], dtype=torch.float32)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    ang = torch.outer(positions, inv_freq)
    ang = torch.cat([ang, ang], dim=-1)
    meta = AttentionMetadata(
        num_decodes=num_decodes,
        query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_lens_host=[n for _, n in seqs],
        seq_lens_host=seq_lens,
        block_size=block_size,
    )
    return Case(
        q=randn(num_tokens, num_heads, head_dim), k=randn(num_tokens, num_kv_heads, head_dim),
        v=randn(num_tokens, num_kv_heads, head_dim),
        cos=ang.cos().to(dtype).to(device)[:, None], sin=ang.sin().to(dtype).to(device)[:, None],
        kv=randn(num_blocks, 2, 2, block_size, num_kv_heads, head_dim), meta=meta, scale=head_dim ** -0.5,
    )


def reference(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention output, cache) in float32."""
    f = torch.float32
    kv = case.kv.to(f)
    cos, sin = case.cos.to(f), case.sin.to(f)
    q = apply_rotary(case.q.to(f), cos, sin)
    k = apply_rotary(case.k.to(f), cos, sin)
    out = TorchAttention().forward(q, k, case.v.to(f), kv[:, LAYER], case.meta, case.scale)
    return out, kv


def run_triton(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    from engine.attention.triton_backend import TritonAttention

    kv = case.kv.clone()
    q = case.q.clone()
    out = TritonAttention().forward_with_rotary(
        q, case.k, case.v, case.cos, case.sin, kv[:, LAYER], case.meta, case.scale)
    return out, kv


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    assert torch.isfinite(x).all(), "non-finite output"
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def check(case: Case) -> tuple[float, float]:
    """Relative errors (output, cache); raises AssertionError past the dtype's tolerance."""
    out, kv = run_triton(case)
    ref_out, ref_kv = reference(case)
    tol = TOLERANCE[case.q.dtype]
    err_out = rel_err(out, ref_out)
    err_kv = rel_err(kv, ref_kv)
    assert err_out < tol, f"attention output: relative error {err_out:.2e} >= {tol:.0e}"
    assert err_kv < tol, f"KV cache: relative error {err_kv:.2e} >= {tol:.0e}"
    # The layer beside the one under test is untouched.
    other = 1 - LAYER
    assert torch.equal(kv[:, other], case.kv[:, other]), "wrote outside the layer"
    return err_out, err_kv


def check_fused_ops(device: str, dtype: torch.dtype, tol: float, rows: int = 5, n: int = 200,
                    seed: int = 0) -> None:
    """RMSNorm and SiLU-and-mul kernels against the model's torch arithmetic (the kernels round
    where it rounds, so on the GPU they differ by an ulp here and there)."""
    import torch.nn.functional as F

    from engine import triton_ops

    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(rows, n, generator=gen) * 3).to(dtype).to(device)
    w = torch.randn(n, generator=gen).to(dtype).to(device)
    xf = x.float()
    ref = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    assert rel_err(triton_ops.rms_norm(x, w, 1e-5), ref) < tol
    delta = torch.randn(rows, n, generator=gen).to(dtype).to(device)
    summed = delta + x
    sf = summed.float()
    ref = w * (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    normed, residual = triton_ops.rms_norm(delta, w, 1e-5, residual=x)
    if device == "cpu":  # the interpreter truncates to bfloat16
        assert rel_err(residual, summed) < tol
    else:
        assert torch.equal(residual, summed)
    assert rel_err(normed, ref) < tol
    gate_up = (torch.randn(rows, 2 * n, generator=gen) * 3).to(dtype).to(device)
    gate, up = gate_up.chunk(2, dim=-1)
    assert rel_err(triton_ops.silu_and_mul(gate_up), F.silu(gate) * up) < tol


def check_gemv(device: str, dtype: torch.dtype, tol: float, n: int, k: int, bias: bool = False,
               seed: int = 0) -> None:
    """The one-row linear kernels (plain, RMSNorm with and without a residual, SiLU-and-mul
    prologues) against torch: the prologue rounded as the model rounds, the product in float64."""
    import torch.nn.functional as F

    from engine import triton_gemv as g

    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    x, w = randn(1, k, scale=3.0), randn(n, k, scale=k ** -0.5)
    b = randn(n) if bias else None
    residual, norm_w = randn(1, k), randn(k)

    def ref_linear(h: torch.Tensor) -> torch.Tensor:
        return F.linear(h.double(), w.double(), None if b is None else b.double())

    def ref_norm(h: torch.Tensor) -> torch.Tensor:
        hf = h.float()
        normed = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
        return (norm_w.float() * normed.float()).to(dtype)

    assert rel_err(g.gemv(x, w, b), ref_linear(x)) < tol
    assert rel_err(g.gemv(x, w, b, g.RMS_NORM, norm_w, 1e-5), ref_linear(ref_norm(x))) < tol
    summed = (x.float() + residual.float()).to(dtype)
    y, res_out = g.gemv(x, w, b, g.RMS_NORM, norm_w, 1e-5, residual)
    assert rel_err(y, ref_linear(ref_norm(summed))) < tol
    if device == "cpu":  # the interpreter truncates to bfloat16
        assert rel_err(res_out, summed) < tol
    else:
        assert torch.equal(res_out, summed)
    gate_up = randn(1, 2 * k, scale=3.0)
    gate, up = gate_up.float().chunk(2, dim=-1)
    act = (F.silu(gate).to(dtype).float() * up).to(dtype)
    assert rel_err(g.gemv(gate_up, w, b, g.SILU_MUL), ref_linear(act)) < tol


# Small shapes for the interpreter: every path (decodes with and without splits, chunks with and
# without context, one-token chunks after decodes, odd group sizes, a head dim that is no power of 2).
SMALL_CASES = [
    # (seqs, heads, kv heads, head dim, block size)
    ([(0, 1), (5, 1), (37, 1)], 4, 4, 32, 16),
    ([(70, 1), (300, 1)], 8, 2, 32, 8),  # splits (max 300 tokens: one split of 256+)
    ([(600, 1)], 8, 1, 32, 16),  # 2 splits
    ([(0, 9)], 4, 2, 32, 16),
    ([(3, 1), (20, 40), (0, 70), (5, 2)], 4, 1, 32, 4),
    ([(130, 1), (17, 3)], 6, 2, 48, 16),  # group 3, head dim 48
]


def patch_interpreter_bf16_dot() -> None:
    """Triton's interpreter keeps bfloat16 as raw uint16 and multiplies those integers in
    ``tl.dot`` (seen in triton 3.9); widen bfloat16 operands to float32 first."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot

    def widen(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        wide = (h.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(wide, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot


def main() -> None:
    """Run SMALL_CASES on the CPU (the caller sets TRITON_INTERPRET=1)."""
    patch_interpreter_bf16_dot()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for i, (seqs, h, kvh, hd, bs) in enumerate(SMALL_CASES):
            case = make_case(seqs, h, kvh, hd, bs, dtype, "cpu", seed=i)
            err_out, err_kv = check(case)
            print(f"{dtype} case {i}: output {err_out:.1e} cache {err_kv:.1e}")
        # The interpreter truncates float32 to bfloat16 (the GPU rounds to nearest even).
        check_fused_ops("cpu", dtype, tol=TOLERANCE[dtype])
        for n, k, bias in ((24, 200, False), (40, 96, True), (7, 1030, False), (9, 2100, True)):
            check_gemv("cpu", dtype, TOLERANCE[dtype], n, k, bias)
    print("OK")


if __name__ == "__main__":
    sys.exit(main())
