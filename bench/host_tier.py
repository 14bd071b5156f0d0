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

    python bench/host_tier.py --json /work/wt/notes/tier11/host_tier.json
    python bench/host_tier.py --device cuda --dtype bfloat16 --model PATH --prefix-len 8192
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
    args = parser.parse_args(argv)

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
    result = {
        "model": args.model, "device": args.device, "dtype": args.dtype, "prefix_len": args.prefix_len,
        "suffix_len": args.suffix_len, "block_size": bs, "bytes_per_block": engine.runner.bytes_per_block,
        "device_blocks": engine.num_kv_blocks, "host_blocks": engine.host_tier.num_slots,
        "threads": engine.config.num_threads,
        "median_s": medians,
        "fresh_over_host": medians["fresh"] / medians["host"],
        "host_over_device": medians["host"] / medians["device"],
        "host_load_ms_per_block": (medians["host"] - medians["device"]) * 1000 / (args.prefix_len // bs),
        "copy": bandwidth, "rounds": rounds,
    }
    print(f"\n{args.prefix_len}-token prefix, {args.model} {args.dtype} on {args.device} "
          f"({result['bytes_per_block']} B a block), median of {len(rounds)} rounds:")
    for m in MODES:
        print(f"  {m:7s} {medians[m] * 1000:9.1f} ms  (cached tokens {rounds[-1][f'{m}_cached']})")
    print(f"  offload (at eviction) {medians['offload'] * 1000:.1f} ms for {rounds[-1]['offloaded_blocks']} blocks")
    print(f"  fresh / host {result['fresh_over_host']:.1f}x; host / device {result['host_over_device']:.2f}x")
    print(f"  tier copies ({bandwidth['copy_blocks']} blocks): offload {bandwidth['offload_gbps']:.2f} GB/s, "
          f"load {bandwidth['load_gbps']:.2f} GB/s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json} and {plot(result, args.json.with_suffix('.png'))}")
    return 0


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
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
