"""``tandem certs``: the certificates of a cluster's internal mutual TLS (``runtime.internal_grpc``).

One directory holds a fresh CA's certificate and one certificate and key the CA signed, for
every process of the cluster (a client and a server certificate at once), whose SANs name
127.0.0.1, ::1, localhost and the hosts given (those processes dial: workers' endpoints, etcd's).
The CA's own key is not kept: nothing else can be signed with it, and a cluster that needs
another host makes a new directory for all its hosts. It also holds a random password for the
cluster's etcd user (``tandem``). ``tandem serve --internal-tls-dir DIR`` uses it all: the
``internal_tls_*`` settings, and the ``etcd_*`` ones (its embedded etcd then serves TLS, takes
only clients with a certificate of the CA, and has auth on with that user).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CA_FILE, CERT_FILE, KEY_FILE = "ca.pem", "tandem.pem", "tandem-key.pem"
ETCD_PASSWORD_FILE, ETCD_USER = "etcd-password", "tandem"
LOCAL_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class CertFiles:
    """The files of a certificate directory, as the ``internal_tls_*`` and ``etcd_*`` settings
    name them."""

    ca: Path
    cert: Path
    key: Path
    etcd_password: Path

    @classmethod
    def in_dir(cls, directory: str | Path) -> CertFiles:
        d = Path(directory)
        return cls(d / CA_FILE, d / CERT_FILE, d / KEY_FILE, d / ETCD_PASSWORD_FILE)

    def settings(self) -> dict[str, str]:
        """The internal gRPC's mutual TLS."""
        return {"internal_tls_ca_file": str(self.ca), "internal_tls_cert_file": str(self.cert),
                "internal_tls_key_file": str(self.key)}

    def etcd_settings(self) -> dict[str, str]:
        """etcd over TLS with this certificate, as the cluster's etcd user."""
        return {"etcd_ca_file": str(self.ca), "etcd_cert_file": str(self.cert), "etcd_key_file": str(self.key),
                "etcd_user": ETCD_USER, "etcd_password_file": str(self.etcd_password)}


def make_certs(out_dir: str | Path, hosts: Sequence[str] = (), days: int = 365,
               name: str = "tandem") -> CertFiles:
    """Write a new CA and a certificate and key it signed for ``hosts`` (plus the local ones)
    into ``out_dir``; the key readable by its owner only. Existing files are replaced."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if days < 1:
        raise ValueError("days must be >= 1")
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} cluster CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))

    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for host in dict.fromkeys([*LOCAL_HOSTS, *hosts]):  # in order, once each
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} service")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))

    files = CertFiles.in_dir(out_dir)
    files.ca.parent.mkdir(parents=True, exist_ok=True)
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    _write_private(files.etcd_password, secrets.token_urlsafe(32).encode() + b"\n")
    return files


def _write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``, readable by its owner only from the start."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
