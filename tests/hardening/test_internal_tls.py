"""The cluster's internal connections secured with what ``tandem certs`` made (``tandem serve
--internal-tls-dir``): mutual TLS on the internal gRPC (``runtime.internal_grpc``), and an
embedded etcd that serves TLS, takes only clients with a certificate of the cluster's CA and has
auth on (the user ``tandem``; ``runtime.etcd.EtcdAccess``, ``EtcdServer.from_config``).

Such a cluster serves end to end, a disaggregated handoff included (router -> workers, decode ->
prefill PushKV, KV events; every process registered and watched through that etcd); a worker
refuses a plaintext client, a TLS client without a certificate and one whose certificate another
CA signed; the launcher service (``tandem serve``'s) refuses the same clients a StartServices, and
serves one with the cluster's certificate (a planner's ``RemoteLauncher``: a tier switch there and
back, which the serve process carries out over TLS too); etcd refuses a plaintext client, one
without a certificate or with another CA's, a wrong password and no user; ``tandem planner``
without the settings stops with an error that says what to set.

Its own small cluster (sim engine, one prefill and one decode worker): the session's hardening
cluster is plaintext."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest
from hardening_lib import CONFIG, router_lists, wait_until

from deploy.certs import ETCD_USER, CertFiles, make_certs
from deploy.launcher_service import LauncherServer, RemoteLauncher
from deploy.local_cluster import LocalCluster
from deploy.local_launcher import LocalLauncher
from runtime.discovery import list_workers
from runtime.etcd import ControlPlane, EtcdAccess
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
    cfg = ClusterConfig(**{**CONFIG, "worker_env": ()}, **certs["cluster"].settings(),
                        **certs["cluster"].etcd_settings())
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


def test_etcd_refuses_clients_without_the_clusters_credentials(
        tls_cluster: LocalCluster, certs: dict[str, CertFiles]) -> None:
    (endpoint,) = tls_cluster.cfg.etcd_endpoints
    assert tls_cluster.etcd is not None and tls_cluster.etcd.client_url.startswith("https://")
    ours, other = certs["cluster"], certs["other"]
    password = EtcdAccess.from_config(tls_cluster.cfg).password
    assert password and tls_cluster.cfg.etcd_user == ETCD_USER
    ca, cert, key = ours.ca.read_bytes(), ours.cert.read_bytes(), ours.key.read_bytes()
    refused = {
        "plaintext": EtcdAccess(user=ETCD_USER, password=password),
        "no client certificate": EtcdAccess(ca=ca, user=ETCD_USER, password=password),
        "another CA's certificate": EtcdAccess(ca=ca, cert=other.cert.read_bytes(), key=other.key.read_bytes(),
                                               user=ETCD_USER, password=password),
        "a wrong password": EtcdAccess(ca=ca, cert=cert, key=key, user=ETCD_USER, password=password + "x"),
        "no user": EtcdAccess(ca=ca, cert=cert, key=key),
    }

    async def main() -> dict[str, str]:
        async with ControlPlane.from_config(tls_cluster.cfg) as plane:  # the cluster's own access
            assert len(await list_workers(plane, "decode")) == 1
        errors = {}
        for what, access in refused.items():
            plane = ControlPlane([endpoint], namespace=tls_cluster.cfg.namespace, access=access,
                                 request_timeout_s=2)
            try:
                await plane.connect()
            except ConnectionError as exc:
                errors[what] = str(exc)
            finally:
                await plane.close()
        return errors

    errors = asyncio.run(asyncio.wait_for(main(), 60))
    assert set(errors) == set(refused), f"etcd took {set(refused) - set(errors)}"
    assert "invalid user ID or password" in errors["a wrong password"], errors
    # With a certificate and no user, etcd takes the certificate's name for the user: no such user.
    assert "permission denied" in errors["no user"], errors
    assert "no etcd user is set" in errors["no user"], errors
    assert "etcd_ca_file" in errors["plaintext"], errors  # the error says what to set


def test_planner_without_the_etcd_settings_stops_with_a_clear_error(tls_cluster: LocalCluster) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    t0 = time.monotonic()
    planner = subprocess.run([sys.executable, "-m", "deploy.cli", "planner", "--dry-run", "--etcd-endpoints",
                              ",".join(tls_cluster.cfg.etcd_endpoints), "--namespace", tls_cluster.cfg.namespace],
                             capture_output=True, text=True, timeout=60, env=env)
    assert planner.returncode == 2, (planner.returncode, planner.stderr[-2000:])
    assert "tandem: error: cannot use etcd" in planner.stderr and "etcd_ca_file" in planner.stderr, planner.stderr
    assert "Traceback" not in planner.stderr
    assert time.monotonic() - t0 < 30  # one connect timeout (5 s) and the imports, not a hang


def test_internal_tls_dir_sets_the_etcd_access_unless_etcd_settings_are_given(
        certs: dict[str, CertFiles], monkeypatch: pytest.MonkeyPatch) -> None:
    from deploy.cli import _cluster_config, build_parser

    directory = str(certs["cluster"].ca.parent)
    argv = ["planner", "--etcd-endpoints", "127.0.0.1:1", "--internal-tls-dir", directory]
    for name in [k for k in os.environ if k.startswith("TANDEM_")]:
        monkeypatch.delenv(name)
    cfg = _cluster_config(build_parser().parse_args(argv))
    assert {k: getattr(cfg, k) for k in certs["cluster"].etcd_settings()} == certs["cluster"].etcd_settings()
    assert cfg.internal_tls_ca_file == str(certs["cluster"].ca)
    monkeypatch.setenv("TANDEM_ETCD_USER", "someone")  # an etcd of its own: the directory's access is not etcd's
    monkeypatch.setenv("TANDEM_ETCD_PASSWORD", "pw")
    cfg = _cluster_config(build_parser().parse_args(argv))
    assert (cfg.etcd_user, cfg.etcd_ca_file, cfg.etcd_password_file) == ("someone", None, None)
    assert cfg.internal_tls_ca_file == str(certs["cluster"].ca)


def test_certs_name_the_hosts_and_keep_the_key_private(tmp_path: Path) -> None:
    from cryptography import x509

    files = make_certs(tmp_path, hosts=["10.1.2.3", "node-7.example"])
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "10.1.2.3"}
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "node-7.example"}
    assert files.key.stat().st_mode & 0o777 == 0o600
    assert files.etcd_password.stat().st_mode & 0o777 == 0o600 and len(files.etcd_password.read_text()) > 30
    assert not list(tmp_path.glob("ca-key*"))  # the CA's key is not kept
