"""The CPU KV cache is faulted in ahead of the block manager's frontier (``engine.kv_prefault``):
pages of the next blocks to be handed out are mapped before a prefill writes them, their bytes
unchanged, and no further than the window."""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable

import torch
from engine_testlib import TinyModel

from engine.kv_prefault import KVPrefaulter
from engine.llm import LLM
from engine.model_runner import kv_cache_zeros, release_pages
from protocol.sampling import SamplingParams

PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_blocks(kv: torch.Tensor) -> list[bool]:
    """Per block: are all its pages mapped (mincore)?"""
    libc = ctypes.CDLL(None, use_errno=True)
    size = kv.numel() * kv.element_size()
    vec = (ctypes.c_ubyte * (size // PAGE))()
    assert libc.mincore(ctypes.c_void_p(kv.data_ptr()), ctypes.c_size_t(size), vec) == 0
    per_block = size // PAGE // kv.shape[0]
    return [all(vec[b * per_block + i] & 1 for i in range(per_block)) for b in range(kv.shape[0])]


def wait_for(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_prefaulter_maps_a_window_past_the_frontier_and_keeps_the_bytes() -> None:
    kv = kv_cache_zeros((64, 2, 4 * PAGE), torch.bfloat16, torch.device("cpu"))  # 16 pages a block
    kv[2, 0, :8] = torch.arange(8)  # a block the engine already wrote
    frontier = [3]
    pf = KVPrefaulter(kv, lambda: frontier[0], window_bytes=5 * 16 * PAGE).start()
    try:
        wait_for(lambda: pf.num_mapped_blocks == 8)
        time.sleep(0.15)  # a few polls: it stays within the window
        assert resident_blocks(kv) == [True] * 8 + [False] * 56
        frontier[0] = 40
        wait_for(lambda: pf.num_mapped_blocks == 45)
        assert resident_blocks(kv) == [True] * 45 + [False] * 19
        assert kv[2, 0, :8].tolist() == list(range(8)) and not kv[3:].any()
        frontier[0] = 64
        pf.join(10)  # the whole cache is mapped: it ends
        assert not pf._thread.is_alive() and all(resident_blocks(kv))
    finally:
        pf.stop()


def test_released_pages_leave_the_process_and_read_zero() -> None:
    """A parked CPU worker's cache (``ModelRunner.park``): its memory goes back to the system and
    its blocks read zero (a shared mapping only unmapped them: the bytes came back)."""
    kv = kv_cache_zeros((16, 2, 4 * PAGE), torch.bfloat16, torch.device("cpu"))
    kv.fill_(1.0)
    assert all(resident_blocks(kv))
    assert release_pages(kv) == kv.numel() * kv.element_size()
    assert not any(resident_blocks(kv))
    assert not kv.any()


def test_the_cpu_engine_prefaults_its_cache(tiny_model: Callable[[str], TinyModel]) -> None:
    llm = LLM(str(tiny_model("llama").path), dtype="bfloat16", num_blocks=512, progress=False)
    engine = llm.engine
    pf = engine.kv_prefaulter
    assert pf is not None
    llm.generate([[5] * 100], SamplingParams(max_tokens=4, ignore_eos=True))
    assert engine.block_manager.frontier > 0
    # The tiny model's blocks are small: its 64 MiB window is the whole cache.
    wait_for(lambda: pf.num_mapped_blocks == 512)
    assert all(resident_blocks(engine.runner.kv))


def test_a_parked_engine_stops_prefaulting_and_starts_again_unparked(tiny_model: Callable[[str], TinyModel]) -> None:
    """Park releases the cache's pages; a prefaulter still running would map its window again
    (here: it is inside its frontier read when the park begins, and goes on 0.3 s later)."""
    llm = LLM(str(tiny_model("llama").path), dtype="bfloat16", num_blocks=512, progress=False)
    engine, kv = llm.engine, llm.engine.runner.kv
    assert engine.kv_prefaulter is not None
    engine.kv_prefaulter.stop()
    engine.kv_prefaulter.join()
    inside, go_on = threading.Event(), threading.Event()

    def frontier() -> int:
        inside.set()
        go_on.wait()
        return 0

    engine.kv_prefaulter = KVPrefaulter(kv, frontier).start()
    assert inside.wait(10)
    threading.Timer(0.3, go_on.set).start()
    engine.park()
    go_on.wait()
    time.sleep(0.3)  # time for a prefaulter left running to map its window (the whole tiny cache)
    assert not any(resident_blocks(kv))

    engine.unpark()
    pf = engine.kv_prefaulter
    assert pf is not None and pf._thread.is_alive()
    wait_for(lambda: pf.num_mapped_blocks == 512)
    assert all(resident_blocks(kv))
    assert llm.generate([[5] * 40], SamplingParams(max_tokens=2, ignore_eos=True))[0].outputs[0].token_ids
