"""The CPU kernels (engine/csrc) on their own: close to a float32 reference, and the same bits
whatever the thread count, the other rows of the batch, the chunking of a prompt and the ISA
tier (the portable tiers, which CI machines without native bf16 run, must compute what the
AVX512-BF16 one does)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels.turned_off(), reason="TANDEM_CPU_KERNELS=0 turns the kernels off")

TIERS = ["avx512bf16", "avx2", "generic"]


def test_the_kernels_build_here() -> None:
    """Where they are on, a machine that cannot build them fails here (not a silent skip):
    `make install` needs a C++ compiler."""
    assert cpu_kernels.load() is not None, "the CPU kernels did not build: is there a C++ compiler (c++/g++)?"
    assert cpu_kernels.isa() in TIERS


@pytest.fixture(params=TIERS)
def tier(request: pytest.FixtureRequest):
    """Each ISA tier this CPU runs, restored afterwards."""
    mod = cpu_kernels.load()
    assert mod is not None
    if TIERS.index(request.param) < TIERS.index(mod.best_tier()):
        pytest.skip(f"this CPU has no {request.param}")
    before = mod.tier()
    mod.set_tier(request.param)
    yield request.param
    mod.set_tier(before)


def with_threads(n: int, fn, *args, **kwargs):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(before)


def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).bfloat16()


# ---- GEMM --------------------------------------------------------------------------------
@pytest.mark.parametrize(("m", "k", "n"), [(1, 64, 40), (7, 1536, 576), (37, 576, 960), (300, 96, 33)])
def test_gemm_matches_float32_and_is_batch_and_thread_invariant(tier: str, m: int, k: int, n: int) -> None:
    x, w, bias = rand(m, k, seed=1), rand(n, k, seed=2), torch.randn(n)
    ref = F.linear(x.float(), w.float(), bias)
    layer = cpu_kernels.PackedWeight.pack(w, bias, out_float32=True)
    got = with_threads(2, layer, x)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert (got - ref).abs().max() < 1e-4 * k ** 0.5
    assert torch.equal(with_threads(1, layer, x), got)
    for row in (0, m - 1):  # a row alone: the same bits as in the batch
        assert torch.equal(layer(x[row:row + 1]), got[row:row + 1])
    as_bf16 = cpu_kernels.PackedWeight.pack(w, bias)(x)
    assert as_bf16.dtype == torch.bfloat16 and torch.equal(as_bf16, got.bfloat16())


def test_gemm_reads_strided_rows() -> None:
    x, w = rand(10, 2 * 64, seed=3), rand(32, 64, seed=4)
    layer = cpu_kernels.PackedWeight.pack(w)
    assert torch.equal(layer(x[:, 64:]), layer(x[:, 64:].contiguous()))


def test_gemm_silu_mul_epilogue(tier: str) -> None:
    x, gate, up = rand(9, 64, seed=5), rand(40, 64, seed=6), rand(40, 64, seed=7)  # 40: padded blocks
    fused = cpu_kernels.PackedWeight.pack(torch.cat([gate, up]), silu_mul=True)
    got = fused(x)
    ref = F.silu(F.linear(x, gate)) * F.linear(x, up)  # torch's bf16 arithmetic
    assert got.shape == ref.shape == (9, 40)
    assert (got.float() - ref.float()).abs().max() <= 2 ** -6 * ref.float().abs().max()
    assert torch.equal(fused(x[4:5]), got[4:5])


def test_gemm_rejects_bad_input() -> None:
    layer = cpu_kernels.PackedWeight.pack(rand(32, 64, seed=8))
    with pytest.raises(ValueError, match="features"):
        layer(rand(2, 66, seed=9))
    with pytest.raises(ValueError, match="bfloat16"):
        layer(torch.randn(2, 64))
    with pytest.raises(ValueError, match="unit last stride"):
        layer(rand(64, 2, seed=9).t())
    with pytest.raises(ValueError, match="even depth"):
        cpu_kernels.PackedWeight.pack(rand(32, 63, seed=9))


# ---- norms and rotary ----------------------------------------------------------------------
def test_rms_norm_matches_hf_arithmetic(tier: str) -> None:
    x, res, weight = rand(33, 200, seed=10), rand(33, 200, seed=11), rand(200, seed=12)
    out, new_res = cpu_kernels.rms_norm(x, weight, 1e-5, res)
    assert torch.equal(new_res, x + res)  # the residual add, rounded once as torch does
    h = new_res.float()
    ref = weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    # Only the mean's summation order differs from torch: at most one bf16 step apart, rarely.
    diff = (out.float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-6)
    assert diff.max() <= 2 ** -7 and (out != ref).float().mean() < 0.02
    alone, _ = cpu_kernels.rms_norm(new_res[5:6], weight, 1e-5)
    assert torch.equal(alone, out[5:6])


def test_rotary_and_cache_write(tier: str) -> None:
    t, h, kvh, hd, bs = 5, 4, 2, 16, 4
    qkv = rand(t, (h + 2 * kvh) * hd, seed=13)
    q, k, v = (x.view(t, -1, hd) for x in qkv.split([h * hd, kvh * hd, kvh * hd], dim=1))
    angles = torch.rand(t, 1, hd, generator=torch.Generator().manual_seed(14)) * 6
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    kv = torch.zeros(6, 3, 2, bs, kvh, hd, dtype=torch.bfloat16)
    slots = torch.tensor([5, 6, 7, 8, 21])
    q_rot = cpu_kernels.rotary_cache_write(q, k, v, cos, sin, kv[:, 1], slots)

    def rotary(x: torch.Tensor) -> torch.Tensor:  # Hugging Face's, on bf16 tensors
        rotated = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], dim=-1)
        return x * cos + rotated * sin

    assert torch.equal(q_rot, rotary(q))
    blocks, offsets = slots // bs, slots % bs
    assert torch.equal(kv[blocks, 1, 0, offsets], rotary(k))
    assert torch.equal(kv[blocks, 1, 1, offsets], v)
    kv[blocks, 1, :, offsets] = 0
    assert not kv.any()  # nothing else written


# ---- attention -----------------------------------------------------------------------------
H, KVH, HD, BS = 6, 2, 64, 16


Seqs = list[tuple[int, int, list[int]]]  # (new tokens, sequence length, block table) per sequence


def _tables(seqs: Seqs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query_start_loc, seq_lens, block_tables) of a step."""
    width = max(len(s[2]) for s in seqs)
    tables = torch.tensor([s[2] + [0] * (width - len(s[2])) for s in seqs], dtype=torch.int32)
    starts = torch.tensor([0] + [s[0] for s in seqs]).cumsum(0).int()
    return starts, torch.tensor([s[1] for s in seqs], dtype=torch.int32), tables


