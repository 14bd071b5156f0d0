"""This CPU's bf16 dot-product peak, and a 1024-token prefill against it: the floor.

The peak: every thread (all of them at once, one per CPU) runs a loop of VDPBF16PS on 24
independent zmm accumulators, nothing but registers (inline assembly: no loads, no stores), for
``--peak-s`` seconds; 64 FLOPs per instruction (16 lanes x 2 bf16 products x multiply-add). The
best of ``--peak-repeats`` runs, per core and in all; one core alone as well.

The prefill: ``bench/engine.py``'s ``prefill N`` row (SmolLM2-135M-Instruct in bfloat16, one prompt
of ``--prefill-len`` tokens to its first token, the prefix cache reset before every run), with every
call into the CPU kernels' extension timed (GEMMs by shape, attention, RMSNorm, rotary + KV cache
write); what is left of the wall time is the rest (embedding, cos/sin, Python and torch dispatch,
the scheduler). The FLOPs: GEMMs ``2 M N K`` per call as called; attention the causal dot products
a row needs (``q . k`` and ``p v`` over the keys at or before its position, ``4 hd`` each), and,
beside them, what the kernel computes (whole 32-key tiles). Prints, per part, the FLOPs, the
floor (its FLOPs at the peak), the measured time (the median run's) and the fraction of the peak
reached; JSON + PNG.

    python bench/cpu_peak.py                       # the peak and the prefill table
    python bench/cpu_peak.py --peak-only

Writes ``bench/results/cpu_peak_<time>.json`` and ``.png`` (``--out DIR`` elsewhere).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine import kernel_build

FLOP_PER_DPBF16 = 64  # 16 fp32 lanes, each two bf16 products added: 4 FLOPs
ACCUMULATORS = 24

_PEAK_C = r"""
#include <stdint.h>
#include <time.h>
#include <omp.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
#define D(r) "vdpbf16ps %%zmm30, %%zmm31, %%zmm" #r "\n\t"
__attribute__((target("avx512f,avx512bf16"))) static void dot_loop(int64_t iters) {
  __asm__ volatile(
      "vpxord %%zmm30, %%zmm30, %%zmm30\n\tvpxord %%zmm31, %%zmm31, %%zmm31\n\t"
      "1:\n\t" D(0) D(1) D(2) D(3) D(4) D(5) D(6) D(7) D(8) D(9) D(10) D(11) D(12) D(13) D(14) D(15)
      D(16) D(17) D(18) D(19) D(20) D(21) D(22) D(23) "dec %0\n\tjnz 1b\n\t"
      : "+r"(iters)::"cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
        "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22",
        "xmm23", "xmm30", "xmm31");
}
/* iters loop trips (24 VDPBF16PS each) on every one of `threads` threads at once; each thread's
   seconds in per_thread; returns the wall seconds of the whole parallel region. */
double peak(int64_t iters, int threads, double* per_thread) {
  const double t0 = now();
#pragma omp parallel num_threads(threads)
  {
    const double s = now();
    dot_loop(iters);
    per_thread[omp_get_thread_num()] = now() - s;
  }
  return now() - t0;
}
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def has_avx512_bf16() -> bool:
    """Whether this CPU has VDPBF16PS (Linux's flags)."""
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def peak_library() -> ctypes.CDLL:
    """The peak loop, compiled once into tandem's cache directory."""
    if not has_avx512_bf16():
        raise SystemExit("this CPU has no AVX512-BF16: the peak loop is VDPBF16PS")
    digest = hashlib.sha256(_PEAK_C.encode()).hexdigest()[:16]
    target = kernel_build.cache_root() / "cpu_peak" / digest / "peak.so"
    if not target.exists():
        cxx = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
        if cxx is None:
            raise SystemExit("no C compiler (gcc or cc) for the peak loop")
        target.parent.mkdir(parents=True, exist_ok=True)
        src = target.with_suffix(".c")
        src.write_text(_PEAK_C)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([cxx, "-O2", "-fopenmp", "-fPIC", "-shared", str(src), "-o", str(tmp)], check=True)
        os.replace(tmp, target)
    lib = ctypes.CDLL(str(target))
    lib.peak.restype = ctypes.c_double
    lib.peak.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.POINTER(ctypes.c_double)]
    return lib


def measure_peak(threads: int, seconds: float, repeats: int) -> dict:
    """GFLOP/s of the register-resident VDPBF16PS loop on `threads` threads at once (best run)."""
    lib = peak_library()
    per = (ctypes.c_double * threads)()
    flop_per_iter = ACCUMULATORS * FLOP_PER_DPBF16
    lib.peak(1_000_000, threads, per)  # warm: clocks up, threads made
    iters = max(1, int(seconds * 200e9 / flop_per_iter))  # ~seconds at 200 GFLOP/s per thread
    runs = []
    for _ in range(repeats):
        wall = lib.peak(iters, threads, per)
        per_thread = [iters * flop_per_iter / per[i] / 1e9 for i in range(threads)]
        runs.append({"wall_s": wall, "per_thread_gflops": per_thread,
                     "gflops": threads * iters * flop_per_iter / wall / 1e9})
    best = max(runs, key=lambda r: r["gflops"])
    return {"threads": threads, "gflops": best["gflops"], "per_thread_gflops": best["per_thread_gflops"],
            "runs": runs, "instructions_per_thread": iters * ACCUMULATORS}


