"""The edge's TLS: TLS 1.2+ only, modern AEAD ciphers, optional or required client certificates, and certificates
that reload without a restart.

How reloading works: the listening socket keeps the context it was created with, whose only job is an SNI
callback that moves each new connection onto the current snapshot's context (`SSLObject.context` may be replaced
there, before the handshake proceeds). Connections already open keep the context they shook hands with.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

import grpc

from gateway.config import TlsConfig

# ECDHE key exchange with AEAD ciphers only, for TLS 1.2 (TLS 1.3's suites are all modern and not set here).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class TlsError(Exception):
    """The certificate, key or CA could not be used; the message names the file."""


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as error:
        raise TlsError(f"tls.cert / tls.key ({tls.cert}, {tls.key}): {error}") from None
    if tls.client_cert != "none":
        try:
            context.load_verify_locations(cafile=tls.client_ca)
        except (OSError, ssl.SSLError) as error:
            raise TlsError(f"tls.client_ca ({tls.client_ca}): {error}") from None
        context.verify_mode = ssl.CERT_REQUIRED if tls.client_cert == "required" else ssl.CERT_OPTIONAL
    return context


class DirectSSLObject(ssl.SSLObject):
    """An SSLObject whose read, write and pending are the C object's own methods. ssl.SSLObject wraps each in a
    Python method that only forwards its arguments, and uvloop calls them several times per request (measured with
    callgrind: 3.4k of the gateway's 207.5k instructions per proxied request). Same arguments, results and errors."""

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> DirectSSLObject:
        connection = super()._create(*args, **kwargs)  # type: ignore[misc]  # private, so not in typeshed
        inner = connection._sslobj
        connection.read, connection.write, connection.pending = inner.read, inner.write, inner.pending
        return connection


def switching_context(current: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """The listener's context: hands every new connection to `current()` (see the module docstring)."""
    listener = current()  # same settings, so a client that sends no SNI still gets the current certificate
    listener.sslobject_class = DirectSSLObject

    def switch(connection: ssl.SSLObject, _server_name: str | None, _context: ssl.SSLContext) -> None:
        connection.context = current()

    listener.sni_callback = switch  # type: ignore[assignment]
    return listener


class GrpcCertificates:
    """The gRPC listener's certificate, key and client CA, replaced on reload like the REST edge's: gRPC asks
    `fetch` before each new handshake, which answers a new configuration once after `update`, else None (no
    change). Connections already open keep theirs. Whether client certificates are required is fixed at start, as
    for REST (a reload may not change tls.client_cert)."""

    def __init__(self, tls: TlsConfig) -> None:
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.credentials = grpc.dynamic_ssl_server_credentials(
            _grpc_configuration(tls), self.fetch, require_client_authentication=tls.client_cert == "required")

    def update(self, tls: TlsConfig) -> None:
        """Read the files (call it off the event loop); the next handshake uses them."""
        self._pending = _grpc_configuration(tls)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        pending, self._pending = self._pending, None
        return pending


def _grpc_configuration(tls: TlsConfig) -> grpc.ServerCertificateConfiguration:
    """gRPC's TLS (BoringSSL) offers 1.2 and 1.3 only; client certificates are verified against tls.client_ca."""
    root = tls.client_ca.read_bytes() if tls.client_ca is not None and tls.client_cert != "none" else None
    return grpc.ssl_server_certificate_configuration([(tls.key.read_bytes(), tls.cert.read_bytes())],
                                                     root_certificates=root)