@pytest.fixture(scope="module")
def cache() -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """A 3-layer cache full of random K/V (layer 1 is read), a shuffled block table, 300 queries."""
    kv = rand(40, 3, 2, BS, KVH, HD, seed=20)
    table = torch.randperm(40, generator=torch.Generator().manual_seed(21))[:19].tolist()
    return kv[:, 1], table, rand(300, H, HD, seed=22)


def _attend(kv_layer: torch.Tensor, q: torch.Tensor, seqs: Seqs) -> torch.Tensor:
    starts, lens, tables = _tables(seqs)
    cpu_kernels.check_tables(starts, lens, tables, BS, q.shape[0], kv_layer.shape[0])
    return cpu_kernels.attention(q.contiguous(), kv_layer, starts, lens, tables, HD ** -0.5)


def test_attention_matches_float32_sdpa(cache, tier: str) -> None:
    kv_layer, table, q = cache
    got = _attend(kv_layer, q, [(300, 300, table)])
    pos = torch.arange(300)
    blocks = torch.tensor(table)[pos // BS]
    k, v = kv_layer[blocks, 0, pos % BS].float(), kv_layer[blocks, 1, pos % BS].float()
    ref = F.scaled_dot_product_attention(q.float().transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], is_causal=True, enable_gqa=True)[0].transpose(0, 1)
    # P is rounded to bf16 for P V (as torch's flash kernel does): within a few bf16 steps.
    assert (got.float() - ref).abs().max() < 0.02


