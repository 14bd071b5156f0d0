"""The control-plane client against etcd with user/password auth, and with mutual TLS."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aetcd
import pytest
from runtime_testlib import run

from protocol.model_card import ModelCard
from runtime.discovery import WorkerInfo, WorkerSet, list_workers, register
from runtime.etcd import ControlPlane, EtcdAccess
from runtime.etcd_server import EtcdServer, EtcdServerAuth, EtcdServerTLS


@pytest.fixture(scope="module")
def auth_etcd() -> Iterator[EtcdServer]:
    """auth turned on at its start (EtcdServerAuth): root, the role tandem on /tandem/, the user."""
    with EtcdServer(auth=EtcdServerAuth("tandem", "pw")) as server:
        yield server


def test_user_password(auth_etcd: EtcdServer) -> None:
    async def main() -> None:
        user = EtcdAccess(user="tandem", password="pw")
        async with ControlPlane([auth_etcd.endpoint], access=user, lease_ttl_s=2) as cp:
            await register(cp, WorkerInfo("d0", "decode", "127.0.0.1:1", ModelCard("m", 16), 16))
            async with WorkerSet(cp, "decode") as decode:
                assert set(decode.workers) == {"d0"}
            with pytest.raises(aetcd.ClientError, match="permission denied"):  # only /tandem/ is its role's
                await cp.put("/elsewhere", "x")
        with pytest.raises(ConnectionError, match="invalid user ID or password"):
            await ControlPlane([auth_etcd.endpoint], access=EtcdAccess(user="tandem", password="wrong")).connect()
        with pytest.raises(ConnectionError, match=r"user name is empty.*no etcd user is set"):  # refused at connect
            await ControlPlane([auth_etcd.endpoint]).connect()

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
        access = EtcdAccess.from_files(ca_file=pki / "ca.pem", cert_file=pki / "client.pem",
                                       key_file=pki / "client.key")
        async with ControlPlane([server.endpoint], namespace="tls", lease_ttl_s=2, access=access) as cp:
            await register(cp, WorkerInfo("p0", "prefill", "127.0.0.1:1", ModelCard("m", 16), 16))
            assert set(await list_workers(cp, "prefill")) == {"p0"}
        with pytest.raises(ConnectionError):  # CA only, no client certificate
            await ControlPlane([server.endpoint], access=EtcdAccess.from_files(ca_file=pki / "ca.pem"),
                               request_timeout_s=1).connect()
        with pytest.raises(ConnectionError):  # plaintext against a TLS port
            await ControlPlane([server.endpoint], request_timeout_s=1).connect()

    with EtcdServer(tls=tls) as server:
        assert server.client_url.startswith("https://")
        run(main(server))
