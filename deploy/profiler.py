"""Profile a worker's engine for the planner's throughput mode: prefill latency and busy
throughput vs prompt length, decode step time vs batch size and context. Writes the
:class:`planner.profile.Profile` file the planner reads.

Two probes answer the same two questions:

- :class:`EngineProbe` drives a real :class:`engine.llm_engine.LLMEngine` (the torch backend,
  or the ``sim`` backend, which sleeps the fitted step times) and times it;
- :class:`SimModelProbe` evaluates a sim profile's timing model (``engine.sim.SimProfile``)
  through the same chunked-prefill packing the scheduler does, without sleeping: how the
  shipped profiles for the sim's fitted shapes are made (``python -m deploy.profiler --sim NAME``).

This module imports the engine (torch); the planner never imports it.
"""

from __future__ import annotations

import argparse
import datetime
import math
import random
import time
from pathlib import Path
from typing import Any, Protocol

from planner.profile import PROFILE_DIR, DecodeGrid, PrefillCurve, Profile

ISL_GRID = (128, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
BATCH_GRID = (1, 8, 32, 64, 128, 256)
CONTEXT_GRID = (256, 1024, 2048, 4096, 8192, 16384)


class StepProbe(Protocol):
    def prefill_s(self, isls: list[int]) -> float:
        """Wall time to prefill these fresh prompts, submitted together, until each has its first token."""

    def decode_step_s(self, batch: int, context: int) -> float:
        """Wall time of one decode step of ``batch`` sequences holding ``context`` KV tokens each."""


class SimModelProbe:
    """A sim profile's step-time model, stepped through FCFS chunked prefill like the scheduler:
    each step takes up to ``max_num_batched_tokens`` prompt tokens, oldest prompt first."""

    def __init__(self, sim_profile: Any, max_num_batched_tokens: int = 2048) -> None:
        self.sim = sim_profile
        self.budget = max_num_batched_tokens

    def prefill_s(self, isls: list[int]) -> float:
        remaining = list(isls)
        done = [0] * len(isls)
        total = 0.0
        i = 0
        while i < len(remaining):
            budget, chunks, j = self.budget, [], i
            while j < len(remaining) and budget > 0:
                n = min(budget, remaining[j] - done[j])
                chunks.append((n, done[j]))
                budget -= n
                j += 1
            total += self.sim.step_time_s(chunks, [])
            for k, (n, _) in enumerate(chunks):
                done[i + k] += n
            while i < len(remaining) and done[i] >= remaining[i]:
                i += 1
        return total

    def decode_step_s(self, batch: int, context: int) -> float:
        return self.sim.step_time_s([], [context] * batch)


class EngineProbe:
    """Times a real engine through its public API (fresh random prompts, so nothing is cached)."""

    def __init__(self, engine: Any, decode_steps: int = 4, seed: int = 0) -> None:
        self.engine = engine
        self.decode_steps = decode_steps
        self.rng = random.Random(seed)
        self.vocab = engine.arch.vocab_size if hasattr(engine, "arch") else 1000

    def _prompt(self, n: int) -> list[int]:
        return [self.rng.randrange(10, min(self.vocab, 30000)) for _ in range(n)]

    def _sampling(self, max_tokens: int) -> Any:
        from protocol.sampling import SamplingParams

        return SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)

    def _drain(self) -> None:
        while self.engine.has_unfinished():
            self.engine.step()

    def prefill_s(self, isls: list[int]) -> float:
        for isl in isls:
            self.engine.add_request(f"p{self.rng.getrandbits(48)}", self._prompt(isl), self._sampling(1))
        t0 = time.perf_counter()
        self._drain()
        return time.perf_counter() - t0

    def decode_step_s(self, batch: int, context: int) -> float:
        ids = [f"d{self.rng.getrandbits(48)}" for _ in range(batch)]
        for rid in ids:
            self.engine.add_request(rid, self._prompt(context), self._sampling(self.decode_steps + 2))
        while self.engine.load().num_queued_prefill_tokens:  # prefill first, untimed
            self.engine.step()
        self.engine.step()  # the first decode step (warm)
        t0 = time.perf_counter()
        for _ in range(self.decode_steps):
            self.engine.step()
        elapsed = (time.perf_counter() - t0) / self.decode_steps
        self._drain()
        return elapsed


