"""The Triton attention kernels against the torch reference on random paged layouts: many block
tables, contexts from 1 to 8k tokens, GQA ratios 1, 4 and 8, bfloat16 and float16 (and float32)."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

from kernel_cases import check, check_fused_ops, check_gemv, make_case

from engine.attention.triton_decode import decode_attention

GQA = [(8, 8), (32, 8), (32, 4)]  # (heads, kv heads): ratios 1, 4, 8
DTYPES = [torch.bfloat16, torch.float16]


def _decodes(rng: random.Random, n: int, longest: int) -> list[tuple[int, int]]:
    return [(rng.randint(0, longest - 1), 1) for _ in range(n)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("heads", "kv_heads"), GQA)
@pytest.mark.parametrize("num_decodes", [1, 7, 96])
def test_decode(dtype: torch.dtype, heads: int, kv_heads: int, num_decodes: int) -> None:
    rng = random.Random(num_decodes * 100 + heads + kv_heads)
    seqs = _decodes(rng, num_decodes, 8192)
    seqs[0] = (8191, 1)  # one at the 8k limit
    check(make_case(seqs, heads, kv_heads, 128, 16, dtype, "cuda", seed=rng.randint(0, 1 << 30)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("heads", "kv_heads"), GQA)
def test_mixed_batch(dtype: torch.dtype, heads: int, kv_heads: int) -> None:
    """Decodes, then chunks with and without cached context, of every length class."""
    rng = random.Random(heads * kv_heads)
    seqs = _decodes(rng, 20, 4096)
    seqs += [(0, 1000), (rng.randint(1, 6000), rng.randint(2, 700)), (5000, 3), (0, 2), (17, 1), (3000, 1)]
    seqs += [(rng.randint(0, 2000), rng.randint(1, 300)) for _ in range(8)]
    check(make_case(seqs, heads, kv_heads, 128, 16, dtype, "cuda", seed=7))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_prefill(dtype: torch.dtype) -> None:
    check(make_case([(0, 8192)], 32, 8, 128, 16, dtype, "cuda", seed=1))
    check(make_case([(4096, 4096)], 32, 8, 128, 16, dtype, "cuda", seed=2))


@pytest.mark.parametrize(("head_dim", "block_size"), [(64, 16), (128, 32), (64, 8), (96, 16)])
def test_shapes(head_dim: int, block_size: int) -> None:
    rng = random.Random(head_dim + block_size)
    seqs = _decodes(rng, 5, 3000) + [(rng.randint(0, 900), rng.randint(1, 500)) for _ in range(4)]
    check(make_case(seqs, 12, 4, head_dim, block_size, torch.bfloat16, "cuda", seed=3))


def test_float32_is_exact() -> None:
    rng = random.Random(5)
    seqs = [*_decodes(rng, 9, 5000), (300, 200), (0, 129)]
    check(make_case(seqs, 16, 4, 128, 16, torch.float32, "cuda", seed=4))


@pytest.mark.parametrize("num_splits", [1, 5])
def test_padding_rows_give_zeros(num_splits: int) -> None:
    """CUDA-graph padding: a context of length 0 yields zeros and reads nothing."""
    kv = torch.randn(4, 2, 16, 2, 64, dtype=torch.bfloat16, device="cuda")
    q = torch.randn(3, 8, 64, dtype=torch.bfloat16, device="cuda")
    seq_lens = torch.tensor([5, 0, 0], dtype=torch.int32, device="cuda")
    tables = torch.tensor([[2], [0], [0]], dtype=torch.int32, device="cuda")
    out = decode_attention(q, kv, seq_lens, tables, 0.125, num_splits)
    assert torch.isfinite(out).all()
    assert (out[1:] == 0).all()


@pytest.mark.parametrize("num_splits", [1, 5])
def test_fused_rotary_padding_rows(num_splits: int) -> None:
    """The decode kernel with rotary and the cache write fused: padding rows (length 0, slot -1)
    give zeros and write nothing; a real row writes its slot."""
    kv = torch.randn(4, 2, 16, 2, 64, dtype=torch.bfloat16, device="cuda")
    before = kv.clone()
    q = torch.randn(3, 8, 64, dtype=torch.bfloat16, device="cuda")
    k, v = torch.randn(2, 3, 2, 64, dtype=torch.bfloat16, device="cuda")
    cos, sin = torch.ones(3, 64, dtype=torch.bfloat16, device="cuda"), torch.zeros(3, 64, dtype=torch.bfloat16,
                                                                                   device="cuda")
    seq_lens = torch.tensor([5, 0, 0], dtype=torch.int32, device="cuda")
    tables = torch.tensor([[2], [0], [0]], dtype=torch.int32, device="cuda")
    slots = torch.tensor([2 * 16 + 4, -1, -1], dtype=torch.int64, device="cuda")
    out = decode_attention(q, kv, seq_lens, tables, 0.125, num_splits, rope=(k, v, cos, sin, slots))
    assert torch.isfinite(out).all()
    assert (out[1:] == 0).all()
    assert torch.equal(kv[2, 0, 4], k[0]) and torch.equal(kv[2, 1, 4], v[0])
    kv[2, :, 4] = before[2, :, 4]
    assert torch.equal(kv, before)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float32], ids=str)
@pytest.mark.parametrize(("n", "k", "bias"), [(6144, 4096, False), (4096, 14336, False), (1000, 576, True),
                                              (130, 96, True), (128256, 4096, False)])
def test_gemv(dtype: torch.dtype, n: int, k: int, bias: bool) -> None:
    check_gemv("cuda", dtype, tol=3e-3 if dtype != torch.float32 else 1e-5, n=n, k=k, bias=bias)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float32], ids=str)
@pytest.mark.parametrize(("rows", "n"), [(1, 4096), (300, 4096), (7, 14336), (33, 576)])
def test_fused_ops(dtype: torch.dtype, rows: int, n: int) -> None:
    check_fused_ops("cuda", dtype, tol=1e-3 if dtype != torch.float32 else 1e-6, rows=rows, n=n)
