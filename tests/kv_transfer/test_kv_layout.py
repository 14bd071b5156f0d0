"""Pure pieces of kv_transfer: run merging, id checks, layout, metadata envelope, factory."""

from __future__ import annotations

import pytest
import torch

from kv_transfer import (
    BlockRun,
    KVLayout,
    LayoutMismatchError,
    PeerMetadata,
    make_transport,
    merge_runs,
)
from kv_transfer.layout import check_block_ids


def test_merge_runs_contiguous_on_both_sides() -> None:
    assert merge_runs([4, 5, 6, 7], [10, 11, 12, 13]) == [BlockRun(4, 10, 4)]


def test_merge_runs_breaks_where_either_side_jumps() -> None:
    remote = [0, 1, 2, 10, 11, 20, 21, 22]
    local = [5, 6, 7, 8, 9, 30, 31, 40]
    assert merge_runs(remote, local) == [
        BlockRun(0, 5, 3),  # remote 2 -> 10 jumps at local 8
        BlockRun(10, 8, 2),
        BlockRun(20, 30, 2),  # local 31 -> 40 jumps
        BlockRun(22, 40, 1),
    ]


def test_merge_runs_orders_pairs_by_local_id() -> None:
    # The same mapping given out of order merges the same way.
    assert merge_runs([3, 1, 2], [12, 10, 11]) == [BlockRun(1, 10, 3)]
    # Descending remote ids never merge: each block is its own descriptor.
    assert merge_runs([9, 8, 7], [0, 1, 2]) == [BlockRun(9, 0, 1), BlockRun(8, 1, 1), BlockRun(7, 2, 1)]


def test_merge_runs_empty_and_single() -> None:
    assert merge_runs([], []) == []
    assert merge_runs([7], [3]) == [BlockRun(7, 3, 1)]


def test_merge_runs_repeated_remote_block() -> None:
    # One remote block may fill two local blocks (a prefix shared twice); it cannot merge with itself.
    assert merge_runs([5, 5], [0, 1]) == [BlockRun(5, 0, 1), BlockRun(5, 1, 1)]


def test_check_block_ids_rejects_bad_requests() -> None:
    check_block_ids([0, 1], [2, 3], num_remote=4, num_local=4)
    with pytest.raises(ValueError, match="2 remote block ids but 1 local"):
        check_block_ids([0, 1], [2], 4, 4)
    with pytest.raises(ValueError, match=r"remote block ids out of range \[0, 4\): \[4\]"):
        check_block_ids([4], [0], 4, 4)
    with pytest.raises(ValueError, match="local block ids out of range"):
        check_block_ids([0], [-1], 4, 4)
    with pytest.raises(ValueError, match="local block ids repeat"):
        check_block_ids([0, 1], [2, 2], 4, 4)


def test_layout_from_tensor_and_bytes_per_block() -> None:
    kv = torch.zeros(8, 3, 2, 16, 4, 32, dtype=torch.bfloat16)
    lay = KVLayout.from_tensor(kv, model="m")
    assert lay == KVLayout(8, 3, 16, 4, 32, "bfloat16", "m")
    assert lay.bytes_per_block == kv[0].numel() * kv.element_size() == 3 * 2 * 16 * 4 * 32 * 2
    assert lay.block_shape == tuple(kv.shape[1:])


def test_layout_from_tensor_rejects_contract_breaks() -> None:
    with pytest.raises(ValueError, match="shape"):
        KVLayout.from_tensor(torch.zeros(8, 3, 16, 4, 32))
    with pytest.raises(ValueError, match="contiguous"):
        KVLayout.from_tensor(torch.zeros(3, 8, 2, 16, 4, 32).transpose(0, 1))
    with pytest.raises(ValueError, match="unsupported KV dtype"):
        KVLayout.from_tensor(torch.zeros(8, 3, 2, 16, 4, 32, dtype=torch.int8))


def test_layout_mismatches_ignore_num_blocks_and_unset_model() -> None:
    a = KVLayout(8, 2, 16, 4, 32, "bfloat16", "llama")
    assert a.mismatches(KVLayout(100, 2, 16, 4, 32, "bfloat16", "")) == []
    b = KVLayout(8, 2, 32, 4, 32, "float32", "qwen")
    assert a.mismatches(b) == ["block_size 16 != 32", "dtype bfloat16 != float32", "model 'llama' != 'qwen'"]


def test_peer_metadata_round_trip_and_garbage() -> None:
    md = PeerMetadata("tcp", "x", KVLayout(8, 2, 16, 4, 32, "float16"), {"host": "h", "port": 1}, b"\x00\xff")
    assert PeerMetadata.decode(md.encode()) == md
    for garbage in (b"", b"hello world", md.encode()[:12]):
        with pytest.raises(ValueError):
            PeerMetadata.decode(garbage)


def test_make_transport_names() -> None:
    with pytest.raises(ValueError, match="unknown KV transport 'carrier-pigeon'"):
        make_transport("carrier-pigeon")
    with make_transport("loopback") as t:
        assert t.transport_name == "loopback"
    with make_transport("tcp") as t:
        assert t.transport_name == "tcp"
    with make_transport("auto") as t:
        assert t.transport_name == "auto"


def test_transport_mismatch_is_a_clear_error() -> None:
    with make_transport("loopback") as a, make_transport("tcp") as b:
        a.register(torch.zeros(4, 1, 2, 4, 1, 8))
        b.register(torch.zeros(4, 1, 2, 4, 1, 8))
        with pytest.raises(LayoutMismatchError, match="speaks transport 'tcp', this worker 'loopback'"):
            a.pull(b.metadata(), [0], [0])
