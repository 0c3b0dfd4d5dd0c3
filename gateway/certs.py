"""Development certificates: a private CA, a server certificate and client certificates, as PEM files.

They let `tfgate up` and the tests speak TLS and mutual TLS with no outside PKI. Keys are ECDSA P-256 (fast to
generate) signed with SHA-256. The certificates also pass OpenSSL's strict X.509 checks (`VERIFY_X509_STRICT`,
Python 3.13's default), so basicConstraints is critical and every certificate carries key identifiers.

Guarantees: a file is written to a temporary name and renamed, so a reader never sees half of one; a private key is
created with mode 0600 and is never readable by others, not even for a moment. `write_dev_certs` keeps an existing
set only if it is whole and consistent (each key matches its certificate, both leaves are signed by the CA), so a
crash or a concurrent first start can never leave a mismatched set in use.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
DEFAULT_DAYS = 825  # the longest validity macOS and iOS accept for a TLS server certificate
CA_NAME = "tfgate development CA"
SERVER_NAME = "tfgate development server"  # clients match the SubjectAlternativeName, never this
CLOCK_SKEW = timedelta(hours=1)  # backdated so a peer whose clock is a little behind accepts a fresh certificate
CLIENT_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # it becomes a file name: no separators, no dotfiles

IssuerKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class CertPaths:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@dataclass(frozen=True)
class _Issuer:
    cert: x509.Certificate
    key: IssuerKey


def dev_cert_paths(directory: Path) -> CertPaths:
    """Where `write_dev_certs` puts its files, without touching the disk."""
    client_cert, client_key = _client_paths(directory, "client")
    return CertPaths(ca_cert=directory / "ca.pem", ca_key=directory / "ca-key.pem",
                     server_cert=directory / "server.pem", server_key=directory / "server-key.pem",
                     client_cert=client_cert, client_key=client_key)


def write_dev_certs(directory: Path, *, hosts: Sequence[str] = DEFAULT_HOSTS, client_name: str = "tfgate-client",
                    days: int = DEFAULT_DAYS, overwrite: bool = False) -> CertPaths:
    """Make a CA, a server certificate for `hosts` and a client certificate (CN=`client_name`) in `directory`.

    Idempotent, as `tfgate up` calls it on every start: a whole, consistent set already there is kept as it is
    (even if made for other hosts; pass overwrite=True to replace it). Anything less is replaced whole.
    """
    if not hosts:
        raise ValueError("a server certificate needs at least one host")
    paths = dev_cert_paths(directory)
    if not overwrite:
        problem = _set_problem(paths)
        if problem is None:
            return paths
        if any(path.exists() for path in _all_paths(paths)):
            log.warning("replacing the development certificates in %s: %s", directory, problem)
    directory.mkdir(parents=True, exist_ok=True)
    ca = _new_ca(days)
    _write_pair(paths.ca_cert, paths.ca_key, ca.cert, ca.key)
    server_cert, server_key = _issue(ca, SERVER_NAME, ExtendedKeyUsageOID.SERVER_AUTH, days,
                                     x509.SubjectAlternativeName([_general_name(host) for host in hosts]))
    _write_pair(paths.server_cert, paths.server_key, server_cert, server_key)
    client_cert, client_key = _issue(ca, client_name, ExtendedKeyUsageOID.CLIENT_AUTH, days)
    _write_pair(paths.client_cert, paths.client_key, client_cert, client_key)
    return paths


def write_client_cert(paths: CertPaths, name: str, directory: Path, *, days: int = DEFAULT_DAYS) -> tuple[Path, Path]:
    """Sign a client certificate with CN=`name` by the CA in `paths`; write `name`.pem and `name`-key.pem.

    An existing pair of that name is replaced. Names that would overwrite the CA or the server's files are refused.
    """
    if not CLIENT_NAME_PATTERN.fullmatch(name):
        raise ValueError(f"client name {name!r} must be letters, digits, '.', '_' or '-', starting with a letter "
                         "or digit")
    cert_path, key_path = _client_paths(directory, name)
    protected = {path.resolve() for path in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key)}
    if {cert_path.resolve(), key_path.resolve()} & protected:
        raise ValueError(f"client name {name!r} would overwrite the CA's or the server's files in {directory}")
    ca = _load_issuer(paths)
    cert, key = _issue(ca, name, ExtendedKeyUsageOID.CLIENT_AUTH, days)
    directory.mkdir(parents=True, exist_ok=True)
    _write_pair(cert_path, key_path, cert, key)
    return cert_path, key_path


def client_subject(cert_pem: bytes) -> str:
    """The certificate's subject as an RFC 4514 string (`CN=tfgate-client`): the key for mapping it to a principal."""
    return x509.load_pem_x509_certificate(cert_pem).subject.rfc4514_string()