def sweep(probe: StepProbe, name: str, *, max_num_batched_tokens: int, max_num_seqs: int,
          kv_capacity_tokens: int, isl_grid: tuple[int, ...] = ISL_GRID, batch_grid: tuple[int, ...] = BATCH_GRID,
          context_grid: tuple[int, ...] = CONTEXT_GRID, source: dict[str, Any] | None = None,
          ttft_ms: float = 2000.0, itl_ms: float = 50.0) -> Profile:
    """Sweep ``probe`` over the grids and return the profile (capacity table at the targets).
    Busy prefill throughput at a length is measured on enough prompts to fill several steps."""
    latency, throughput = [], []
    for isl in isl_grid:
        latency.append(round(probe.prefill_s([isl]), 6))
        m = max(2, math.ceil(4 * max_num_batched_tokens / isl))
        throughput.append(round(m * isl / probe.prefill_s([isl] * m), 1))
    steps = tuple(tuple(round(probe.decode_step_s(b, c), 7) for c in context_grid) for b in batch_grid)
    profile = Profile(name=name, max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                      kv_capacity_tokens=kv_capacity_tokens,
                      prefill=PrefillCurve(tuple(isl_grid), tuple(latency), tuple(throughput)),
                      decode=DecodeGrid(tuple(batch_grid), tuple(context_grid), steps),
                      source={**(source or {}), "date": datetime.date.today().isoformat()})
    return profile.with_capacity(ttft_ms, itl_ms)


def kv_capacity_tokens(model: str, kv_cache_gib: float, block_size: int = 16, dtype: str = "bfloat16") -> int:
    """KV tokens a worker of ``model`` ("dummy:<preset>" or a config path) holds in ``kv_cache_gib``."""
    from engine.config import PRESETS, ModelArch, bytes_per_block

    preset = model.split(":", 1)[1] if model.startswith("dummy:") else None
    arch = ModelArch.from_hf(PRESETS[preset]) if preset else ModelArch.from_file(model)
    itemsize = 4 if dtype == "float32" else 2
    blocks = int(kv_cache_gib * (1 << 30)) // bytes_per_block(arch, block_size, itemsize)
    return blocks * block_size


# The sim's fitted shapes and the KV budget each is profiled with: an H200 (141 GB) keeps about
# 100 GiB for KV beside Llama-3.1-8B's 16 GB of weights; the CPU shape uses the default 1 GiB.
SHIPPED = {"h200-llama-3.1-8b": ("dummy:llama-3.1-8b", 100.0), "cpu-smollm2-135m": ("dummy:smollm2-135m", 1.0)}


def profile_sim(name: str, max_num_batched_tokens: int = 2048, max_num_seqs: int = 256) -> Profile:
    from engine.sim import SimProfile

    model, gib = SHIPPED[name]
    sim = SimProfile.load(name)
    kv = kv_capacity_tokens(model, gib)
    grids = {} if name.startswith("h200") else dict(isl_grid=(64, 128, 256, 512, 1024, 2048, 4096),
                                                    batch_grid=(1, 2, 4, 8, 16, 32),
                                                    context_grid=(128, 256, 512, 1024, 2048, 4096),
                                                    ttft_ms=5000.0, itl_ms=200.0)
    return sweep(SimModelProbe(sim, max_num_batched_tokens), name, max_num_batched_tokens=max_num_batched_tokens,
                 max_num_seqs=max_num_seqs, kv_capacity_tokens=kv,
                 source={"engine": "sim (timing model, not slept)", "sim_profile": name, "model": model,
                         "kv_cache_gib": gib, "fitted_on": sim.fitted_on}, **grids)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sim", action="append", default=[], help="profile the sim's fitted shape NAME "
                        f"(one of {sorted(SHIPPED)}) from its timing model")
    parser.add_argument("--out-dir", default=str(PROFILE_DIR))
    args = parser.parse_args(argv)
    for name in args.sim or sorted(SHIPPED):
        path = Path(args.out_dir) / f"{name}.json"
        profile_sim(name).save(path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
