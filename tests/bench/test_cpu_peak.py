"""``bench/cpu_peak.py``'s arithmetic: the causal attention FLOPs (against a count key by key), the
floor table's parts from a profile (the rest is the wall time the kernels do not account for), and
the register-resident VDPBF16PS loop itself where the CPU has AVX512-BF16 (it runs and gives a
rate)."""

from __future__ import annotations

import pytest

from bench import cpu_peak


def test_attention_flop_counts_keys_at_or_before_each_row() -> None:
    tokens, heads, hd, layers, tile = 70, 3, 8, 2, 32
    need = computed = 0
    for pos in range(tokens):  # row at position pos: keys 0..pos; the kernel computes whole tiles
        need += pos + 1
        computed += (pos // tile + 1) * tile
    got_need, got_computed = cpu_peak.attention_flop(tokens, heads, hd, layers, tile)
    per_key = 2 * 2 * hd * heads * layers  # q.k and p.v: hd multiply-adds each
    assert got_need == need * per_key
    assert got_computed == computed * per_key
    assert got_computed > got_need


def test_floor_table_parts_and_rest() -> None:
    arch = {"layers": 2, "heads": 3, "kv_heads": 1, "head_dim": 8, "hidden": 16, "mlp": 32}
    runs = []
    for wall in (0.5, 0.3, 0.4):  # the median run (0.4 s) makes the table
        parts = {"gemm N=64 K=16": wall / 4, "attention": wall / 8, "rms_norm": 0.01, "rotary_cache_write": 0.02}
        runs.append({"wall_s": wall, "parts_s": parts, "calls": {k: 2 for k in parts},
                     "gemm_flop": {"gemm N=64 K=16": 2.0 * 10 * 64 * 16 * 2}})
    rows = {r["part"]: r for r in cpu_peak.floor_table({"runs": runs, "arch": arch}, 100.0, 10)}
    assert rows["prefill (wall)"]["time_s"] == 0.4
    assert rows["gemm N=64 K=16"]["time_s"] == pytest.approx(0.1)
    assert rows["rest (outside the kernels)"]["time_s"] == pytest.approx(0.4 - 0.1 - 0.05 - 0.01 - 0.02)
    need, _ = cpu_peak.attention_flop(10, 3, 8, 2)
    assert rows["prefill (wall)"]["gflop"] == pytest.approx((2.0 * 10 * 64 * 16 * 2 + need) / 1e9)
    for r in rows.values():
        assert r["floor_s"] == pytest.approx(r["gflop"] / 100.0)
        if r["time_s"]:
            assert r["fraction_of_peak"] == pytest.approx(r["gflop"] / r["time_s"] / 100.0)


@pytest.mark.skipif(not cpu_peak.has_avx512_bf16(), reason="this CPU has no AVX512-BF16 (the peak loop is VDPBF16PS)")
def test_peak_loop_runs_on_every_thread() -> None:
    peak = cpu_peak.measure_peak(1, 0.02, 2)
    assert len(peak["runs"]) == 2 and len(peak["per_thread_gflops"]) == 1
    # One VDPBF16PS per cycle or so: anything from a slow VM's ~10 up to a few hundred GFLOP/s.
    assert 5.0 < peak["gflops"] < 2000.0
    assert peak["gflops"] == max(r["gflops"] for r in peak["runs"])
