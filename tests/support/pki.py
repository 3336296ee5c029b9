"""Throwaway certificates for TLS tests: one helper to issue them, one to write PEM files,
and :func:`make_pki` for the common set (a CA, a server certificate for ``kvstore.test``
with server and client auth usages, as the chart's probe needs for mutual TLS, and a
client certificate).  Needs the ``cryptography`` package (a test dependency)."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAME = "kvstore.test"

Issuer = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: Issuer | None = None,
    *,
    usages: Sequence[x509.ObjectIdentifier] = (),
    sans: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    """A certificate valid for a day; self-signed (``issuer`` None) means a CA."""
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path


def write_cert(path: Path, certificate: x509.Certificate) -> Path:
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_pki(d: Path) -> Pki:
    """Write the common PKI under ``d`` (ca.crt, tls.crt, tls.key, client.crt, client.key)."""
    d.mkdir(parents=True, exist_ok=True)
    ca_key, srv_key, cli_key = new_key(), new_key(), new_key()
    ca = cert("kvstore test CA", ca_key)
    srv = cert(SERVER_NAME, srv_key, (ca, ca_key), usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
               sans=[x509.DNSName(SERVER_NAME)])
    cli = cert("admin", cli_key, (ca, ca_key), usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
    return Pki(
        ca=write_cert(d / "ca.crt", ca),
        server_cert=write_cert(d / "tls.crt", srv),
        server_key=write_key(d / "tls.key", srv_key),
        client_cert=write_cert(d / "client.crt", cli),
        client_key=write_key(d / "client.key", cli_key),
    )
