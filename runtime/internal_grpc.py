"""The one place a tandem process makes its internal gRPC servers' ports and its channels to
other tandem processes: the workers' ``WorkerService`` (router -> worker, worker -> worker,
launcher -> worker) and ``tandem serve``'s ``ClusterLauncher`` (planner -> serve).

Plaintext unless the cluster config names a CA, a certificate and its key
(``internal_tls_ca_file``, ``internal_tls_cert_file``, ``internal_tls_key_file``; ``tandem certs``
makes them). Then it is mutual TLS: a server takes only clients that present a certificate the
CA signed, and a client talks only to servers whose certificate the CA signed for the host it
dials (the endpoint a worker registered: its SANs must name that host). Being signed by the
cluster's CA is what authenticates a process; there are no per-process roles.

Clients' own listeners (the router's HTTP and KServe ports, ``router.edge``) and etcd have their
own settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from runtime.settings import ClusterConfig

ChannelOptions = Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class InternalGrpc:
    """How this process's internal servers listen and its internal channels connect: the cluster
    CA, this process's certificate chain and key (PEM bytes), or all None for plaintext."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None

    @classmethod
    def from_config(cls, cfg: ClusterConfig) -> InternalGrpc:
        """The config's files, read once (the config checked that they go together and exist)."""
        if cfg.internal_tls_ca_file is None:
            return PLAINTEXT
        assert cfg.internal_tls_cert_file is not None and cfg.internal_tls_key_file is not None
        return cls(Path(cfg.internal_tls_ca_file).read_bytes(), Path(cfg.internal_tls_cert_file).read_bytes(),
                   Path(cfg.internal_tls_key_file).read_bytes())

    @property
    def tls(self) -> bool:
        return self.ca is not None

    def _channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def channel(self, target: str, options: ChannelOptions = ()) -> grpc.aio.Channel:
        """An asyncio channel to another tandem process at ``target`` (host:port)."""
        if not self.tls:
            return grpc.aio.insecure_channel(target, options=list(options))
        return grpc.aio.secure_channel(target, self._channel_credentials(), options=list(options))

    def blocking_channel(self, target: str, options: ChannelOptions = ()) -> grpc.Channel:
        """A blocking channel (the launchers' drains and switches, ``RemoteLauncher``)."""
        if not self.tls:
            return grpc.insecure_channel(target, options=list(options))
        return grpc.secure_channel(target, self._channel_credentials(), options=list(options))

    def add_port(self, server: grpc.Server | grpc.aio.Server, address: str) -> int:
        """Bind ``address`` on ``server`` (blocking or asyncio); the port, 0 if it cannot bind.
        With TLS, a client without a certificate of the cluster's CA fails its handshake: it
        never reaches a servicer."""
        if not self.tls:
            return server.add_insecure_port(address)
        assert self.cert is not None and self.key is not None
        credentials = grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                                  require_client_auth=True)
        return server.add_secure_port(address, credentials)


PLAINTEXT = InternalGrpc()