def test_attention_is_chunk_batch_and_thread_invariant(cache, tier: str) -> None:
    kv_layer, table, q = cache
    whole = with_threads(2, _attend, kv_layer, q, [(300, 300, table)])
    assert torch.equal(with_threads(1, _attend, kv_layer, q, [(300, 300, table)]), whole)
    # The same prompt in two chunks (the second on top of the cached first), and as decodes.
    first, second = _attend(kv_layer, q[:117], [(117, 117, table)]), _attend(kv_layer, q[117:], [(183, 300, table)])
    assert torch.equal(torch.cat([first, second]), whole)
    for p in (0, 31, 32, 299):
        assert torch.equal(_attend(kv_layer, q[p:p + 1], [(1, p + 1, table)])[0], whole[p])
    # Every position as a decode, and in chunks of 2 (items of a few rows put the keys along the
    # lanes instead of the rows): ~10^5 outputs, enough to catch a changed order of summation.
    assert torch.equal(_attend(kv_layer, q, [(1, p + 1, table) for p in range(300)]), whole)
    assert torch.equal(_attend(kv_layer, q, [(2, p + 2, table) for p in range(0, 300, 2)]), whole)
    # A mixed batch: two decodes and a chunk of another sequence (a shorter table).
    mixed = _attend(kv_layer, torch.cat([q[299:300], q[40:41], q[64:100]]),
                    [(1, 300, table), (1, 41, table[:3]), (36, 100, table[:7])])
    assert torch.equal(mixed[0], whole[299]) and torch.equal(mixed[1], whole[40])
    assert torch.equal(mixed[2:], whole[64:100])


def test_attention_prefill_equals_decodes_on_a_long_prompt() -> None:
    """A 1024-token prompt against each of its positions decoded (the machine's own tier): a
    changed order of the softmax's sums flips only ~1 bf16 output in 10^5 (the bits of l rarely
    reach the rounded output), so this takes many outputs, with flat scores (many keys per sum)."""
    n = 1024
    kv_layer = rand(n // BS + 4, 2, BS, KVH, HD, seed=30)
    table = torch.randperm(n // BS + 4, generator=torch.Generator().manual_seed(31))[:n // BS].tolist()
    q = rand(n, H, HD, seed=32, scale=0.25)
    whole = _attend(kv_layer, q, [(n, n, table)])
    assert torch.equal(_attend(kv_layer, q, [(1, p + 1, table) for p in range(n)]), whole)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(8, 2, 128), (9, 3, 64), (8, 1, 64)])
def test_attention_decodes_equal_the_prompt_for_each_head_dim(tier: str, heads: int, kv_heads: int,
                                                              head_dim: int) -> None:
    """Decode items (few rows: the keys along the lanes, a head dim of 64 or 128 in registers) give
    the prompt's bits: one token per step, two per step, and groups of 8 and 4 query heads (an
    item of 8 rows goes in two passes of 4 through P V)."""
    n = 200
    kv_layer = rand(n // BS + 2, 2, BS, kv_heads, head_dim, seed=40)
    table = torch.randperm(n // BS + 2, generator=torch.Generator().manual_seed(41))[:-(-n // BS)].tolist()
    q = rand(n, heads, head_dim, seed=42, scale=0.5).contiguous()

    def attend(seqs: Seqs) -> torch.Tensor:
        starts, lens, tables = _tables(seqs)
        return cpu_kernels.attention(q, kv_layer, starts, lens, tables, head_dim ** -0.5)

    whole = attend([(n, n, table)])
    assert torch.equal(attend([(1, p + 1, table) for p in range(n)]), whole)
    assert torch.equal(attend([(2, p + 2, table) for p in range(0, n, 2)]), whole)


def test_attention_tables_are_checked(cache) -> None:
    kv_layer, table, _ = cache

    def check(seqs: Seqs, num_tokens: int) -> None:
        cpu_kernels.check_tables(*_tables(seqs), BS, num_tokens, kv_layer.shape[0])

    with pytest.raises(ValueError, match="beyond the block tables"):
        check([(4, 400, table)], 4)
    with pytest.raises(ValueError, match="outside"):
        check([(4, 20, [0, 99])], 4)
    with pytest.raises(ValueError, match="query_start_loc"):
        check([(4, 20, table)], 5)
    check([(4, 20, table), (1, 300, table)], 5)
