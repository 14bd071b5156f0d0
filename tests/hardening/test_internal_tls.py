"""Mutual TLS on the cluster's internal gRPC (``runtime.internal_grpc``): a cluster whose every
process has the certificates ``tandem certs`` made serves end to end, a disaggregated handoff
included (router -> workers, decode -> prefill PushKV, KV events); a worker refuses a plaintext
client, a TLS client without a certificate and one whose certificate another CA signed; the
launcher service (``tandem serve``'s) refuses the same clients a StartServices, and serves one
with the cluster's certificate (a planner's ``RemoteLauncher``: a tier switch there and back,
which the serve process carries out over TLS too).

Its own small cluster (sim engine, one prefill and one decode worker): the session's hardening
cluster is plaintext."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest
from hardening_lib import CONFIG, router_lists, wait_until

from deploy.certs import CertFiles, make_certs
from deploy.launcher_service import LauncherServer, RemoteLauncher
from deploy.local_cluster import LocalCluster
from deploy.local_launcher import LocalLauncher
from runtime.internal_grpc import InternalGrpc
from runtime.pb import tandem_control_pb2 as cpb
from runtime.pb import tandem_control_pb2_grpc as cpb_grpc
from runtime.pb import tandem_worker_pb2 as wpb
from runtime.pb import tandem_worker_pb2_grpc as wpb_grpc
from runtime.settings import ClusterConfig

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CertFiles]:
    root = tmp_path_factory.mktemp("internal-tls")
    return {"cluster": make_certs(root / "cluster"), "other": make_certs(root / "other")}


@pytest.fixture(scope="module")
def tls_cluster(certs: dict[str, CertFiles], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cfg = ClusterConfig(**{**CONFIG, "worker_env": ()}, **certs["cluster"].settings())
    cluster = LocalCluster(cfg, num_prefill=1, num_decode=1, quiet=True,
                           log_dir=tmp_path_factory.mktemp("internal-tls-logs"))
    cluster.start(timeout_s=120)
    try:
        yield cluster
    finally:
        cluster.stop()


def _counter(url: str, name: str, labels: str = "") -> float:
    """The sum of a counter's series on a Prometheus page (those whose labels hold ``labels``)."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(m.group(2)) for m in re.finditer(rf"^{name}(\{{[^}}]*\}})? (\S+)$", text, re.M)
               if labels in (m.group(1) or ""))


def _credentials(trust: CertFiles, client: CertFiles | None) -> grpc.ChannelCredentials:
    """TLS trusting ``trust``'s CA, presenting ``client``'s certificate (or none)."""
    return grpc.ssl_channel_credentials(
        root_certificates=trust.ca.read_bytes(), private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None)


def _refused_clients(target: str, certs: dict[str, CertFiles]) -> dict[str, grpc.Channel]:
    """Channels to ``target`` the cluster must refuse: plaintext, TLS with no client certificate,
    TLS with a certificate of another CA (trusting the cluster's CA: only the server's check of
    the client's certificate can refuse it)."""
    return {"plaintext": grpc.insecure_channel(target),
            "no client certificate": grpc.secure_channel(target, _credentials(certs["cluster"], None)),
            "another CA": grpc.secure_channel(target, _credentials(certs["cluster"], certs["other"]))}


def test_tls_cluster_serves_with_a_disaggregated_handoff(tls_cluster: LocalCluster) -> None:
    (decode,) = tls_cluster.workers("decode")
    assert decode.ready is not None
    blocks_before = _counter(decode.ready["metrics"], "tandem_kv_handoff_blocks_total")
    fallbacks_before = _counter(decode.ready["metrics"], "tandem_kv_pull_fallbacks_total")
    client = openai.OpenAI(base_url=f"{tls_cluster.http_url}/v1", api_key="unused", max_retries=0, timeout=60)
    model = tls_cluster.router["model"]
    prompt = "a prompt long enough to be prefilled on the prefill tier, " * 4  # past max_local_prefill_tokens
    done = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 6
    streamed = client.completions.create(model=model, prompt=prompt[::-1], max_tokens=5, temperature=0,
                                         stream=True, extra_body={"ignore_eos": True})
    assert sum(1 for chunk in streamed if chunk.choices and chunk.choices[0].text) >= 1
    # The remote path was taken: the decode worker received the prompts' blocks from the prefill
    # worker (PushKV over TLS) and recomputed none.
    assert _counter(decode.ready["metrics"], "tandem_kv_handoff_blocks_total") > blocks_before
    assert _counter(decode.ready["metrics"], "tandem_kv_pull_fallbacks_total") == fallbacks_before
    assert _counter(f"{tls_cluster.http_url}/metrics", "tandem_router_route_decisions_total", 'path="remote"') >= 2


def test_worker_refuses_clients_without_the_clusters_certificate(
        tls_cluster: LocalCluster, certs: dict[str, CertFiles]) -> None:
    for child in tls_cluster.workers("prefill") + tls_cluster.workers("decode"):
        assert child.ready is not None
        target = child.ready["endpoint"]
        for what, channel in _refused_clients(target, certs).items():
            with channel, pytest.raises(grpc.RpcError) as info:
                wpb_grpc.WorkerServiceStub(channel).Drain(wpb.DrainRequest(wait_ms=0), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (child.name, what, info.value)
        with InternalGrpc.from_config(tls_cluster.cfg).blocking_channel(target) as channel:
            health = wpb_grpc.WorkerServiceStub(channel).Health(wpb.HealthRequest(), timeout=5)
        assert health.status == wpb.WORKER_STATUS_SERVING  # the refused Drains reached nothing
    assert router_lists(tls_cluster) == {"prefill": 1, "decode": 1}


def test_launcher_service_refuses_unauthenticated_clients(
        tls_cluster: LocalCluster, certs: dict[str, CertFiles]) -> None:
    launcher = LocalLauncher.around(tls_cluster)
    server = LauncherServer(launcher, tls_cluster.cfg).start()
    try:
        services = [s.name for s in launcher.services()]
        for what, channel in _refused_clients(server.endpoint, certs).items():
            with channel, pytest.raises(grpc.RpcError) as info:
                cpb_grpc.ClusterLauncherStub(channel).StartServices(
                    cpb.StartServicesRequest(roles=["decode"], timeout_s=60), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (what, info.value)
        assert [s.name for s in launcher.services()] == services  # nothing started

        # A planner with the cluster's certificate: served, and its switch reaches the worker
        # (SwitchRole from the serve process, over TLS too).
        remote = RemoteLauncher(server.endpoint, tls_cluster.cfg)
        try:
            (prefill,) = remote.workers("prefill")
            assert remote.switch_worker(prefill.name, "decode").role == "decode"
            wait_until(lambda: router_lists(tls_cluster) == {"prefill": 0, "decode": 2}, 15, "the switch")
            assert remote.switch_worker(prefill.name, "prefill").role == "prefill"
            wait_until(lambda: router_lists(tls_cluster) == {"prefill": 1, "decode": 1}, 15, "the switch back")
        finally:
            remote.stop()
    finally:
        server.stop()


def test_certs_name_the_hosts_and_keep_the_key_private(tmp_path: Path) -> None:
    from cryptography import x509

    files = make_certs(tmp_path, hosts=["10.1.2.3", "node-7.example"])
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "10.1.2.3"}
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "node-7.example"}
    assert files.key.stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob("ca-key*"))  # the CA's key is not kept
