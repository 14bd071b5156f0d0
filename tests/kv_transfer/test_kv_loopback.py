"""Loopback transport: two engines in one process."""

from __future__ import annotations

import asyncio

import pytest
import torch
from kv_helpers import block_pattern, empty_kv, filled_kv, layout
from prometheus_client import REGISTRY

from kv_transfer import LayoutMismatchError, TransferError, make_transport, merge_runs


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_pull_noncontiguous_blocks(dtype: str) -> None:
    lay = layout(dtype)
    with make_transport("loopback") as owner, make_transport("loopback") as puller:
        owner.register(filled_kv(lay))
        puller.register(empty_kv(lay))
        remote, local = [3, 4, 5, 9, 40, 41, 63], [10, 11, 12, 0, 30, 31, 62]
        bytes_before = _sample("tandem_kv_transfer_bytes_total", transport="loopback")
        result = puller.pull(owner.metadata(), remote, local, timeout_s=5.0)
        assert result.num_blocks == 7
        assert result.num_bytes == 7 * lay.bytes_per_block
        assert result.num_descriptors == len(merge_runs(remote, local)) == 4
        assert result.duration_s > 0
        for r, loc in zip(remote, local):
            assert torch.equal(puller.kv[loc], block_pattern(lay, r))
        untouched = sorted(set(range(lay.num_blocks)) - set(local))
        assert not puller.kv[untouched].any()
        assert _sample("tandem_kv_transfer_bytes_total", transport="loopback") - bytes_before == result.num_bytes


def test_empty_pull_moves_nothing() -> None:
    lay = layout()
    with make_transport("loopback") as owner, make_transport("loopback") as puller:
        owner.register(filled_kv(lay))
        puller.register(empty_kv(lay))
        assert puller.pull(owner.metadata(), [], []).num_bytes == 0


def test_closed_peer_raises_transfer_error() -> None:
    lay = layout()
    puller = make_transport("loopback")
    puller.register(empty_kv(lay))
    owner = make_transport("loopback")
    owner.register(filled_kv(lay))
    md = owner.metadata()
    owner.close()
    failures = _sample("tandem_kv_transfer_failures_total", transport="loopback", reason="peer")
    with pytest.raises(TransferError, match="is closed"):
        puller.pull(md, [0], [0], timeout_s=1.0)
    assert _sample("tandem_kv_transfer_failures_total", transport="loopback", reason="peer") == failures + 1
    puller.close()


def test_layout_mismatch() -> None:
    with make_transport("loopback") as owner, make_transport("loopback") as puller:
        owner.register(filled_kv(layout("bfloat16")))
        puller.register(empty_kv(layout("float32", block_size=8)))
        with pytest.raises(LayoutMismatchError, match="block_size 8 != 16; dtype float32 != bfloat16"):
            puller.pull(owner.metadata(), [0], [0])


def test_bad_block_ids_are_value_errors() -> None:
    lay = layout()
    with make_transport("loopback") as owner, make_transport("loopback") as puller:
        owner.register(filled_kv(lay))
        puller.register(empty_kv(lay))
        with pytest.raises(ValueError, match="out of range"):
            puller.pull(owner.metadata(), [lay.num_blocks], [0])
        with pytest.raises(ValueError, match="timeout_s must be positive"):
            puller.pull(owner.metadata(), [0], [0], timeout_s=0)


def test_pull_async_concurrent() -> None:
    lay = layout()

    async def main() -> None:
        with make_transport("loopback") as owner, make_transport("loopback") as puller:
            owner.register(filled_kv(lay))
            puller.register(empty_kv(lay))
            md = owner.metadata()
            pulls = [puller.pull_async(md, [i, i + 1], [60 - 2 * i, 61 - 2 * i]) for i in range(8)]
            results = await asyncio.wait_for(asyncio.gather(*pulls), timeout=10)
            assert [r.num_blocks for r in results] == [2] * 8
            for i in range(8):
                assert torch.equal(puller.kv[60 - 2 * i], block_pattern(lay, i))
                assert torch.equal(puller.kv[61 - 2 * i], block_pattern(lay, i + 1))

    asyncio.run(main())


def test_register_twice_and_use_before_register() -> None:
    with make_transport("loopback") as t:
        with pytest.raises(RuntimeError, match="register"):
            t.metadata()
        t.register(empty_kv(layout()))
        with pytest.raises(RuntimeError, match="twice"):
            t.register(empty_kv(layout()))
