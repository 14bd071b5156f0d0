"""What the batch-invariant mode (``EngineConfig.batch_invariant``) costs on one GPU, mode off
against mode on in the same process, A/B alternating.

Model: dummy weights of Llama-3.1-8B's shape in bfloat16 (``--model`` for another preset). Both
engines live side by side (``--kv-gib`` each); every figure is the median of ``--repeats`` runs,
off and on taken in turn.

1. Decode: ``LLM.generate`` of ``B`` random 512-token prompts (batch 1, 16, 64), 65 new tokens
   (greedy, ignore EOS), against the same prompts with 1 new token: decode tok/s is
   ``B * 64 / (t_65 - t_1)``. CUDA graphs on (the default), so the step is the kernels' time.
2. Prefill: one 2048-token prompt, and 8 prompts of 512 tokens, 1 new token each: the time of
   the generate call.
3. The linear layers alone (CUDA events, median of 50): the 8B model's four projections and its
   LM head at 1, 16, 64 and 2048 rows, cuBLAS (``F.linear``), the one-row GEMV where it applies,
   and the batch-invariant matmul.

    python bench/batch_invariant.py --json /tmp/bi.json      # + /tmp/bi.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

from bench.gpu import cuda_time_ms
from engine.config import PRESETS
from engine.llm import LLM
from protocol.sampling import SamplingParams


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def _timed(llm: LLM, prompts: list[list[int]], new: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate(prompts, params)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def engine_figures(args: argparse.Namespace) -> dict:
    preset = PRESETS[args.model]
    vocab = preset["vocab_size"]
    kv_bytes = int(args.kv_gib * (1 << 30))
    llms = {mode: LLM(f"dummy:{args.model}", device="cuda", dtype="bfloat16", kv_cache_bytes=kv_bytes,
                      max_num_seqs=64, max_model_len=4096, enable_prefix_caching=False,
                      batch_invariant=mode == "on", progress=False)
            for mode in ("off", "on")}
    out: dict = {"decode": [], "prefill": []}
    for batch in args.batches:
        prompts = _prompts(batch, 512, vocab, seed=batch)
        for llm in llms.values():  # warm-up: compiles, lazily captured graphs
            _timed(llm, prompts, 3)
        runs: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(args.repeats):
            for mode, llm in llms.items():
                t_full, t_one = _timed(llm, prompts, 65), _timed(llm, prompts, 1)
                runs[mode].append(batch * 64 / max(t_full - t_one, 1e-9))
        row = {"batch": batch, "off_tok_s": statistics.median(runs["off"]), "on_tok_s": statistics.median(runs["on"])}
        row["ratio_on_over_off"] = row["on_tok_s"] / row["off_tok_s"]
        out["decode"].append(row)
        log(f"decode batch {batch}: off {row['off_tok_s']:.0f} tok/s, on {row['on_tok_s']:.0f} tok/s, "
            f"on/off {row['ratio_on_over_off']:.3f}")
    for n, length in ((1, 2048), (8, 512)):
        prompts = _prompts(n, length, vocab, seed=100 + n)
        for llm in llms.values():
            _timed(llm, prompts, 1)
        runs = {"off": [], "on": []}
        for _ in range(args.repeats):
            for mode, llm in llms.items():
                runs[mode].append(_timed(llm, prompts, 1))
        row = {"prompts": n, "tokens": length, "off_ms": 1000 * statistics.median(runs["off"]),
               "on_ms": 1000 * statistics.median(runs["on"])}
        row["ratio_on_over_off"] = row["on_ms"] / row["off_ms"]
        out["prefill"].append(row)
        log(f"prefill {n} x {length}: off {row['off_ms']:.1f} ms, on {row['on_ms']:.1f} ms, "
            f"on/off {row['ratio_on_over_off']:.3f}")
    del llms
    torch.cuda.empty_cache()
    return out


def linear_figures(args: argparse.Namespace) -> list[dict]:
    from engine import triton_gemv, triton_matmul

    p = PRESETS[args.model]
    h, f = p["hidden_size"], p["intermediate_size"]
    kv = p["num_key_value_heads"] * h // p["num_attention_heads"]
    shapes = {"qkv": (h + 2 * kv, h), "o": (h, h), "gate_up": (2 * f, h), "down": (h, f),
              "lm_head": (p["vocab_size"], h)}
    rows = []
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for m in (1, 16, 64, 2048):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"layer": name, "n": n, "k": k, "m": m,
                   "cublas_us": 1000 * cuda_time_ms(lambda x=x, w=w: F.linear(x, w), warmup=5, iters=50),
                   "invariant_us": 1000 * cuda_time_ms(lambda x=x, w=w: triton_matmul.matmul(x, w), warmup=5, iters=50)}
            if triton_gemv.supports(x, w):
                row["gemv_us"] = 1000 * cuda_time_ms(lambda x=x, w=w: triton_gemv.gemv(x, w), warmup=5, iters=50)
            row["ratio_invariant_over_cublas"] = row["invariant_us"] / row["cublas_us"]
            rows.append(row)
            log(f"linear {name} [{n}x{k}] m={m}: cuBLAS {row['cublas_us']:.1f} us, invariant "
                f"{row['invariant_us']:.1f} us" + (f", gemv {row['gemv_us']:.1f} us" if "gemv_us" in row else ""))
    return rows


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    dec = result["engine"]["decode"]
    labels = [f"decode B={r['batch']}" for r in dec] + [f"prefill {r['prompts']}x{r['tokens']}"
                                                         for r in result["engine"]["prefill"]]
    # speed on / off: decode tok/s ratio, prefill time ratio inverted
    ratios = [r["ratio_on_over_off"] for r in dec] + [1 / r["ratio_on_over_off"] for r in result["engine"]["prefill"]]
    a.bar(labels, ratios, color="tab:blue")
    a.axhline(1.0, color="k", lw=0.8)
    a.set_ylabel("speed, mode on / off")
    a.set_title(f"batch-invariant mode, {result['model']} bf16, {result['device']}")
    a.tick_params(axis="x", rotation=30)
    lin = result.get("linear", [])
    for m in sorted({r["m"] for r in lin}):
        pts = [r for r in lin if r["m"] == m]
        b.plot([r["layer"] for r in pts], [r["ratio_invariant_over_cublas"] for r in pts], marker="o", label=f"M={m}")
    b.axhline(1.0, color="k", lw=0.8)
    b.set_ylabel("time, invariant matmul / cuBLAS")
    b.set_title("linear layers alone")
    if lin:
        b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b", choices=sorted(PRESETS))
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-gib", type=float, default=8.0)
    ap.add_argument("--skip-linear", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="write the results here (and a PNG beside it)")
    ap.add_argument("--plot", type=Path, default=None, help="only draw the PNG of a results JSON")
    args = ap.parse_args()
    if args.plot is not None:
        print(plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png")))
        return
    result = {"model": args.model, "device": torch.cuda.get_device_name(), "repeats": args.repeats,
              "linear": [] if args.skip_linear else linear_figures(args), "engine": engine_figures(args)}
    print(json.dumps(result, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
        try:
            log(f"wrote {args.json} and {plot(result, args.json.with_suffix('.png'))}")
        except ImportError:
            log(f"wrote {args.json} (no matplotlib: --plot {args.json} draws the PNG)")


if __name__ == "__main__":
    main()