def _client_paths(directory: Path, name: str) -> tuple[Path, Path]:
    return directory / f"{name}.pem", directory / f"{name}-key.pem"


def _all_paths(paths: CertPaths) -> list[Path]:
    return [getattr(paths, field.name) for field in fields(paths)]


def _set_problem(paths: CertPaths) -> str | None:
    """Why the files at `paths` are not a usable set (missing, unreadable, mismatched), or None if they are."""
    try:
        ca = _load_issuer(paths)
        if ca.key.public_key() != ca.cert.public_key():
            return f"{paths.ca_key.name} does not match {paths.ca_cert.name}"
        for cert_path, key_path in ((paths.server_cert, paths.server_key), (paths.client_cert, paths.client_key)):
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            cert.verify_directly_issued_by(ca.cert)
            if serialization.load_pem_private_key(key_path.read_bytes(), password=None).public_key() \
                    != cert.public_key():
                return f"{key_path.name} does not match {cert_path.name}"
    except FileNotFoundError as error:
        return f"{Path(str(error.filename)).name} is missing"
    except InvalidSignature:
        return "a certificate is not signed by the CA"
    except (ValueError, TypeError) as error:
        return f"unreadable: {error}"
    return None


def _load_issuer(paths: CertPaths) -> _Issuer:
    cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    if not isinstance(key, IssuerKey):
        raise TypeError(f"{paths.ca_key} holds a {type(key).__name__}; a CA key must be ECDSA or RSA")
    return _Issuer(cert, key)


def _general_name(host: str) -> x509.GeneralName:
    """An IP address SAN for an address (clients match IPs only against these), a DNS name otherwise."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, days: int,
             *, ca: bool) -> x509.CertificateBuilder:
    """What every certificate here shares: validity, serial, subject key identifier and basicConstraints."""
    if days < 1:
        raise ValueError(f"a certificate must be valid for at least 1 day, not {days}")
    now = datetime.now(UTC)
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))


def _key_usage(*, signature: bool, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=signature, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                         encipher_only=False, decipher_only=False)


def _new_ca(days: int) -> _Issuer:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = _new_key()
    cert = (_builder(_name(CA_NAME), _name(CA_NAME), key, days, ca=True)
            .add_extension(_key_usage(signature=False, ca=True), critical=True)
            .sign(key, hashes.SHA256()))
    return _Issuer(cert, key)


def _issue(ca: _Issuer, common_name: str, usage: x509.ObjectIdentifier, days: int,
           san: x509.SubjectAlternativeName | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new key and a leaf certificate for it, signed by `ca`, good for one extended key usage."""
    key = _new_key()
    ca_key_id = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (_builder(_name(common_name), ca.cert.subject, key, days, ca=False)
               .add_extension(_key_usage(signature=True, ca=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id),
                              critical=False))
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(ca.key, hashes.SHA256()), key


def _write_pair(cert_path: Path, key_path: Path, cert: x509.Certificate, key: IssuerKey) -> None:
    """Key first, so a certificate on disk always has its key beside it."""
    _write(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()), mode=0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _write(path: Path, data: bytes, *, mode: int) -> None:
    """Create a fresh file with `mode` and rename it over `path`: an old file's looser mode never carries over."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with open(fd, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
