"""The host tier on one engine: a prompt on a long shared prefix served fresh (the prefix computed),
from the device's prefix cache, and from the host tier (the prefix evicted from the device, copied
back), in one run.

Per round: a new random prefix of ``--prefix-len`` (1024) tokens; prompt 1 (prefix + ``--suffix-len``
(16) random tokens) is served fresh; prompt 2 (the prefix + other suffix tokens) takes the prefix
from the device cache; then every free device block is allocated and freed at once, which evicts
the prefix's cached blocks into the host tier (the offload is timed apart: it is paid at eviction,
not on the hit); prompt 3 takes the prefix from the host tier. Each prompt asks for one token, so
a prompt's time is its time to first token at the engine (``LLM.generate``'s wall time). The
engine's prefix cache (both tiers) is reset between rounds; one untimed round first. The table
gives each mode's median over ``--rounds`` (5) rounds; the JSON keeps every round, the engine's
cached-token counts that show where each prompt's prefix came from, and the copy bandwidth each way
measured on the tier itself (``HostKVTier.run`` of ``--copy-blocks`` consecutive blocks).

With ``--steps``, a second part: the step time of a serving loop with the tier off, with the
tier's copies on the compute stream, and with them on their own copy stream (CUDA; the default
there), A/B/C in one process, alternating over ``--ab-rounds``. ``--conversations`` prefixes of
``--prefix-len`` tokens are asked in turn, ``--concurrency`` requests in flight, each decoding
``--decode-tokens``; the device cache holds the requests in flight and a few prefixes more (so
each prefix comes back from the host tier, or is computed again with the tier off). Per mode: the
loop's wall time, tokens/s, and ``engine.step()``'s wall time (median, p90) over all steps and
over the steps that queued copies. ``--random-model`` makes a random Llama whose KV block is
Llama-3.1-8B's (32 layers, 8 KV heads of 128: 2 MiB a bfloat16 block) with a small hidden size,
for a GPU without weights.

    python bench/host_tier.py --json /work/wt/notes/tier11/host_tier.json
    python bench/host_tier.py --device cuda --dtype bfloat16 --model PATH --prefix-len 8192
    python bench/host_tier.py --device cuda --random-model --steps --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.block_manager import HostCopy
from engine.llm import LLM
from protocol.sampling import SamplingParams

MODES = ("fresh", "device", "host")
ONE_TOKEN = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)


def _sync(llm: LLM) -> None:
    if llm.engine.runner.device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def serve(llm: LLM, prompt: list[int]) -> tuple[float, int]:
    """Seconds to the prompt's one token, and its cached tokens."""
    start = time.perf_counter()
    result = llm.generate([prompt], ONE_TOKEN)[0]
    return time.perf_counter() - start, result.num_cached_tokens


def evict_to_host(llm: LLM) -> tuple[float, int]:
    """Allocate every free device block and free them: the cached ones are evicted (offloaded).
    Seconds the offloads took (an empty engine step runs them), and how many there were."""
    engine = llm.engine
    bm = engine.block_manager
    before = bm.host_stats.num_offloaded
    assert bm.allocate("bench-evict", bm.num_free_blocks * bm.block_size) is not None
    bm.free("bench-evict")
    start = time.perf_counter()
    engine.step()  # nothing to compute: runs the queued copies
    _sync(llm)
    return time.perf_counter() - start, bm.host_stats.num_offloaded - before


def copy_bandwidth(llm: LLM, num_blocks: int, repeats: int = 5) -> dict[str, float]:
    """GB/s of the tier's copies each way, ``num_blocks`` consecutive blocks at once (median of
    ``repeats``). The prefix cache is reset first (the copies overwrite blocks and slots)."""
    engine = llm.engine
    engine.reset_prefix_cache()
    tier = engine.host_tier
    n = min(num_blocks, tier.num_slots, engine.num_kv_blocks)
    nbytes = n * engine.runner.bytes_per_block
    out = {}
    for name, offload in (("offload_gbps", True), ("load_gbps", False)):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            tier.run([HostCopy(offload, k, k) for k in range(n)])
            _sync(llm)
            times.append(time.perf_counter() - start)
        out[name] = nbytes / statistics.median(times) / 1e9
    out["copy_blocks"] = n
    return out


