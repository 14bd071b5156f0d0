"""A prefill worker's engine step budget (``prefill_max_num_batched_tokens``): on the CPU at most
``CPU_PREFILL_STEP_TOKENS`` by default, so a queue of prompts reaches the decode tier a few at a
time instead of all at the end of one long step; a decode (or aggregated) worker's stays
``max_num_batched_tokens``; a GPU's prefill worker keeps the shared budget; a given value wins.
No processes: the config a worker builds, and an engine (sim) planning a queue of prompts with it."""

from __future__ import annotations

import pytest

from engine.llm_engine import LLMEngine
from protocol.sampling import SamplingParams
from runtime.settings import CPU_PREFILL_STEP_TOKENS, ClusterConfig, ConfigError, load_config
from worker.server import engine_config


def _budget(cfg: ClusterConfig, role: str) -> int:
    return engine_config(cfg, role).scheduler.max_num_batched_tokens


def test_prefill_worker_budget_by_device_and_setting() -> None:
    assert _budget(ClusterConfig(), "prefill") == CPU_PREFILL_STEP_TOKENS == 512
    assert _budget(ClusterConfig(), "decode") == 2048
    assert _budget(ClusterConfig(max_num_batched_tokens=256), "prefill") == 256  # never above the shared one
    assert _budget(ClusterConfig(device="cuda"), "prefill") == 2048
    assert _budget(ClusterConfig(engine="sim"), "prefill") == 2048  # the sim stands for its profile's device
    assert _budget(ClusterConfig(prefill_max_num_batched_tokens=1024), "prefill") == 1024
    assert _budget(load_config(env={"TANDEM_PREFILL_MAX_NUM_BATCHED_TOKENS": "768"}), "prefill") == 768
    with pytest.raises(ConfigError, match="prefill_max_num_batched_tokens"):
        ClusterConfig(prefill_max_num_batched_tokens=-1)


def test_prefill_worker_engine_steps_a_queue_within_its_budget() -> None:
    cfg = ClusterConfig(model="dummy:smollm2-135m", engine="sim", kv_cache_gib=0.05,
                        prefill_max_num_batched_tokens=CPU_PREFILL_STEP_TOKENS)
    llm = LLMEngine(engine_config(cfg, "prefill"), progress=False)
    for i in range(6):  # six 256-token prompts queued at once, as a wave of c8 reaches the prefill tier
        llm.add_request(f"r{i}", list(range(1000 * i, 1000 * i + 256)), SamplingParams(max_tokens=1))
    firsts = []
    while llm.has_unfinished():
        firsts.append(sum(1 for out in llm.step() if out.finished))
    assert firsts[:3] == [2, 2, 2], firsts  # two prompts a step (512 tokens), not six in one
