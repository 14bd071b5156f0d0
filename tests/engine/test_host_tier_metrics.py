"""A worker's host-tier metrics (``worker.server.LoadCollector``, the ``tandem_worker_host_kv_*`` of
``runtime.metric_catalog``), scraped as Prometheus text from a real engine (tiny random Llama, CPU)
whose host tier took a prefix the device evicted and gave it back: capacity, blocks held, blocks
and bytes each way equal the engine's own counts; an engine without a tier serves zeros."""

from __future__ import annotations

from engine_testlib import make_tiny_llm, random_prompts
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_host_tier import BS, DEVICE_BLOCKS, PREFIX, serve

from engine.async_engine import AsyncEngine
from engine.llm import LLM
from worker.server import LoadCollector

HOST = "tandem_worker_host_kv_"


def scrape(llm: LLM) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(LoadCollector(AsyncEngine(llm.engine)))  # not started: read as a scrape would
    text = generate_latest(registry).decode()
    return {s.name.removeprefix(HOST): s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith(HOST)}


def test_the_host_tier_metrics_are_the_engines_counts(tiny_llama_path: str) -> None:
    prefix = random_prompts([PREFIX], seed=31)[0]
    a, b, c = random_prompts([9, 9, 12], seed=32)
    prompts = {"a": prefix + a, "fill": random_prompts([100, 100, 100], seed=33), "b": prefix + b, "c": prefix + c}
    llm = make_tiny_llm(tiny_llama_path, num_blocks=DEVICE_BLOCKS, max_model_len=256, host_num_blocks=32)
    assert scrape(llm) == {"blocks": 32, "used_blocks": 0, "loaded_blocks_total": 0, "offloaded_blocks_total": 0,
                           "loaded_bytes_total": 0, "offloaded_bytes_total": 0}
    serve(llm, prompts)
    tier, bm = llm.engine.host_tier, llm.engine.block_manager
    block = llm.engine.runner.bytes_per_block
    assert tier.bytes_per_block == block
    got = scrape(llm)
    assert got["loaded_blocks_total"] == PREFIX // BS == bm.host_stats.num_loaded
    assert got["offloaded_blocks_total"] == tier.num_offloaded == bm.host_stats.num_offloaded > 0
    assert got["loaded_bytes_total"] == PREFIX // BS * block
    assert got["offloaded_bytes_total"] == tier.num_offloaded * block
    assert got["used_blocks"] == bm.num_host_cached_blocks > 0 and got["blocks"] == 32

    off = make_tiny_llm(tiny_llama_path, num_blocks=DEVICE_BLOCKS, max_model_len=256)
    serve(off, prompts)
    assert set(scrape(off).values()) == {0}
