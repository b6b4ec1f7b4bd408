"""TLS material for a federation: a CA and the coordinator's certificate, made with `cryptography`.

The CA signs the SuperLink's certificate; every site gets only the CA certificate (``ca.crt``) to
verify the coordinator. Private keys are written with mode 0600 and never leave the coordinator.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedgov.deploy import write_file
from fedgov.errors import FedgovError

CA_DAYS = 3650
SERVER_DAYS = 825


@dataclass(frozen=True)
class FederationCerts:
    """Paths of the files :func:`create_federation_certs` wrote."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _name(common_name: str, federation: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"fedgov federation {federation}"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _subject_alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_ca(
    federation: str, now: dt.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate (P-384) that may sign only end-entity certificates."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name(f"{federation} CA", federation)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return cert, key


def make_server_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: list[str],
    federation: str,
    now: dt.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The coordinator's certificate, valid for ``hosts`` (IP addresses or DNS names)."""
    if not hosts:
        raise FedgovError("--host: at least one host name or IP address is needed for the SAN")
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0], federation))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(_subject_alt_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return cert, key


def create_federation_certs(
    out_dir: str | Path, hosts: list[str], federation: str = "fedgov", overwrite: bool = False
) -> FederationCerts:
    """Write ``ca.crt``, ``ca.key``, ``server.crt``, ``server.key`` into ``out_dir``."""
    out = Path(out_dir)
    paths = FederationCerts(out / "ca.crt", out / "ca.key", out / "server.crt", out / "server.key")
    existing = [p for p in vars(paths).values() if p.exists()]
    if existing and not overwrite:
        raise FedgovError(
            f"certs: {existing[0]} already exists (pass --overwrite to replace the federation's "
            "certificates; every site then needs the new ca.crt)"
        )
    now = dt.datetime.now(dt.UTC)
    ca_cert, ca_key = make_ca(federation, now)
    server_cert, server_key = make_server_cert(ca_cert, ca_key, hosts, federation, now)
    pem = serialization.Encoding.PEM
    no_password = serialization.NoEncryption()
    pkcs8 = serialization.PrivateFormat.PKCS8
    write_file(paths.ca_cert, ca_cert.public_bytes(pem), private=False)
    write_file(paths.ca_key, ca_key.private_bytes(pem, pkcs8, no_password), private=True)
    write_file(paths.server_cert, server_cert.public_bytes(pem), private=False)
    write_file(paths.server_key, server_key.private_bytes(pem, pkcs8, no_password), private=True)
    return paths
