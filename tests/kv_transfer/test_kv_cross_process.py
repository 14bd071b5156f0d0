"""tcp and nixl between two real processes: the owner is a child process, this test is the puller."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from kv_helpers import Owner, block_pattern, empty_kv, layout, spawn_owner
from prometheus_client import REGISTRY

from kv_transfer import (
    DEFAULT_TIMEOUT_S,
    KVTransport,
    LayoutMismatchError,
    PeerMetadata,
    TransferError,
    TransferTimeoutError,
    make_transport,
    merge_runs,
    nixl_available,
)

pytestmark = pytest.mark.timeout(60)

TRANSPORTS = [
    "tcp",
    pytest.param(
        "nixl",
        marks=pytest.mark.skipif(
            not nixl_available(),
            reason="the nixl package is not installed here (pip install --no-deps nixl nixl-cu12)",
        ),
    ),
]


@pytest.fixture(autouse=True)
def _ucx_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """NIXL agents created in this process (the pulling side) use loopback only."""
    monkeypatch.setenv("UCX_NET_DEVICES", "lo")


@pytest.fixture(scope="module", params=TRANSPORTS)
def owner(request: pytest.FixtureRequest) -> Iterator[tuple[str, Owner]]:
    """One owner process per transport, serving a bf16 and an fp32 KV tensor."""
    with spawn_owner(request.param, dtypes=("bfloat16", "float32")) as proc:
        yield request.param, proc


def _puller(name: str, kv: torch.Tensor) -> KVTransport:
    opts: dict[str, Any] = {"capture_telemetry": True} if name == "nixl" else {}
    transport = make_transport(name, **opts)
    transport.register(kv)
    return transport


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_pull_noncontiguous_blocks_match_exactly(owner: tuple[str, Owner], dtype: str) -> None:
    name, proc = owner
    lay = layout(dtype, num_blocks=48)  # the puller's pool is smaller than the owner's
    remote = [0, 1, 2, 17, 18, 30, 63, 62, 40]
    local = [20, 21, 22, 5, 6, 47, 0, 1, 23]
    with _puller(name, empty_kv(lay)) as puller:
        bytes_before = _sample("tandem_kv_transfer_bytes_total", transport=name)
        result = puller.pull(proc.metadata[dtype], remote, local, timeout_s=10.0)
        assert result.num_blocks == len(remote)
        assert result.num_bytes == len(remote) * lay.bytes_per_block
        # nixl reports the descriptors its backend issued: the same runs as merge_runs.
        assert result.num_descriptors == len(merge_runs(remote, local)) == 6
        for r, loc in zip(remote, local):
            assert torch.equal(puller.kv[loc], block_pattern(lay, r)), (r, loc)
        untouched = sorted(set(range(lay.num_blocks)) - set(local))
        assert not puller.kv[untouched].any()
        assert _sample("tandem_kv_transfer_bytes_total", transport=name) - bytes_before == result.num_bytes
        # A second pull reuses what the first set up (nixl: the remote agent and its descriptors).
        again = puller.pull(proc.metadata[dtype], list(range(32, 64)), list(range(16, 48)), timeout_s=10.0)
        assert again.num_descriptors == 1
        for b in range(16, 48):
            assert torch.equal(puller.kv[b], block_pattern(lay, b + 16))


def test_layout_mismatch_is_a_clear_error(owner: tuple[str, Owner]) -> None:
    name, proc = owner
    with _puller(name, empty_kv(layout("float32", block_size=8))) as puller:
        failures = _sample("tandem_kv_transfer_failures_total", transport=name, reason="layout")
        with pytest.raises(LayoutMismatchError, match="block_size 8 != 16; dtype float32 != bfloat16"):
            puller.pull(proc.metadata["bfloat16"], [0], [0], timeout_s=5.0)
        assert _sample("tandem_kv_transfer_failures_total", transport=name, reason="layout") == failures + 1


@pytest.mark.parametrize("owner", ["tcp"], indirect=True)  # the tcp handshake only
def test_tcp_server_checks_layout_too(owner: tuple[str, Owner]) -> None:
    _name, proc = owner
    lay = layout("float32")
    # Metadata that lies about the owner's layout: the owner's handshake still refuses.
    md = PeerMetadata.decode(proc.metadata["bfloat16"])
    forged = PeerMetadata(md.transport, md.name, lay, md.address, md.blob).encode()
    with _puller("tcp", empty_kv(lay)) as puller, pytest.raises(LayoutMismatchError, match="bfloat16 != float32"):
        puller.pull(forged, [0], [0], timeout_s=5.0)


def test_pull_async_concurrent(owner: tuple[str, Owner]) -> None:
    name, proc = owner
    lay = layout("bfloat16")

    async def main(puller: KVTransport) -> None:
        md = proc.metadata["bfloat16"]
        pulls = [puller.pull_async(md, [4 * i, 4 * i + 1, 4 * i + 2], [63 - i, 40 - i, 20 - i]) for i in range(6)]
        results = await asyncio.wait_for(asyncio.gather(*pulls), timeout=20)
        assert [r.num_blocks for r in results] == [3] * 6
        for i in range(6):
            for r, loc in zip([4 * i, 4 * i + 1, 4 * i + 2], [63 - i, 40 - i, 20 - i]):
                assert torch.equal(puller.kv[loc], block_pattern(lay, r))

    with _puller(name, empty_kv(lay)) as puller:
        asyncio.run(main(puller))


@pytest.mark.parametrize("name", TRANSPORTS)
def test_dead_peer_raises_transfer_error(name: str) -> None:
    lay = layout()
    with spawn_owner(name) as proc, _puller(name, empty_kv(lay)) as connected, _puller(name, empty_kv(lay)) as fresh:
        md = proc.metadata["bfloat16"]
        connected.pull(md, [1, 2], [1, 2], timeout_s=10.0)  # connected before the owner dies
        proc.kill()
        for puller in (connected, fresh):
            # A long deadline: a transport that waits it out fails on the error's type, however
            # slow the machine; one that notices through some keep-alive fails the bound below.
            start = time.perf_counter()
            with pytest.raises(TransferError) as info:
                puller.pull(md, [3, 4], [3, 4], timeout_s=45.0)
            assert not isinstance(info.value, TransferTimeoutError), "a dead peer is detected, not waited out"
            assert time.perf_counter() - start < 30.0


@pytest.mark.parametrize("name", TRANSPORTS)
def test_frozen_peer_times_out(name: str) -> None:
    lay = layout()
    with spawn_owner(name) as proc, _puller(name, empty_kv(lay)) as puller:
        proc.freeze()  # SIGSTOP: alive, accepts nothing
        failures = _sample("tandem_kv_transfer_failures_total", transport=name, reason="timeout")
        start = time.perf_counter()
        with pytest.raises(TransferTimeoutError):
            puller.pull(proc.metadata["bfloat16"], [0, 1], [0, 1], timeout_s=1.0)
        # Its own deadline, not before it, and not the transport's default (10 s): the only wall-clock
        # bound here is the point of the test, with 9 s of slack for a loaded machine.
        assert 1.0 <= time.perf_counter() - start < DEFAULT_TIMEOUT_S
        assert _sample("tandem_kv_transfer_failures_total", transport=name, reason="timeout") == failures + 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("owner_device", ["cuda", "cpu"])
@pytest.mark.parametrize("name", TRANSPORTS)
def test_pull_into_gpu_memory(name: str, owner_device: str) -> None:
    """VRAM (nixl: registered as VRAM) to VRAM, and DRAM to VRAM, between two processes."""
    lay = layout("bfloat16")
    remote, local = [5, 6, 7, 60, 2], [0, 1, 2, 30, 63]
    with spawn_owner(name, device=owner_device) as proc, _puller(name, empty_kv(lay, "cuda")) as puller:
        result = puller.pull(proc.metadata["bfloat16"], remote, local, timeout_s=20.0)
        assert result.num_bytes == len(remote) * lay.bytes_per_block
        for r, loc in zip(remote, local):
            assert torch.equal(puller.kv[loc].cpu(), block_pattern(lay, r)), (r, loc)
        proc.kill()
        with pytest.raises(TransferError):
            puller.pull(proc.metadata["bfloat16"], [1], [1], timeout_s=5.0)