class KernelTimer:
    """Stands in for the kernels' extension module: every call timed, by part (GEMMs by shape)."""

    def __init__(self, mod) -> None:
        self.mod = mod
        self.times: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.flop: dict[str, float] = defaultdict(float)

    def reset(self) -> None:
        self.times.clear()
        self.calls.clear()
        self.flop.clear()

    def __getattr__(self, name: str):
        fn = getattr(self.mod, name)
        if not callable(fn) or name in ("tier", "best_tier", "set_tier"):
            return fn

        def timed(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            dt = time.perf_counter() - t0
            key = name
            if name == "gemm":  # (a, lda, m, k, w, blocks, n, bias, epi, c, ldc, threads)
                m, k, n, epi = args[2], args[3], args[6], args[8]
                cols = 2 * n if epi == 2 else n  # silu-mul: gate and up columns
                key = f"gemm N={cols} K={k}" + (" (lm_head)" if epi == 1 else "")
                self.flop[key] += 2.0 * m * cols * k
            self.times[key] += dt
            self.calls[key] += 1
            return out

        return timed


def attention_flop(tokens: int, heads: int, head_dim: int, layers: int, tile: int = 32) -> tuple[float, float]:
    """(the causal FLOPs a prompt's rows need, what whole tiles of `tile` keys compute)."""
    need = sum(p + 1 for p in range(tokens))
    tiles = sum(-(-(p + 1) // tile) * tile for p in range(tokens))
    per_key = 4 * head_dim * heads * layers  # q.k and p v: head_dim multiply-adds each
    return need * per_key, tiles * per_key


def profile_prefill(args: argparse.Namespace) -> dict:
    import torch

    from engine import cpu_kernels
    from engine.llm import LLM
    from protocol.sampling import SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM("default", dtype="bfloat16", progress=False, kv_cache_bytes=1 << 30,
              num_threads=torch.get_num_threads())
    if cpu_kernels.load() is None:
        raise SystemExit("the CPU kernels are off: nothing to profile")
    g = torch.Generator().manual_seed(7)  # bench/engine.py's prompt
    prompt = torch.randint(100, 40000, (args.prefill_len,), generator=g).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=1)
    timer = KernelTimer(cpu_kernels._module)

    def run() -> float:
        llm.engine.reset_prefix_cache()
        t0 = time.perf_counter()
        llm.generate([prompt], params)
        return time.perf_counter() - t0

    run()
    plain = []  # unwrapped runs, alternating with the timed ones (the wrappers' own cost shows)
    runs = []
    for _ in range(args.repeats):
        plain.append(run())
        cpu_kernels._module = timer
        timer.reset()
        try:
            wall = run()
        finally:
            cpu_kernels._module = timer.mod
        runs.append({"wall_s": wall, "parts_s": dict(timer.times), "calls": dict(timer.calls),
                     "gemm_flop": dict(timer.flop)})
    arch = llm.engine.runner.model.arch
    return {"runs": runs, "plain_runs_s": plain, "threads": torch.get_num_threads(), "isa": cpu_kernels.isa(),
            "arch": {"layers": arch.num_layers, "heads": arch.num_heads, "kv_heads": arch.num_kv_heads,
                     "head_dim": arch.head_dim, "hidden": arch.hidden_size, "mlp": arch.intermediate_size}}


def floor_table(prof: dict, peak_gflops: float, tokens: int) -> list[dict]:
    a = prof["arch"]
    med = sorted(prof["runs"], key=lambda r: r["wall_s"])[len(prof["runs"]) // 2]
    parts = med["parts_s"]
    rows = []
    gemm_keys = sorted(k for k in parts if k.startswith("gemm"))
    for k in gemm_keys:
        rows.append({"part": k, "gflop": med["gemm_flop"][k] / 1e9, "time_s": parts[k], "calls": med["calls"][k]})
    need, tiles = attention_flop(tokens, a["heads"], a["head_dim"], a["layers"])
    rows.append({"part": "attention", "gflop": need / 1e9, "gflop_computed": tiles / 1e9,
                 "time_s": parts.get("attention", 0.0), "calls": med["calls"].get("attention", 0)})
    for k in ("rms_norm", "rotary_cache_write"):
        rows.append({"part": k, "gflop": 0.0, "time_s": parts.get(k, 0.0), "calls": med["calls"].get(k, 0)})
    kernels = sum(parts.values())
    rows.append({"part": "rest (outside the kernels)", "gflop": 0.0, "time_s": med["wall_s"] - kernels, "calls": 0})
    gemm_gflop = sum(r["gflop"] for r in rows if r["part"].startswith("gemm"))
    gemm_s = sum(r["time_s"] for r in rows if r["part"].startswith("gemm"))
    rows.append({"part": "all GEMMs", "gflop": gemm_gflop, "time_s": gemm_s, "calls": 0})
    rows.append({"part": "prefill (wall)", "gflop": gemm_gflop + need / 1e9, "time_s": med["wall_s"], "calls": 0})
    for r in rows:
        r["floor_s"] = r["gflop"] / peak_gflops
        r["gflops"] = r["gflop"] / r["time_s"] if r["time_s"] > 0 else 0.0
        r["fraction_of_peak"] = r["gflops"] / peak_gflops
    return rows


def plot(rows: list[dict], peak: dict, target_s: float, path: Path, title: str) -> None:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["time_s"] > 0]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    y = list(range(len(shown)))
    ax.barh(y, [r["time_s"] for r in shown], color="tab:blue", label="measured (median run)")
    ax.barh(y, [r["floor_s"] for r in shown], color="tab:orange", height=0.4, label="floor: FLOPs at the peak")
    for i, r in enumerate(shown):
        txt = f"{r['time_s'] * 1e3:.1f} ms"
        if r["gflop"]:
            txt += f", {r['gflop']:.1f} GFLOP, {100 * r['fraction_of_peak']:.0f}% of peak"
        ax.annotate(txt, (r["time_s"], i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
    ax.axvline(target_s, color="red", lw=1, ls="--", label=f"target {target_s} s")
    ax.set_yticks(y, [r["part"] for r in shown], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_xlim(0, 1.35 * max(max(r["time_s"] for r in shown), target_s))
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    ax.set_title("\n".join(textwrap.wrap(title, 110)), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peak-s", type=float, default=0.5, help="seconds per peak run")
    ap.add_argument("--peak-repeats", type=int, default=5)
    ap.add_argument("--peak-only", action="store_true")
    ap.add_argument("--prefill-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5, help="timed prefill runs (and as many plain ones)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all the process may use)")
    ap.add_argument("--target-s", type=float, default=0.3, help="the prefill target drawn on the plot")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    cpus = len(os.sched_getaffinity(0))
    log(f"peak: {cpus} threads at once, then one alone...")
    peak_all = measure_peak(cpus, args.peak_s, args.peak_repeats)
    peak_one = measure_peak(1, args.peak_s, args.peak_repeats)
    print(f"bf16 dot peak (VDPBF16PS, {ACCUMULATORS} register accumulators): {peak_all['gflops']:.0f} GFLOP/s on "
          f"{cpus} threads at once (per thread {', '.join(f'{g:.0f}' for g in peak_all['per_thread_gflops'])}); "
          f"{peak_one['gflops']:.0f} GFLOP/s one thread alone")
    out = {"cpus": cpus, "peak": peak_all, "peak_one_thread": peak_one, "load_average": os.getloadavg()}
    rows: list[dict] = []
    if not args.peak_only:
        log(f"prefill {args.prefill_len}: one warm-up, then {args.repeats} timed runs, alternating with plain ones...")
        prof = profile_prefill(args)
        rows = floor_table(prof, peak_all["gflops"], args.prefill_len)
        out.update({"prefill_len": args.prefill_len, "prefill": prof, "table": rows})
        plain = prof["plain_runs_s"]
        print(f"\nprefill {args.prefill_len} (bf16, {prof['threads']} threads, kernels {prof['isa']}): plain runs "
              f"median {statistics.median(plain):.3f} s, best {min(plain):.3f} s; the table is the median timed run's")
        print(f"{'part':34} {'GFLOP':>8} {'floor s':>8} {'measured s':>10} {'GFLOP/s':>8} {'of peak':>8} {'calls':>6}")
        for r in rows:
            print(f"{r['part']:34} {r['gflop']:8.2f} {r['floor_s']:8.3f} {r['time_s']:10.3f} {r['gflops']:8.0f} "
                  f"{100 * r['fraction_of_peak']:7.0f}% {r['calls']:6d}")
        total = rows[-1]
        need = total["gflop"] / args.target_s
        print(f"\nthe floor of the prefill's dot products at this CPU's peak: {total['floor_s']:.3f} s "
              f"({total['gflop']:.1f} GFLOP / {peak_all['gflops']:.0f} GFLOP/s); the target {args.target_s} s needs "
              f"{need:.0f} GFLOP/s, {need / peak_all['gflops']:.2f}x this CPU's peak")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / time.strftime("cpu_peak_%Y%m%d_%H%M%S")
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    if rows:
        title = (f"prefill {args.prefill_len} tokens, SmolLM2-135M bf16, {out['prefill']['threads']} threads; "
                 f"bf16 dot peak {peak_all['gflops']:.0f} GFLOP/s ({cpus} threads at once, VDPBF16PS in registers); "
                 f"load average {out['load_average'][0]:.1f}")
        plot(rows, peak_all, args.target_s, stem.with_suffix(".png"), title)
    print(f"# wrote {stem}.json" + (" and .png" if rows else ""))


if __name__ == "__main__":
    main()