def random_llama(path: Path) -> str:
    """A random bfloat16 Llama with Llama-3.1-8B's KV shape (32 layers, 8 KV heads of 128) and a
    1024 hidden size (~0.3 B parameters): the 8B model's copy sizes at a fraction of its compute."""
    import torch
    import transformers

    if not (path / "config.json").exists():
        config = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2048,
                                          num_hidden_layers=32, num_attention_heads=8, num_key_value_heads=8,
                                          head_dim=128, max_position_embeddings=8192, rope_theta=500000.0,
                                          bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(path)
    return str(path)


STEP_MODES = ("off", "compute", "side")


def churn(llm: LLM, prefixes: list[list[int]], rand, args: argparse.Namespace, tag: str) -> dict:
    """The serving loop of ``--steps``: every step's wall time and whether it queued copies."""
    engine = llm.engine
    tier = engine.host_tier
    sampling = SamplingParams(temperature=0.0, max_tokens=args.decode_tokens, ignore_eos=True)
    issued = inflight = 0
    steps: list[tuple[float, int]] = []
    cached = prompt = 0
    batches = (tier.num_batches, tier.num_waited) if tier is not None else (0, 0)
    _sync(llm)
    start = time.perf_counter()
    while issued < args.requests or engine.has_unfinished():
        while issued < args.requests and inflight < args.concurrency:
            engine.add_request(f"{tag}-{issued}", prefixes[issued % len(prefixes)] + rand(args.suffix_len), sampling)
            issued += 1
            inflight += 1
        copied = tier.num_offloaded + tier.num_loaded if tier is not None else 0
        t = time.perf_counter()
        outs = engine.step()
        steps.append((time.perf_counter() - t, (tier.num_offloaded + tier.num_loaded if tier else 0) - copied))
        for out in outs:
            if out.finished:
                inflight -= 1
                cached += out.num_cached_tokens
                prompt += args.prefix_len + args.suffix_len
    _sync(llm)
    wall = time.perf_counter() - start
    all_ms = sorted(dt * 1000 for dt, _ in steps)
    copy_ms = sorted(dt * 1000 for dt, n in steps if n)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {"wall_s": wall, "tokens_per_s": args.requests * args.decode_tokens / wall, "steps": len(steps),
            "step_ms_p50": pct(all_ms, 0.5), "step_ms_p90": pct(all_ms, 0.9), "step_ms_mean": statistics.fmean(all_ms),
            "copy_steps": len(copy_ms), "copy_step_ms_p50": pct(copy_ms, 0.5), "copy_step_ms_p90": pct(copy_ms, 0.9),
            "blocks_copied": sum(n for _, n in steps), "cached_ratio": cached / max(1, prompt),
            "copy_batches": tier.num_batches - batches[0] if tier else 0,
            "copy_batches_after_compute": tier.num_waited - batches[1] if tier else 0}


