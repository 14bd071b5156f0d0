"""Diagnosis on the GPU: the attention kernels' launch variants side by side (CUDA-graph timed, so
launch cost stays out), the few-row fused linear kernels against cuBLAS, and a per-kernel profile
of eager decode and prefill steps of the Llama-3.1-8B-shaped dummy model.

    python bench/gpu_kernels.py                # variants + profiles
    python bench/gpu_kernels.py --no-profile --json kernels.json   # + kernels_<section>.png
    python bench/gpu_kernels.py --only gemv    # few-row linear and batch-1 attention variants

With ``--json FILE`` the variant tables are written there as ``sections`` (each: ``cases`` by
``variants``, ``values`` the fraction of the ceiling reached, ``raw`` the measure, None where a
variant failed), and a grid per section beside it (``bench/plots.py``; ``python bench/plots.py
FILE`` redraws them on any machine).
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import triton

from engine.attention.triton_decode import decode_attention, num_splits_for
from engine.attention.triton_prefill import prefill_attention

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16


def bench_us(fn) -> float:
    fn()  # compile (and fail, if it must) outside the capture
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=100) * 1e3


def section(title: str, unit: str, raw_unit: str, variants: list[Any]) -> dict[str, Any]:
    """One variant table of the JSON: rows are added with :func:`add_row`."""
    return {"title": title, "unit": unit, "raw_unit": raw_unit, "variants": [str(v) for v in variants],
            "cases": [], "values": [], "raw": []}


def add_row(table: dict[str, Any], case: str, raw: list[float | None], values: list[float | None]) -> None:
    table["cases"].append(case)
    table["raw"].append(raw)
    table["values"].append(values)


def _over(raw: list[float | None], ceiling: float) -> list[float | None]:
    return [None if r is None else r / ceiling for r in raw]


def cache(num_blocks: int) -> torch.Tensor:
    # One layer's view of a two-layer cache, as the engine passes it.
    kv = torch.randn(num_blocks, 2, 2, PAGE, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    return kv[:, 1]


def decode_variants(bw: float) -> dict[str, Any]:
    variants = [(64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 3), (128, 8, 3), (128, 4, 2), (32, 4, 4),
                (256, 8, 2)]
    table = section("decode kernel (BLOCK_N, warps, stages)", "fraction of copy bandwidth", "TB/s of KV read",
                    variants)
    print("\ndecode kernel, TB/s of KV read (fraction of copy bandwidth); variants (BLOCK_N, warps, stages)")
    print(f"{'case':<28}" + "".join(f"{v!s:>14}" for v in variants))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch, ctx, bound in ((1, 4096, 131072), (1, 4096, 4096), (32, 2048, 131072), (128, 2048, 2048),
                              (256, 1024, 1024), (256, 512, 512)):
        per_seq = -(-ctx // PAGE)
        kv = cache(batch * per_seq + 1)
        tables = torch.randperm(batch * per_seq, device="cuda").view(batch, per_seq).int()
        seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        splits = num_splits_for(batch, KV_HEADS, bound, sms)
        nbytes = batch * ctx * KV_HEADS * HEAD_DIM * 2 * 2
        cells, raw = [], []
        for bn, warps, stages in variants:
            try:
                us = bench_us(partial(decode_attention, q, kv, seq_lens, tables, 0.088, splits, block_n=bn,
                                      num_warps=warps, num_stages=stages))
                cells.append(f"{nbytes / us / 1e6:6.2f} ({nbytes / us / 1e6 / bw:3.0%})")
                raw.append(nbytes / us / 1e6)
            except Exception as e:  # out of resources, say
                cells.append(f"{type(e).__name__[:12]:>14}")
                raw.append(None)
        case = f"b={batch} ctx={ctx} splits={splits}"
        print(f"{case:<28}" + "".join(f"{c:>14}" for c in cells))
        add_row(table, case, raw, _over(raw, bw))
    return table


GEMV_SHAPES = [  # (name, N, K, prologue) of Llama-3.1-8B's decode-step linear layers
    ("qkv+norm", 6144, 4096, "rms_norm"), ("o_proj", 4096, 4096, "none"),
    ("gate_up+norm", 28672, 4096, "rms_norm"), ("down+silu", 4096, 14336, "silu_mul"),
    ("lm_head", 128256, 4096, "none"),
]


def _linear_unfused(ws, x, res, g, prologue) -> None:
    import torch.nn.functional as F

    from engine import triton_ops

    for w in ws:
        if prologue == "rms_norm":
            h, _ = triton_ops.rms_norm(x, g, 1e-5, res)
        elif prologue == "silu_mul":
            h = triton_ops.silu_and_mul(x)
        else:
            h = x
        F.linear(h, w)


def _linear_fused(ws, x, res, g, prologue, config, pdl) -> None:
    from engine import triton_gemv

    for w in ws:
        if prologue == "rms_norm":
            triton_gemv.gemv(x, w, None, prologue, g, 1e-5, res, config=config, pdl=pdl)
        else:
            triton_gemv.gemv(x, w, None, prologue, config=config, pdl=pdl)


def gemv_variants(bw: float) -> dict[str, Any]:
    """One-row linear layers with their prologue: cuBLAS after the unfused Triton op (today's
    path for large weights) against the fused Triton GEMV in several tilings, with programmatic
    dependent launch (and once without). Each case replays, in one CUDA graph, the op over enough
    copies of the weight to stream ~0.5 GB (as 32 layers do), so nothing is served from L2 and
    back-to-back launch gaps count."""
    from engine import triton_gemv

    pdl = triton_gemv._pdl_available(torch.device("cuda"))
    configs = [(8, 512, 4, False), (8, 512, 4, pdl), (4, 512, 4, pdl), (8, 256, 4, pdl), (16, 512, 8, pdl),
               (16, 256, 4, pdl), (4, 1024, 4, pdl), (8, 1024, 8, pdl), (32, 256, 8, pdl)]
    print(f"\none-row linear + prologue, us a call and fraction of copy bandwidth; cuBLAS + unfused op, then "
          f"fused (BLOCK_N, BLOCK_K, warps, PDL); PDL available: {pdl}")
    print(f"{'case':<14}{'cuBLAS':>14}" + "".join(f"{''.join(str(c).split())[:15]:>16}" for c in configs))
    table = section("one-row linear + prologue (cuBLAS + unfused op; fused BLOCK_N, BLOCK_K, warps, PDL)",
                    "fraction of copy bandwidth", "us a call", ["cuBLAS", *configs])
    dt = torch.bfloat16
    for name, n, k, prologue in GEMV_SHAPES:
        nbytes = n * k * 2
        copies = max(2, -(-(512 << 20) // nbytes))
        ws = [torch.randn(n, k, dtype=dt, device="cuda") * k ** -0.5 for _ in range(copies)]
        g = torch.randn(k, dtype=dt, device="cuda")
        x = torch.randn(1, 2 * k if prologue == "silu_mul" else k, dtype=dt, device="cuda")
        res = torch.randn(1, k, dtype=dt, device="cuda")
        fns = [partial(_linear_unfused, ws, x, res, g, prologue)]
        fns += [partial(_linear_fused, ws, x, res, g, prologue, (bn, bk, warps), p) for bn, bk, warps, p in configs]
        cells, raw = [], []
        for fn in fns:
            try:
                us = bench_us(fn) / copies
                cells.append(f"{us:6.1f}us {nbytes / us / 1e6 / bw:4.0%}")
                raw.append(us)
            except Exception as e:  # out of resources, say
                cells.append(f"{type(e).__name__[:12]:>14}")
                raw.append(None)
        print(f"{name:<14}" + "".join(f"{c:>16}" for c in cells), flush=True)
        add_row(table, name, raw, [None if us is None else nbytes / us / 1e6 / bw for us in raw])
    return table


def _rope_then_attend(q, k, v, cos, sin, kv, slots, seq_lens, tables, splits) -> None:
    from engine.attention.triton_rope_cache import rope_and_write_kv

    rope_and_write_kv(q, k, v, cos, sin, kv, slots)
    decode_attention(q, kv, seq_lens, tables, 0.088, splits)


def rope_decode_variants() -> dict[str, Any]:
    """Batch-1 decode attention as a CUDA graph replays it (splits for the engine's longest
    context): rotary + cache-write kernel then attention, against the fused launch."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print("\nbatch-1 decode attention (1 layer, splits for a 131072-token bound), us")
    table = section("batch-1 decode attention", "speed relative to the row's fastest", "us",
                    ["rope kernel + attention", "fused", "attention alone"])
    for ctx in (512, 4096):
        per_seq = -(-(ctx + 1) // PAGE)
        kv = cache(per_seq + 1)
        tables = torch.randperm(per_seq, device="cuda").view(1, per_seq).int()
        seq_lens = torch.full((1,), ctx + 1, dtype=torch.int32, device="cuda")
        slots = torch.tensor([int(tables[0, ctx // PAGE]) * PAGE + ctx % PAGE], device="cuda")
        qkv = torch.randn(1, (HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
        q, k, v = q.view(1, HEADS, HEAD_DIM), k.view(1, KV_HEADS, HEAD_DIM), v.view(1, KV_HEADS, HEAD_DIM)
        cos, sin = torch.randn(2, 1, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        splits = num_splits_for(1, KV_HEADS, 131072, sms)
        unfused = bench_us(partial(_rope_then_attend, q, k, v, cos, sin, kv, slots, seq_lens, tables, splits))
        fused = bench_us(partial(decode_attention, q, kv, seq_lens, tables, 0.088, splits,
                                 rope=(k, v, cos, sin, slots)))
        alone = bench_us(partial(decode_attention, q, kv, seq_lens, tables, 0.088, splits))
        print(f"ctx={ctx}: rope kernel + attention {unfused:6.1f}   fused {fused:6.1f}   attention alone {alone:6.1f}")
        fastest = min(unfused, fused, alone)
        add_row(table, f"ctx={ctx}", [unfused, fused, alone], [fastest / unfused, fastest / fused, fastest / alone])
    return table


def prefill_variants(rate: float) -> dict[str, Any]:
    variants = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                (128, 64, 8, 4), (128, 32, 4, 4), (64, 128, 4, 3)]
    table = section("prefill kernel (BLOCK_M, BLOCK_N, warps, stages)", "fraction of the matmul rate", "TFLOP/s",
                    variants)
    print("\nprefill kernel, TFLOP/s; variants (BLOCK_M, BLOCK_N, warps, stages)")
    print(f"{'case':<28}" + "".join(f"{v!s:>16}" for v in variants))
    for ctx, new in ((0, 4096), (0, 512), (3584, 512), (8000, 192)):
        total = ctx + new
        per_seq = -(-total // PAGE)
        kv = cache(per_seq + 1)
        block_table = torch.randperm(per_seq, device="cuda").view(1, per_seq).int()
        qsl = torch.tensor([0, new], dtype=torch.int32, device="cuda")
        seq_lens = torch.tensor([total], dtype=torch.int32, device="cuda")
        q = torch.randn(new, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        out = torch.empty_like(q)
        flops = 4 * HEADS * HEAD_DIM * new * (ctx + (new + 1) / 2)
        cells, raw = [], []
        for cfg in variants:
            try:
                us = bench_us(partial(prefill_attention, q, kv, qsl, seq_lens, block_table, 0, 1, new, 0.088, out,
                                      config=cfg))
                cells.append(f"{flops / us / 1e6:5.0f} ({flops / us / 1e6 / rate:3.0%})")
                raw.append(flops / us / 1e6)
            except Exception as e:
                cells.append(f"{type(e).__name__[:14]:>16}")
                raw.append(None)
        print(f"{f'ctx={ctx} new={new}':<28}" + "".join(f"{c:>16}" for c in cells))
        add_row(table, f"ctx={ctx} new={new}", raw, _over(raw, rate))
    return table


def profile_steps() -> None:
    """Top kernels of eager steps (no CUDA graph), by GPU time."""
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(Path(__file__).parent))
    from gpu import Steps

    from engine.llm import LLM

    llm = LLM("dummy:llama-3.1-8b", device="cuda", dtype="bfloat16", kv_cache_bytes=40 << 30, max_num_seqs=256,
              max_num_batched_tokens=4096, enforce_eager=True, progress=False)
    llm.engine.runner.kv.normal_()
    steps = Steps(llm)
    for label, batch, ctx, new in (("decode b=1 ctx=1024", 1, 1024, 1), ("decode b=256 ctx=512", 256, 512, 1),
                                   ("prefill 4096", 1, 0, 4096)):
        output, tables = steps.make(batch, ctx, new)
        for _ in range(2):
            steps.step(output, tables)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            steps.step(output, tables)
        print(f"\n=== {label} (eager) ===")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--only", choices=["gemv"], help="only the few-row linear and batch-1 attention variants")
    ap.add_argument("--json", type=Path, default=None, help="write the variant tables here, and their PNGs beside")
    args = ap.parse_args()
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    copy_ms = triton.testing.do_bench(partial(torch.Tensor.copy_, torch.empty_like(src), src), return_mode="median")
    bw = 2 * n / (copy_ms / 1e3) / 1e12
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_ms = triton.testing.do_bench(partial(torch.matmul, a, a), return_mode="median")
    rate = 2 * 8192 ** 3 / (mm_ms / 1e3) / 1e12
    print(f"copy {bw:.2f} TB/s, matmul {rate:.0f} TFLOP/s")
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                              "copy_tb_s": bw, "matmul_tflop_s": rate, "sections": {}}
    if args.only == "gemv":
        result["sections"] |= {"gemv": gemv_variants(bw), "rope_decode": rope_decode_variants()}
    else:
        result["sections"] |= {"decode": decode_variants(bw), "prefill": prefill_variants(rate)}
    if args.json:
        from bench import plots

        args.json.write_text(json.dumps(result, indent=2))
        for path in plots.gpu_kernels_figures(result, args.json.with_suffix("")):
            print(f"figure: {path}")
    if args.only is None and not args.no_profile:
        profile_steps()


if __name__ == "__main__":
    main()
