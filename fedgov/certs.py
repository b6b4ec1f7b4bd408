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
from cryptography.exceptions import InvalidSignature
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
    key: ec.EllipticCurvePrivateKey | None = None,
    days: int = SERVER_DAYS,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The coordinator's certificate, valid for ``hosts`` (IP addresses or DNS names) for
    ``days`` from ``now``, for ``key`` (a new one when None)."""
    if not hosts:
        raise FedgovError("--host: at least one host name or IP address is needed for the SAN")
    key = ec.generate_private_key(ec.SECP384R1()) if key is None else key
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0], federation))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
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
    """Write ``ca.crt``, ``ca.key``, ``server.crt``, ``server.key`` into ``out_dir``; the
    server certificate names ``hosts`` and always ``127.0.0.1`` and ``localhost``."""
    out = Path(out_dir)
    paths = FederationCerts(out / "ca.crt", out / "ca.key", out / "server.crt", out / "server.key")
    existing = [p for p in vars(paths).values() if p.exists()]
    if existing and not overwrite:
        raise FedgovError(
            f"certs: {existing[0]} already exists (pass --overwrite to replace the federation's "
            "certificates; every site then needs the new ca.crt)"
        )
    now = dt.datetime.now(dt.UTC)
    # The coordinator's own `flwr` calls reach its Control API through loopback only.
    hosts = list(dict.fromkeys([*hosts, "127.0.0.1", "localhost"]))
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


@dataclass(frozen=True)
class RenewedCert:
    """What :func:`renew_server_cert` wrote."""

    path: Path
    hosts: list[str]
    not_after: dt.datetime


def _load(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise FedgovError(f"renew-cert: {path} is missing ({what})")
    return path.read_bytes()


def renew_server_cert(
    certs_dir: str | Path,
    hosts: list[str] | None = None,
    now: dt.datetime | None = None,
    days: int | None = None,
) -> RenewedCert:
    """Sign a new ``server.crt`` with ``ca.key`` for the existing ``server.key``; nothing else
    changes (the sites keep ``ca.crt``). ``hosts`` default to the old certificate's names;
    ``127.0.0.1`` and ``localhost`` are always among them (the coordinator's own calls)."""
    out = Path(certs_dir)
    ca_cert = x509.load_pem_x509_certificate(_load(out / "ca.crt", "the federation's CA"))
    ca_key = serialization.load_pem_private_key(_load(out / "ca.key", "the CA's key"), None)
    server_key = serialization.load_pem_private_key(
        _load(out / "server.key", "the coordinator's key"), None
    )
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or not isinstance(
        server_key, ec.EllipticCurvePrivateKey
    ):
        raise FedgovError(f"renew-cert: the keys in {out} are not the EC keys fedgov writes")
    if ca_key.public_key().public_numbers() != ca_cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise FedgovError(f"renew-cert: {out / 'ca.key'} does not belong to {out / 'ca.crt'}")
    old_path = out / "server.crt"
    if hosts is None:
        if not old_path.is_file():
            raise FedgovError(f"renew-cert: {old_path} is missing; name the hosts with --host")
        old = x509.load_pem_x509_certificate(old_path.read_bytes())
        names = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        hosts = [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
        hosts = names.get_values_for_type(x509.DNSName) + hosts
    hosts = list(dict.fromkeys([*hosts, "127.0.0.1", "localhost"]))
    organisation = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    federation = (
        str(organisation[0].value).removeprefix("fedgov federation ") if organisation else "fedgov"
    )
    cert, _ = make_server_cert(
        ca_cert,
        ca_key,
        hosts,
        federation,
        now or dt.datetime.now(dt.UTC),
        server_key,
        days or SERVER_DAYS,
    )
    temporary = old_path.with_name(".server.crt.new")
    write_file(temporary, cert.public_bytes(serialization.Encoding.PEM), private=False)
    temporary.replace(old_path)
    return RenewedCert(old_path, hosts, cert.not_valid_after_utc)


def certificate_problem(
    cert_pem: bytes, ca_pem: bytes, host: str, now: dt.datetime | None = None
) -> str | None:
    """Why a site would refuse the coordinator's certificate ``cert_pem``, in a few words
    (``expired on ...``, ``is not signed by ...``, ``does not name HOST``), or None."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    now = now or dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc < now:
        return f"expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    if cert.not_valid_before_utc > now:
        return f"is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    try:
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    except (ValueError, TypeError, InvalidSignature):
        return "is not signed by"
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return f"does not name {host}"
    try:
        if ipaddress.ip_address(host) in names.get_values_for_type(x509.IPAddress):
            return None
    except ValueError:
        if host in names.get_values_for_type(x509.DNSName):
            return None
    return f"does not name {host}"
