"""Parking workers of a disaggregated cluster on one GPU whose KV transport registered the cache by
address (CUDA IPC pulled, NIXL pushed): the decode worker, then the prefill worker, drains, parks
(its GPU memory goes back, its peer's mapping of its cache included) and unparks with its cache
at a new address, which the transport registers again and the worker republishes; the handoffs
after the round trip move the blocks (no recompute) and the greedy tokens equal the aggregated
ones. Real etcd, router and worker processes (a dummy SmolLM2-135M, bf16)."""

from __future__ import annotations

import random
from collections.abc import Iterator

import grpc
import pytest
import torch
from test_gpu_disagg import greedy_tokens, launch_clusters, live, sample, wait_until, worker_stub

from deploy.launcher import router_health
from deploy.local_cluster import Child, LocalCluster
from kv_transfer import nixl_available
from runtime.pb import tandem_worker_pb2 as wpb

pytestmark = [pytest.mark.timeout(600), pytest.mark.skipif(not nixl_available(), reason="nixl is not installed")]

GIB = 1 << 30
KV_GIB = 1.0  # large beside the weights (0.27 GiB): a cache kept alive by a peer's mapping shows
COMMON = dict(port=0, grpc_port=0, model="dummy:smollm2-135m", device="cuda", dtype="bfloat16", kv_cache_gib=KV_GIB,
              gpu_memory_fraction=0.08, max_local_prefill_tokens=16, lease_ttl_s=2, max_num_seqs=16)
SPECS = {
    "agg": dict(mode="aggregated", transport="nixl"),
    "cuda_ipc": dict(mode="disaggregated", transport="cuda_ipc", kv_transfer_mode="pull"),
    "nixl": dict(mode="disaggregated", transport="nixl", kv_transfer_mode="push"),
}
RNG = random.Random(13)
LENGTHS = (8, 40, 100, 333)  # prompts longer than 16 tokens are prefilled remotely
ROLES = {"prefill": wpb.WORKER_ROLE_PREFILL, "decode": wpb.WORKER_ROLE_DECODE}


@pytest.fixture(scope="module")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LocalCluster]]:
    yield from launch_clusters(tmp_path_factory.mktemp("gpu_park_clusters"), COMMON, SPECS)


def gpu_free() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


def park_and_unpark(cluster: LocalCluster, worker: Child, role: str) -> tuple[float, float]:
    """Drain, park and unpark ``worker`` through its rpcs: (GPU bytes freed by the park, unpark ms)."""
    channel, stub = worker_stub(worker)
    with channel:
        assert stub.Drain(wpb.DrainRequest(wait_ms=10_000), timeout=30).drained
        before = gpu_free()
        parked = stub.SwitchRole(wpb.SwitchRoleRequest(role=wpb.WORKER_ROLE_UNSPECIFIED), timeout=120)
        assert parked.role == wpb.WORKER_ROLE_UNSPECIFIED
        freed = gpu_free() - before
        with pytest.raises(grpc.RpcError) as refused:  # parked: it serves no tier
            stub.Prefill(wpb.PrefillRequest(request_id="x", prompt_token_ids=[5, 6, 7]), timeout=10)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        woke = stub.SwitchRole(wpb.SwitchRoleRequest(role=ROLES[role]), timeout=120)
        assert woke.role == ROLES[role]
    wait_until(lambda: router_health(cluster.http_url).get(f"{role}_workers") == 1, 30, f"the router lists the {role}")
    return freed, woke.switch_ms


@pytest.mark.parametrize("name, mode", [("cuda_ipc", "pull"), ("nixl", "push")])
def test_parked_workers_come_back_with_their_cache_registered_again(clusters: dict[str, LocalCluster], name: str,
                                                                    mode: str) -> None:
    cluster, agg = clusters[name], clusters["agg"]
    (decode,), (prefill,) = live(cluster, "decode"), live(cluster, "prefill")
    mover = (prefill if mode == "push" else decode).ready["metrics"]
    per_round = sum(-(-n // 16) for n in LENGTHS if n > 16)  # the blocks handed off per round

    def moved() -> float:
        return sample(mover, "tandem_kv_transfer_blocks_total", transport=name)

    def round_trip(what: str) -> None:
        moved0 = moved()
        # new prompts each round: a prefix the decode worker cached would be served there, no handoff
        prompts = [[RNG.randrange(300, 40000) for _ in range(n)] for n in LENGTHS]
        want = [greedy_tokens(agg, p, 24) for p in prompts]
        assert [greedy_tokens(cluster, p, 24) for p in prompts] == want, what
        assert sample(decode.ready["metrics"], "tandem_kv_pull_fallbacks_total") == 0, what  # none recomputed
        assert moved() - moved0 == per_round, what  # every handoff moved its blocks
        wait_until(lambda: _pinned(prefill) == 0, 30, "every hold released")

    round_trip("before parking")
    freed = {}
    for role, worker in (("decode", decode), ("prefill", prefill)):
        freed[role], wake_ms = park_and_unpark(cluster, worker, role)
        print(f"\n{name}: parking the {role} worker freed {freed[role] / GIB:.2f} GiB of the GPU; "
              f"unpark {wake_ms:.0f} ms")
        round_trip(f"after parking the {role} worker")
    # Each park gave its weights and its cache back: had a peer kept its mapping of the cache (CUDA
    # IPC: before the peers were told to unmap; NIXL: the prefill worker that pushed into the decode
    # worker's cache, before it was told to drop the agent and UCX's mapping cache was off), the
    # cache's memory would have stayed allocated.
    for role, f in freed.items():
        assert f >= KV_GIB * GIB, (role, f / GIB)
    for worker in (decode, prefill):
        log = (cluster._log_dir / f"{worker.name}.log").read_text()
        # "did not drop": a peer kept its mapping (cuda_ipc) or our agent (nixl)
        assert "Traceback" not in log and "did not drop" not in log, log[-3000:]


def _pinned(worker: Child) -> int:
    channel, stub = worker_stub(worker)
    with channel:
        return stub.Health(wpb.HealthRequest(), timeout=5).load.num_pinned_blocks
