"""The control-plane client against etcd with user/password auth, and with mutual TLS."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from runtime_testlib import run

from protocol.model_card import ModelCard
from runtime.discovery import WorkerInfo, WorkerSet, list_workers, register
from runtime.etcd import ControlPlane
from runtime.etcd_server import EtcdServer, EtcdServerTLS, find_etcd_binary


def etcdctl(server: EtcdServer, *args: str) -> str:
    binary = find_etcd_binary().with_name("etcdctl")
    exe = str(binary) if binary.exists() else shutil.which("etcdctl")
    assert exe, "etcdctl not found"
    out = subprocess.run(
        [exe, f"--endpoints={server.client_url}", *args], capture_output=True, text=True, timeout=20
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def auth_etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        etcdctl(server, "user", "add", "root:rootpw", "--interactive=false")
        etcdctl(server, "auth", "enable")
        yield server


def test_user_password(auth_etcd: EtcdServer) -> None:
    async def main() -> None:
        async with ControlPlane([auth_etcd.endpoint], user="root", password="rootpw", lease_ttl_s=2) as cp:
            await register(cp, WorkerInfo("d0", "decode", "127.0.0.1:1", ModelCard("m", 16), 16))
            async with WorkerSet(cp, "decode") as decode:
                assert set(decode.workers) == {"d0"}
        with pytest.raises(ConnectionError, match="invalid user ID or password"):
            await ControlPlane([auth_etcd.endpoint], user="root", password="wrong").connect()
        with pytest.raises(Exception, match="user name is empty"):  # no credentials: etcd refuses
            async with ControlPlane([auth_etcd.endpoint]) as cp:
                await cp.get("/tandem/x")

    run(main())


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server cert for 127.0.0.1 (also usable as a client cert) and a client cert."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=tandem-test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)  # fmt: skip
    (d / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", "ext.cnf", "-out", f"{name}.pem", cwd=d)  # fmt: skip
    return d


def test_mutual_tls(pki: Path) -> None:
    tls = EtcdServerTLS(str(pki / "server.pem"), str(pki / "server.key"), trusted_ca_file=str(pki / "ca.pem"))

    async def main(server: EtcdServer) -> None:
        client_files = dict(ca_file=pki / "ca.pem", cert_file=pki / "client.pem", key_file=pki / "client.key")
        async with ControlPlane([server.endpoint], namespace="tls", lease_ttl_s=2, **client_files) as cp:
            await register(cp, WorkerInfo("p0", "prefill", "127.0.0.1:1", ModelCard("m", 16), 16))
            assert set(await list_workers(cp, "prefill")) == {"p0"}
        with pytest.raises(ConnectionError):  # CA only, no client certificate
            await ControlPlane([server.endpoint], ca_file=pki / "ca.pem", request_timeout_s=1).connect()
        with pytest.raises(ConnectionError):  # plaintext against a TLS port
            await ControlPlane([server.endpoint], request_timeout_s=1).connect()

    with EtcdServer(tls=tls) as server:
        assert server.client_url.startswith("https://")
        run(main(server))
