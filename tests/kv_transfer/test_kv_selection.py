"""``auto`` chooses by measurement: the choice from a given table, and an auto transport whose
transfers go through the child the table picks (the child's own byte counter moves)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from kv_helpers import REPO_ROOT, block_pattern, empty_kv, filled_kv, layout
from prometheus_client import REGISTRY

from kv_transfer import LayoutMismatchError, make_transport, nixl_available, selection
from kv_transfer.auto import AutoTransport
from kv_transfer.nixl_wheel import wheel_for

TABLE = {
    "localities": {
        "same_gpu": {"gb_per_s": {"cuda_ipc": {"push": 1800, "pull": 1700}, "nixl": {"push": 1500, "pull": 0.5}}},
        "same_node": {"gb_per_s": {"nccl": {"push": 300}, "nixl": {"push": 290, "pull": 290}, "cuda_ipc": {}}},
        "other_node": {"gb_per_s": {"cuda_ipc": {"push": 9999}, "tcp": {"push": 2, "pull": 2}, "nixl": {"pull": 40}}},
        "cpu": {"gb_per_s": {"tcp": {"push": 3.0, "pull": 3.0}, "nixl": {"push": 2.0, "pull": 4.0}}},
    }
}


def test_locality() -> None:
    assert selection.locality("h1", "cuda:a", "h1", "cuda:a") == "same_gpu"
    assert selection.locality("h1", "cuda:a", "h1", "cuda:b") == "same_node"
    assert selection.locality("h1", "cuda:a", "h2", "cuda:a") == "other_node"
    assert selection.locality("h1", "cpu", "h1", "cuda:a") == "cpu"
    assert selection.locality("h1", "cpu", "h2", "cpu") == "other_node"


@pytest.mark.parametrize(
    ("loc", "available", "expected"),
    [
        ("same_gpu", ["tcp", "nixl", "cuda_ipc"], ("cuda_ipc", "push", 1800)),
        ("same_gpu", ["tcp", "nixl"], ("nixl", "push", 1500)),  # never nixl's slow READ
        ("same_node", ["cuda_ipc", "nixl", "nccl", "tcp"], ("nccl", "push", 300)),
        ("same_gpu", ["nccl", "tcp"], ("tcp", "push", None)),  # nccl cannot pair on one GPU; tcp unmeasured
        ("other_node", ["cuda_ipc", "tcp", "nixl"], ("nixl", "pull", 40)),  # cuda_ipc cannot leave the node
        ("cpu", ["tcp", "nixl"], ("nixl", "pull", 4.0)),  # the faster direction is kept
        ("cpu", ["tcp"], ("tcp", "push", 3.0)),  # a tie goes to push
    ],
)
def test_choose_from_a_table(loc: str, available: list[str], expected: tuple[str, str, float | None]) -> None:
    choice = selection.choose(TABLE, loc, available)
    assert (choice.transport, choice.mode, choice.gb_per_s) == expected
    assert choice.locality == loc


def test_a_serving_measurement_wins_where_its_transport_is_available() -> None:
    table = {"localities": {"same_gpu": {**TABLE["localities"]["same_gpu"],
                                         "serving": {"transport": "nixl", "mode": "push", "source": "test"}}}}
    def pick(t: dict, available: list[str]) -> tuple:
        choice = selection.choose(t, "same_gpu", available)
        return choice.transport, choice.mode, choice.gb_per_s

    assert pick(table, ["cuda_ipc", "nixl", "tcp"]) == ("nixl", "push", 1500)
    assert pick(table, ["cuda_ipc", "tcp"]) == ("cuda_ipc", "push", 1800)
    with pytest.raises(ValueError, match="serving"):
        selection.check_table({"localities": {"same_gpu": {"gb_per_s": {}, "serving": {"transport": "nccl",
                                                                                          "mode": "push"}}}})
    # the shipped table: on one GPU, NIXL push (measured in serving), CUDA IPC pull without NIXL
    shipped = selection.default_table()
    assert pick(shipped, ["cuda_ipc", "nixl", "tcp"])[:2] == ("nixl", "push")
    assert pick(shipped, ["cuda_ipc", "tcp"])[:2] == ("cuda_ipc", "pull")


def test_choose_without_measurements_and_without_candidates() -> None:
    empty = {"localities": {}}
    assert selection.choose(empty, "same_node", ["tcp", "nccl", "nixl"]).transport == "nixl"
    assert selection.choose(empty, "other_node", ["tcp"]).transport == "tcp"
    with pytest.raises(ValueError, match="can reach"):
        selection.choose(TABLE, "other_node", ["cuda_ipc", "loopback"])
    with pytest.raises(ValueError, match="unknown locality"):
        selection.choose(TABLE, "moon", ["tcp"])


def test_table_checks() -> None:
    with pytest.raises(ValueError, match="unknown locality"):
        selection.check_table({"localities": {"mars": {"gb_per_s": {}}}})
    with pytest.raises(ValueError, match="push/pull"):
        selection.check_table({"localities": {"cpu": {"gb_per_s": {"tcp": {"sideways": 1}}}}})
    with pytest.raises(ValueError, match=">= 0"):
        selection.check_table({"localities": {"cpu": {"gb_per_s": {"tcp": {"push": "fast"}}}}})
    shipped = selection.default_table()
    assert {"cpu", "same_gpu"} <= set(shipped["localities"]), "the shipped table carries our measurements"


@pytest.mark.skipif(not nixl_available(), reason="the nixl package is not installed here")
@pytest.mark.parametrize(("table_winner", "mode"), [("tcp", "push"), ("nixl", "pull")])
def test_auto_moves_bytes_through_the_chosen_transport(table_winner: str, mode: str) -> None:
    rates = {"tcp": {"push": 1.0, "pull": 1.0}, "nixl": {"push": 1.0, "pull": 1.0}}
    rates[table_winner][mode] = 10.0
    table = {"localities": {"cpu": {"gb_per_s": rates}}}
    lay = layout()
    owner = make_transport("auto", table=table, transports=("tcp", "nixl"))
    dest = make_transport("auto", table=table, transports=("tcp", "nixl"))
    with owner, dest:
        owner.register(filled_kv(lay))
        dest.register(empty_kv(lay))
        assert isinstance(dest, AutoTransport) and set(dest.children) == {"tcp", "nixl"}
        assert dest.preferred_mode(owner.metadata()) == mode
        before = {
            n: REGISTRY.get_sample_value("tandem_kv_transfer_bytes_total", {"transport": n}) or 0.0
            for n in ("tcp", "nixl")
        }
        dest.pull(owner.metadata(), [1, 2, 3], [10, 11, 12], timeout_s=10.0)
        transfer_id = dest.expect([20, 21], timeout_s=10.0)
        owner.push(dest.metadata(), transfer_id, [4, 5], [20, 21], timeout_s=10.0)
        assert dest.wait(transfer_id).num_blocks == 2
        for s, d in [(1, 10), (2, 11), (3, 12), (4, 20), (5, 21)]:
            assert torch.equal(dest.kv[d], block_pattern(lay, s))
        moved = {
            n: (REGISTRY.get_sample_value("tandem_kv_transfer_bytes_total", {"transport": n}) or 0.0) - before[n]
            for n in ("tcp", "nixl")
        }
        assert moved[table_winner] == 5 * lay.bytes_per_block
        assert moved["nixl" if table_winner == "tcp" else "tcp"] == 0


def test_auto_talks_to_a_concrete_peer_and_refuses_a_stranger() -> None:
    lay = layout()
    with make_transport("tcp") as tcp, make_transport("auto", transports=("tcp",)) as auto:
        tcp.register(filled_kv(lay))
        auto.register(empty_kv(lay))
        auto.pull(tcp.metadata(), [7], [7], timeout_s=10.0)
        assert torch.equal(auto.kv[7], block_pattern(lay, 7))
        with make_transport("loopback") as stranger:
            stranger.register(filled_kv(lay))
            with pytest.raises(LayoutMismatchError, match="no common transport"):
                auto.pull(stranger.metadata(), [1], [1], timeout_s=10.0)


def test_nixl_wheel_matches_the_cuda_version() -> None:
    assert wheel_for("13.0") == "nixl-cu13"
    assert wheel_for("12.8") == "nixl-cu12"
    assert wheel_for(None) == "nixl-cu12"
    here = subprocess.run(
        [sys.executable, str(REPO_ROOT / "kv_transfer" / "nixl_wheel.py")], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert here == wheel_for(torch.version.cuda)
