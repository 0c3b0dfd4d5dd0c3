"""Development certificates: what is written, idempotence, and real TLS / mutual TLS handshakes over loopback."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.certs import (
    CertPaths,
    client_subject,
    dev_cert_paths,
    write_client_cert,
    write_dev_certs,
)

TIMEOUT = 10.0


@pytest.fixture
def certs(tmp_path: Path) -> CertPaths:
    return write_dev_certs(tmp_path / "certs")


def contents(paths: CertPaths) -> dict[str, bytes]:
    return {name: path.read_bytes() for name, path in vars(paths).items()}


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def server_context(certs: CertPaths) -> ssl.SSLContext:
    """A server that requires a client certificate signed by the dev CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.load_cert_chain(certs.server_cert, certs.server_key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(certs.ca_cert)
    return context


def client_context(ca_cert: Path, client: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the server and its host name
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.load_verify_locations(ca_cert)
    if client is not None:
        context.load_cert_chain(*client)
    return context


def handshake(server: ssl.SSLContext, client: ssl.SSLContext,
              host: str = "localhost") -> tuple[str | OSError, bytes | OSError]:
    """One TLS connection to 127.0.0.1, naming the server `host`: what the server saw, what the client read.

    The server reports the client certificate's subject, or its error; the client reports the server's greeting,
    or its error. With TLS 1.3 a client learns that the server rejected its certificate only on its first read.
    """
    seen: list[str | OSError] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)

        def serve() -> None:
            try:
                connection, _ = listener.accept()
                connection.settimeout(TIMEOUT)
                with connection, server.wrap_socket(connection, server_side=True) as tls:
                    peer = tls.getpeercert(binary_form=True)
                    assert peer is not None
                    seen.append(client_subject(ssl.DER_cert_to_PEM_cert(peer).encode()))
                    tls.sendall(b"hi")
            except OSError as error:  # ssl.SSLError and timeouts included
                seen.append(error)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as raw, \
                    client.wrap_socket(raw, server_hostname=host) as tls:
                read: bytes | OSError = tls.recv(2)
        except OSError as error:
            read = error
        thread.join(TIMEOUT * 2)
    assert not thread.is_alive()
    return seen[0], read


def test_writes_every_file_and_keys_are_private(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b"
    paths = write_dev_certs(directory)
    assert paths == dev_cert_paths(directory)
    assert sorted(path.name for path in directory.iterdir()) == sorted(
        ["ca.pem", "ca-key.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem"])
    for key in (paths.ca_key, paths.server_key, paths.client_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert key.read_bytes().startswith(b"-----BEGIN %s-----\n" % b"PRIVATE KEY")  # PKCS#8, unencrypted


def test_certificate_contents(certs: CertPaths) -> None:
    ca, server, client = load(certs.ca_cert), load(certs.server_cert), load(certs.client_cert)
    assert ca.issuer == ca.subject
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    ca_key_id = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    for leaf, purpose in ((server, ExtendedKeyUsageOID.SERVER_AUTH), (client, ExtendedKeyUsageOID.CLIENT_AUTH)):
        leaf.verify_directly_issued_by(ca)
        assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [purpose]
        assert leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == ca_key_id
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    assert client_subject(certs.client_cert.read_bytes()) == "CN=tfgate-client"


def test_custom_hosts_and_client_name(tmp_path: Path) -> None:
    paths = write_dev_certs(tmp_path, hosts=["gpu-box.internal", "10.1.2.3"], client_name="ops")
    san = load(paths.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gpu-box.internal"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    assert client_subject(paths.client_cert.read_bytes()) == "CN=ops"


def test_second_call_keeps_the_files(certs: CertPaths) -> None:
    before = contents(certs)
    assert write_dev_certs(certs.ca_cert.parent, hosts=["elsewhere"]) == certs
    assert contents(certs) == before


def test_overwrite_replaces_everything(certs: CertPaths) -> None:
    before = contents(certs)
    write_dev_certs(certs.ca_cert.parent, overwrite=True)
    after = contents(certs)
    assert all(after[name] != before[name] for name in before)
    assert handshake(server_context(certs), client_context(certs.ca_cert, (certs.client_cert, certs.client_key)))[0] \
        == "CN=tfgate-client"


def test_a_partial_set_is_regenerated_whole(certs: CertPaths) -> None:
    before = contents(certs)
    certs.server_cert.unlink()
    write_dev_certs(certs.ca_cert.parent)
    after = contents(certs)
    assert all(after[name] != before[name] for name in before)
    load(certs.server_cert).verify_directly_issued_by(load(certs.ca_cert))


def test_a_mismatched_set_is_regenerated_whole(certs: CertPaths, tmp_path: Path) -> None:
    """A whole set whose server certificate comes from another CA (say, two first starts racing) is replaced."""
    other = write_dev_certs(tmp_path / "other")
    certs.server_cert.write_bytes(other.server_cert.read_bytes())
    certs.server_key.write_bytes(other.server_key.read_bytes())
    write_dev_certs(certs.ca_cert.parent)
    load(certs.server_cert).verify_directly_issued_by(load(certs.ca_cert))


def test_a_key_that_does_not_match_its_certificate_is_regenerated(certs: CertPaths, tmp_path: Path) -> None:
    certs.client_key.write_bytes(write_dev_certs(tmp_path / "other").client_key.read_bytes())
    write_dev_certs(certs.ca_cert.parent)
    assert handshake(server_context(certs), client_context(certs.ca_cert, (certs.client_cert, certs.client_key)))[0] \
        == "CN=tfgate-client"


def test_overwrite_gives_a_loosened_key_its_private_mode_back(certs: CertPaths) -> None:
    certs.ca_key.chmod(0o644)
    write_dev_certs(certs.ca_cert.parent, overwrite=True)
    assert stat.S_IMODE(certs.ca_key.stat().st_mode) == 0o600


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "::1"])
def test_mutual_tls_handshake(certs: CertPaths, host: str) -> None:
    seen, read = handshake(server_context(certs), client_context(certs.ca_cert, (certs.client_cert, certs.client_key)),
                           host)
    assert (seen, read) == ("CN=tfgate-client", b"hi")


def test_a_host_not_in_the_certificate_fails_verification(certs: CertPaths) -> None:
    seen, read = handshake(server_context(certs), client_context(certs.ca_cert, (certs.client_cert, certs.client_key)),
                           "example.com")
    assert isinstance(read, ssl.SSLCertVerificationError) and "example.com" in read.verify_message
    assert isinstance(seen, ssl.SSLError)


def test_a_client_without_a_certificate_is_refused(certs: CertPaths) -> None:
    seen, read = handshake(server_context(certs), client_context(certs.ca_cert))
    assert isinstance(seen, ssl.SSLError) and "PEER_DID_NOT_RETURN_A_CERTIFICATE" in str(seen)
    assert isinstance(read, OSError)


def test_a_client_that_does_not_trust_the_ca_refuses_the_server(certs: CertPaths, tmp_path: Path) -> None:
    stranger = write_dev_certs(tmp_path / "stranger")
    seen, read = handshake(server_context(certs),
                           client_context(stranger.ca_cert, (certs.client_cert, certs.client_key)))
    assert isinstance(read, ssl.SSLCertVerificationError)
    assert isinstance(seen, ssl.SSLError)


def test_a_client_certificate_from_another_ca_is_refused(certs: CertPaths, tmp_path: Path) -> None:
    stranger = write_dev_certs(tmp_path / "stranger")
    seen, read = handshake(server_context(certs),
                           client_context(certs.ca_cert, (stranger.client_cert, stranger.client_key)))
    assert isinstance(seen, ssl.SSLCertVerificationError)
    assert isinstance(read, OSError)


def test_another_client_signed_by_the_same_ca(certs: CertPaths, tmp_path: Path) -> None:
    cert, key = write_client_cert(certs, "alice", tmp_path / "clients")
    assert (cert.name, key.name) == ("alice.pem", "alice-key.pem")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert handshake(server_context(certs), client_context(certs.ca_cert, (cert, key))) == ("CN=alice", b"hi")


@pytest.mark.parametrize("name", ["ca", "server-key", "ca-key", "../alice", "a/b", ".hidden", ""])
def test_client_names_that_would_clobber_or_escape_are_refused(certs: CertPaths, name: str) -> None:
    before = contents(certs)
    with pytest.raises(ValueError):
        write_client_cert(certs, name, certs.ca_cert.parent)
    assert contents(certs) == before


def test_bad_arguments_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_dev_certs(tmp_path, hosts=[])
    with pytest.raises(ValueError):
        write_dev_certs(tmp_path, days=0)
    assert list(tmp_path.iterdir()) == []
