"""The KV cache sized from the GPU (``kv_cache_gib`` 0, the default): in a fresh process whose
allocator may use a share of the device, Llama-3.1-8B's shape (random weights) gets a cache of
most of what its weights leave, and a full token budget of prompts plus their decodes runs within
the share (the working reserve suffices: torch's allocator would raise past it)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

SHARE = 0.3
CHILD = textwrap.dedent(f"""
    import json, torch
    from engine.llm import LLM
    from protocol.sampling import SamplingParams
    torch.cuda.set_per_process_memory_fraction({SHARE}, 0)
    llm = LLM("dummy:llama-3.1-8b", device="cuda", kv_cache_bytes=0, gpu_memory_fraction={SHARE}, progress=False)
    runner = llm.engine.runner
    weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 30000, (1500,), generator=g).tolist() for _ in range(6)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    print(json.dumps(dict(kv=runner.num_blocks * runner.bytes_per_block, weights=weights,
                          total=torch.cuda.get_device_properties(0).total_memory,
                          peak=torch.cuda.max_memory_reserved(0), tokens=[len(o.outputs[0].token_ids) for o in outs])))
""")


def device_users() -> dict[str, object]:
    """Who holds the device before the child starts: its free bytes, this process's allocator, the
    processes on it (the child's cache is bounded by what is free)."""
    apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    return dict(free=torch.cuda.mem_get_info(0)[0], this_process_reserved=torch.cuda.memory_reserved(0), apps=apps)


def test_kv_cache_takes_what_the_weights_leave_of_the_share_and_steps_fit() -> None:
    before = device_users()
    print(f"\nthe device before the child: {before}")
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    share = SHARE * got["total"]
    left = share - got["weights"]
    assert got["tokens"] == [16] * 6
    assert got["kv"] >= 0.8 * left, (got, left, before)  # the old fixed default was 1 GiB of ~25
    assert got["peak"] <= share, got  # held by the allocator at its highest: within the share
