"""Where a prompt goes whose decode worker would finish it itself (its uncached suffix within
``max_local_prefill_tokens``), disaggregated: to the prefill worker when the decode worker has
requests decoding and the prefill worker gets to it as soon (``suffix_prefill``,
``policy.suffix_goes_remote``), else computed on the decode worker. The routing core is the real
one; the tiers' indexes and in-flight accounting are set as the requests before would have left
them (no worker is called)."""

from __future__ import annotations

import pytest

from protocol.model_card import ModelCard
from router.request_flow import RequestFlow
from runtime.discovery import WorkerInfo
from runtime.settings import ClusterConfig, ConfigError

BS = 16
PREFIX = list(range(5000, 5512))  # 32 blocks both workers hold
PROMPT = PREFIX + list(range(64))  # 4 blocks more: within max_local_prefill_tokens


def make_core(**cfg_kw) -> RequestFlow:
    cfg = ClusterConfig(mode="disaggregated", routing_policy="kv", kv_events=False, max_local_prefill_tokens=64,
                        **cfg_kw)
    core = RequestFlow(cfg, plane=None)  # type: ignore[arg-type]  (no I/O)
    for pool, ids in ((core.prefill, ["p0"]), (core.decode, ["d0"])):
        pool.workers._workers = {w: WorkerInfo(w, pool.role, f"127.0.0.1:{9000 + i}", ModelCard("m", 4096), BS)
                                 for i, w in enumerate(ids)}
    return core


def hold_prefix(core: RequestFlow, *workers: str) -> None:
    """``workers`` hold PREFIX's blocks (as a prompt routed there before leaves them)."""
    for role, worker in (("decode", w) if w.startswith("d") else ("prefill", w) for w in workers):
        tier = core.tiers[role]
        tier.landed.record(worker, tier.hashes(PROMPT)[:len(PREFIX) // BS])


def test_a_suffix_goes_to_the_prefill_worker_while_the_decode_worker_decodes() -> None:
    core = make_core()
    hold_prefix(core, "d0", "p0")
    core.decode.open("d0", 0, 600)  # a request decoding there
    plan = core._plan(PROMPT, 1)
    assert plan.prefill is not None and plan.prefill.worker_id == "p0"
    assert plan.prefill.overlap_blocks == 32  # P computes the suffix alone
    assert not plan.decode.local_prefill and plan.decode.overlap_blocks == 32  # D pulls its 4 blocks only


def test_a_suffix_stays_on_an_idle_decode_worker() -> None:
    core = make_core()
    hold_prefix(core, "d0", "p0")
    plan = core._plan(PROMPT, 1)
    assert plan.prefill is None and plan.decode.local_prefill


def test_a_suffix_stays_where_the_prefill_worker_would_compute_more() -> None:
    core = make_core()
    hold_prefix(core, "d0")  # P lacks the prefix: it would compute all 36 blocks
    core.decode.open("d0", 0, 600)
    assert core._plan(PROMPT, 1).prefill is None
    hold_prefix(core, "p0")
    core.prefill.open("p0", 576)  # P has a prompt queued ahead of it
    assert core._plan(PROMPT, 1).prefill is None


def test_suffix_prefill_off_keeps_every_suffix_local() -> None:
    core = make_core(suffix_prefill="off")
    hold_prefix(core, "d0", "p0")
    core.decode.open("d0", 0, 600)
    assert core._plan(PROMPT, 1).prefill is None


def test_suffix_prefill_setting() -> None:
    assert ClusterConfig().suffix_prefill_remote()  # auto: the CPU torch engine
    assert not ClusterConfig(device="cuda").suffix_prefill_remote()
    assert not ClusterConfig(engine="sim").suffix_prefill_remote()
    assert ClusterConfig(device="cuda", suffix_prefill="on").suffix_prefill_remote()
    with pytest.raises(ConfigError, match="suffix_prefill"):
        ClusterConfig(suffix_prefill="sometimes")
