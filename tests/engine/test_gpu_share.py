"""Decode priority on a shared GPU (engine.gpu_share), on the CPU: the flag between two processes'
views of one file, the decode engine's hold for a handed-off request's first decode step, and the
prefill engine's forward waiting layer by layer while a hold is up, its tokens unchanged."""

from __future__ import annotations

import time
from pathlib import Path

from test_engine_handoff import aggregated, assert_same, disaggregated, engine

from engine import gpu_share
from engine.gpu_share import GpuShare
from engine.llm_engine import LLMEngine
from protocol.sampling import SamplingParams


def test_a_hold_is_seen_through_the_file_bounded_and_released(tmp_path: Path) -> None:
    decode, prefill = GpuShare(tmp_path / "gpu-a", "decode"), GpuShare(tmp_path / "gpu-a", "prefill")
    other_gpu = GpuShare(tmp_path / "gpu-b", "prefill")
    assert not prefill.decode_alive()  # no decode worker stepped yet
    decode.beat()
    assert prefill.decode_alive() and not other_gpu.decode_alive() and not decode.decode_alive()
    prefill.wait_held()
    assert prefill.num_waits == 0  # nothing held
    decode.hold(60.0)
    start = time.monotonic()
    prefill.wait_held()  # a hold that is never released costs MAX_WAIT_S, no more
    assert time.monotonic() - start >= gpu_share.MAX_WAIT_S and prefill.num_waits == 1
    other_gpu.wait_held()
    assert other_gpu.num_waits == 0  # another GPU's file
    decode.release()
    prefill.wait_held()
    assert prefill.num_waits == 1
    # A stale release leaves a newer hold (another decode process's) up.
    newer = GpuShare(tmp_path / "gpu-a", "decode")
    decode.hold(60.0)
    newer.hold(60.0)
    decode.release()
    prefill.wait_held()
    assert prefill.num_waits == 2


def test_decode_engine_holds_for_a_handed_off_requests_first_step(tiny_llama_path: str, tmp_path: Path) -> None:
    prompts = [list(range(7, 40)), list(range(50, 70)), list(range(90, 131))]
    params = [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)] * 3
    want = aggregated(engine(tiny_llama_path, "float32", False), prompts, params)
    prefill, decode = engine(tiny_llama_path, "float32", True), engine(tiny_llama_path, "float32", True)
    decode_share = GpuShare(tmp_path / "gpu", "decode")
    decode.use_gpu_share(decode_share)
    prefill.use_gpu_share(GpuShare(tmp_path / "gpu", "prefill"))
    got = disaggregated(prefill, decode, prompts, params)
    assert_same(got, want)
    # r0 and r1 join one step, r2 a later one (disaggregated() steps after every second handoff):
    # one held step each time, released when applied.
    assert decode_share.num_holds == 2
    assert decode_share._read()[0] == 0.0
    decode.add_request("plain", prompts[0], params[0])
    while decode.has_unfinished():
        decode.step()
    assert decode_share.num_holds == 2  # no handoff, no hold


def test_prefill_forward_waits_out_a_hold_layer_by_layer(tiny_llama_path: str, tmp_path: Path) -> None:
    prompt, p = list(range(3, 30)), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    want = aggregated(engine(tiny_llama_path, "float32", False), [prompt], [p])
    prefill: LLMEngine = engine(tiny_llama_path, "float32", False)
    share = GpuShare(tmp_path / "gpu", "prefill")
    prefill.use_gpu_share(share)
    holder = GpuShare(tmp_path / "gpu", "decode")
    holder.hold(60.0)  # a decode step that never ends: every layer waits its bound
    got = aggregated(prefill, [prompt], [p])
    assert_same(got, want)
    num_layers = prefill.arch.num_layers
    assert share.num_waits >= num_layers  # the prompt's forward and each decode's
    holder.release()
    waits = share.num_waits
    aggregated(prefill, [prompt[::-1]], [p])
    assert share.num_waits == waits
