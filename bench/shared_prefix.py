"""Prompts that share prefixes, on one engine: the scheduler holding back a prompt whose next blocks
an earlier prompt is computing (``Scheduler.share_prefixes``, on) against computing them again
beside it (off), in one run.

The load is issue 16's ``prefix`` load at the engine: ``--num-prefixes`` (4) random prefixes of
``--prefix-len`` (512) tokens, each prompt one of them plus ``--suffix-len`` (64) random tokens,
``--output-len`` (32) tokens out (ignore_eos, greedy), ``--num-prompts`` (32) prompts shuffled as
``vllm bench serve``'s prefix_repetition dataset, closed loop at ``--concurrency`` (4): a new prompt
is added when one finishes. Per run: wall time, output tok/s, TTFT mean and median (the engine's
clock: ``add_request`` to the output with the first token), prompt tokens computed
(``LLMEngine.step_totals[1]``) and tokens taken from the prefix cache.

One engine; the modes alternate (on, off, off, on, on, off, ...) for ``--repeats`` rounds, its prefix cache
reset before every run, after one untimed warm-up run of the whole load (a first run maps the KV
cache's pages as it writes them, and was up to 10% slower). The table gives each mode's median run;
the JSON keeps every run.

    python bench/shared_prefix.py --json /work/wt/notes/sched8/shared_prefix.json
    python bench/shared_prefix.py --num-prefixes 1 --concurrency 8   # every prompt shares one prefix
    python bench/shared_prefix.py --num-prefixes 32 --concurrency 8  # distinct prompts: nothing to share
    python bench/shared_prefix.py --device cuda --kv-gib 0 --model PATH --num-prompts 256 --concurrency 32

An older checkout runs it too (``PYTHONPATH=that checkout``): without ``share_prefixes`` both modes
are its one way.
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

from engine.llm import LLM
from engine.llm_engine import LLMEngine
from protocol.sampling import SamplingParams


def make_prompts(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    rng = random.Random(args.seed)
    prefixes = [[rng.randrange(3, vocab) for _ in range(args.prefix_len)] for _ in range(args.num_prefixes)]
    prompts = [p + [rng.randrange(3, vocab) for _ in range(args.suffix_len)]
               for p in prefixes for _ in range(args.num_prompts // args.num_prefixes)]
    rng.shuffle(prompts)
    return prompts


def run(engine: LLMEngine, prompts: list[list[int]], args: argparse.Namespace, share: bool) -> dict:
    engine.reset_prefix_cache()
    engine.scheduler.share_prefixes = share
    stats = engine.scheduler.stats
    before = (engine.step_totals[1], stats.num_cached_tokens, getattr(stats, "num_prefix_holds", 0), engine.num_steps)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    added: dict[str, float] = {}
    ttft: list[float] = []
    pending = list(enumerate(prompts))[::-1]
    num_out = 0
    t0 = time.perf_counter()

    def add() -> None:
        i, prompt = pending.pop()
        added[f"p{i}"] = time.perf_counter()
        engine.add_request(f"p{i}", prompt, params)

    for _ in range(min(args.concurrency, len(pending))):
        add()
    while engine.has_unfinished():
        for out in engine.step():
            if out.new_token_ids and out.request_id in added:
                ttft.append(time.perf_counter() - added.pop(out.request_id))
            num_out += len(out.new_token_ids)
            if out.finished and pending:
                add()
    wall = time.perf_counter() - t0
    return {
        "share_prefixes": share, "wall_s": wall, "output_tok_s": num_out / wall,
        "ttft_mean_ms": 1e3 * statistics.mean(ttft), "ttft_median_ms": 1e3 * statistics.median(ttft),
        "prompt_tokens_computed": engine.step_totals[1] - before[0],
        "cached_tokens": stats.num_cached_tokens - before[1],
        "prefix_holds": getattr(stats, "num_prefix_holds", 0) - before[2],
        "steps": engine.num_steps - before[3],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kv-gib", type=float, default=1.0, help="KV cache size (0: sized from the device)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all the process may use)")
    ap.add_argument("--num-prefixes", type=int, default=4)
    ap.add_argument("--prefix-len", type=int, default=512)
    ap.add_argument("--suffix-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per mode")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    engine = LLM(args.model, dtype=args.dtype, device=args.device, num_threads=args.threads,
                 kv_cache_bytes=int(args.kv_gib * (1 << 30)), progress=False).engine
    prompts = make_prompts(args, engine.arch.vocab_size)
    run(engine, prompts, args, True)  # warm-up: every KV page the runs use is mapped (the first run paid for it)
    # The run right after another differs from the next (short loads show it most): the rounds
    # alternate which mode goes first.
    runs = [run(engine, prompts, args, share) for r in range(args.repeats)
            for share in ((True, False) if r % 2 == 0 else (False, True))]
    keys = ("wall_s", "output_tok_s", "ttft_mean_ms", "ttft_median_ms", "prompt_tokens_computed", "cached_tokens",
            "prefix_holds", "steps")
    medians = {mode: {k: statistics.median(r[k] for r in runs if r["share_prefixes"] is share) for k in keys}
               for mode, share in (("on", True), ("off", False))}
    print(f"{args.num_prompts} prompts: {args.num_prefixes} prefixes x {args.prefix_len} + {args.suffix_len}, "
          f"{args.output_len} out, concurrency {args.concurrency}; {args.dtype}; median of {args.repeats} runs")
    print("| share_prefixes | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for mode, m in medians.items():
        print(f"| {mode} | " + " | ".join(f"{m[k]:.1f}" if m[k] != int(m[k]) or k.endswith(("_s", "_ms")) else
                                         str(int(m[k])) for k in keys) + " |")
    on, off = medians["on"], medians["off"]
    print(f"on/off: wall {on['wall_s'] / off['wall_s']:.2f}x, tok/s {on['output_tok_s'] / off['output_tok_s']:.2f}x, "
          f"TTFT mean {on['ttft_mean_ms'] / off['ttft_mean_ms']:.2f}x, "
          f"prompt tokens computed {on['prompt_tokens_computed'] / off['prompt_tokens_computed']:.2f}x")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "runs": runs,
                                         "medians": medians, "load_avg": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