def step_ab(llm: LLM, off: LLM, args: argparse.Namespace, rand) -> dict:
    """Tier off, copies on the compute stream, copies on their own stream: alternating rounds."""
    prefixes = [rand(args.prefix_len) for _ in range(args.conversations)]
    runs: dict[str, list[dict]] = {m: [] for m in STEP_MODES}
    cuda = llm.engine.host_tier.stream is not None
    modes = STEP_MODES if cuda else ("off", "compute")
    for r in range(args.ab_warmup + args.ab_rounds):  # the first ab_warmup rounds: untimed warm-up
        for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
            which = off if mode == "off" else llm
            which.engine.reset_prefix_cache()
            if which.engine.host_tier is not None:
                which.engine.host_tier.side_stream = mode == "side"
            row = churn(which, prefixes, rand, args, f"{mode}{r}")
            print(f"steps round {r}{' (warm-up)' if r < args.ab_warmup else ''} {mode:7s}: " + ", ".join(
                f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
            if r >= args.ab_warmup:
                runs[mode].append(row)
    summary = {m: {k: statistics.median(row[k] for row in rows) for k in rows[0]} for m, rows in runs.items() if rows}
    return {"conversations": args.conversations, "concurrency": args.concurrency, "requests": args.requests,
            "prefix_len": args.prefix_len, "ab_rounds": args.ab_rounds, "ab_warmup": args.ab_warmup,
            "decode_tokens": args.decode_tokens, "summary": summary, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prefix-len", type=int, default=1024)
    parser.add_argument("--suffix-len", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device-blocks", type=int, default=0, help="device KV blocks (0: 2x the prompt's)")
    parser.add_argument("--host-blocks", type=int, default=0, help="host tier blocks (0: 4x the prompt's)")
    parser.add_argument("--copy-blocks", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here (and a PNG beside it)")
    parser.add_argument("--random-model", action="store_true", help="a random Llama with 8B's KV shape (see above)")
    parser.add_argument("--steps", action="store_true", help="also the step-time A/B (see above)")
    parser.add_argument("--ab-rounds", type=int, default=3)
    parser.add_argument("--ab-warmup", type=int, default=1, help="untimed rounds of the step A/B first")
    parser.add_argument("--conversations", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--decode-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    if args.random_model:
        import tempfile

        args.model = random_llama(Path(tempfile.gettempdir()) / "tandem-host-tier-llama")

    bs = 16
    prompt_blocks = -(-(args.prefix_len + args.suffix_len + 1) // bs)
    llm = LLM(args.model, device=args.device, dtype=args.dtype, block_size=bs,
              num_blocks=args.device_blocks or 2 * prompt_blocks, host_num_blocks=args.host_blocks or 4 * prompt_blocks,
              max_num_batched_tokens=max(2048, args.prefix_len + args.suffix_len), progress=False)
    engine = llm.engine
    vocab = engine.arch.vocab_size
    rng = random.Random(args.seed)

    def rand(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    rounds = []
    for r in range(args.rounds + 1):  # round 0: untimed warm-up
        engine.reset_prefix_cache()
        prefix = rand(args.prefix_len)
        row: dict[str, float | int] = {}
        row["fresh_s"], row["fresh_cached"] = serve(llm, prefix + rand(args.suffix_len))
        row["device_s"], row["device_cached"] = serve(llm, prefix + rand(args.suffix_len))
        row["offload_s"], row["offloaded_blocks"] = evict_to_host(llm)
        loaded = engine.block_manager.host_stats.num_loaded
        row["host_s"], row["host_cached"] = serve(llm, prefix + rand(args.suffix_len))
        row["loaded_blocks"] = engine.block_manager.host_stats.num_loaded - loaded
        if r:
            rounds.append(row)
        print(f"round {r}{' (warm-up)' if not r else ''}: " + ", ".join(
            f"{k} {v * 1000:.1f} ms" if k.endswith("_s") else f"{k} {v}" for k, v in row.items()), flush=True)

    medians = {m: statistics.median(row[f"{m}_s"] for row in rounds) for m in (*MODES, "offload")}
    bandwidth = copy_bandwidth(llm, args.copy_blocks)
    steps = None
    if args.steps:
        del llm
        prompt_blocks = -(-(args.prefix_len + args.suffix_len + args.decode_tokens) // bs)
        # Room for the requests in flight and a few prefixes more: a prefix asked again (after
        # ``--conversations`` others) was evicted meanwhile.
        device_blocks = (args.concurrency + max(1, args.conversations // 8)) * prompt_blocks
        kwargs = dict(device=args.device, dtype=args.dtype, block_size=bs, num_blocks=device_blocks,
                      max_num_batched_tokens=max(2048, args.prefix_len + args.suffix_len), progress=False)
        llm = LLM(args.model, host_num_blocks=(args.conversations + args.concurrency) * prompt_blocks, **kwargs)
        engine = llm.engine
        steps = step_ab(llm, LLM(args.model, **kwargs), args, rand)
        steps["device_blocks"] = device_blocks
    result = {
        "model": args.model, "device": args.device, "dtype": args.dtype, "prefix_len": args.prefix_len,
        "suffix_len": args.suffix_len, "block_size": bs, "bytes_per_block": engine.runner.bytes_per_block,
        "device_blocks": engine.num_kv_blocks, "host_blocks": engine.host_tier.num_slots,
        "threads": engine.config.num_threads,
        "median_s": medians,
        "fresh_over_host": medians["fresh"] / medians["host"],
        "host_over_device": medians["host"] / medians["device"],
        "host_load_ms_per_block": (medians["host"] - medians["device"]) * 1000 / (args.prefix_len // bs),
        "copy": bandwidth, "rounds": rounds, "step_ab": steps,
    }
    print(f"\n{args.prefix_len}-token prefix, {args.model} {args.dtype} on {args.device} "
          f"({result['bytes_per_block']} B a block), median of {len(rounds)} rounds:")
    for m in MODES:
        print(f"  {m:7s} {medians[m] * 1000:9.1f} ms  (cached tokens {rounds[-1][f'{m}_cached']})")
    print(f"  offload (at eviction) {medians['offload'] * 1000:.1f} ms for {rounds[-1]['offloaded_blocks']} blocks")
    print(f"  fresh / host {result['fresh_over_host']:.1f}x; host / device {result['host_over_device']:.2f}x")
    print(f"  tier copies ({bandwidth['copy_blocks']} blocks): offload {bandwidth['offload_gbps']:.2f} GB/s, "
          f"load {bandwidth['load_gbps']:.2f} GB/s")
    if steps:
        print(f"\nstep time, {args.conversations} prefixes of {args.prefix_len} tokens, {args.concurrency} in flight, "
              f"{args.decode_tokens} tokens each (medians of {args.ab_rounds} rounds):")
        for mode, row in steps["summary"].items():
            print(f"  {mode:7s} wall {row['wall_s']:.3f} s, {row['tokens_per_s']:.0f} tok/s, step p50 "
                  f"{row['step_ms_p50']:.2f} ms p90 {row['step_ms_p90']:.2f} ms; steps with copies "
                  f"({row['copy_steps']:.0f}) p50 {row['copy_step_ms_p50']:.2f} ms "
                  f"p90 {row['copy_step_ms_p90']:.2f} ms; "
                  f"cached {row['cached_ratio']:.2f}")
        if "side" in steps["summary"]:
            s, c = steps["summary"]["side"], steps["summary"]["compute"]
            steps["side_over_compute"] = {k: s[k] / c[k] for k in ("wall_s", "step_ms_p50", "copy_step_ms_p50",
                                                                    "copy_step_ms_p90")}
            ratios = steps["side_over_compute"].items()
            print("  side / compute stream: " + ", ".join(f"{k} {v:.3f}x" for k, v in ratios))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json} and {plot(result, args.json.with_suffix('.png'))}")
    return 0


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = result.get("step_ab")
    fig, axes = plt.subplots(1, 2 if steps else 1, figsize=(12 if steps else 6, 4), squeeze=False)
    ax = axes[0][0]
    if steps:
        bx = axes[0][1]
        modes = list(steps["summary"])
        width = 0.38
        keys = (("step_ms_p50", "all steps p50"), ("copy_step_ms_p90", "steps with copies p90"))
        for i, (key, label) in enumerate(keys):
            vals = [steps["summary"][m][key] for m in modes]
            bars = bx.bar([k + (i - 0.5) * width for k in range(len(modes))], vals, width, label=label)
            for bar, v in zip(bars, vals):
                bx.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
        bx.set_xticks(range(len(modes)), [{"off": "tier off", "compute": "copies on\ncompute stream",
                                           "side": "copies on\ncopy stream"}[m] for m in modes])
        bx.set(ylabel="engine.step() wall, ms", title="serving loop step time (median of rounds)")
        bx.legend()
        bx.grid(axis="y", alpha=0.3)
    ms = [result["median_s"][m] * 1000 for m in MODES]
    bars = ax.bar(["fresh\n(computed)", "device cache", "host tier\n(copied back)"], ms,
                  color=["tab:red", "tab:green", "tab:blue"])
    for bar, v in zip(bars, ms):
        ax.annotate(f"{v:.0f} ms", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom")
    ax.set(ylabel="time to first token, ms (median)",
           title=f"{result['prefix_len']}-token shared prefix, {result['dtype']} on {result['device']}: "
                 f"fresh/host {result['fresh_over_host']:.1f}x")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
