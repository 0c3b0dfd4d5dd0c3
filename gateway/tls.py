"""The edge's TLS: TLS 1.2+ only, modern AEAD ciphers, optional or required client certificates, and certificates
that reload without a restart.

How reloading works: the listening socket keeps the context it was created with, whose only job is an SNI
callback that moves each new connection onto the current snapshot's context (`SSLObject.context` may be replaced
there, before the handshake proceeds). Connections already open keep the context they shook hands with.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

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


def switching_context(current: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """The listener's context: hands every new connection to `current()` (see the module docstring)."""
    listener = current()  # same settings, so a client that sends no SNI still gets the current certificate

    def switch(connection: ssl.SSLObject, _server_name: str | None, _context: ssl.SSLContext) -> None:
        connection.context = current()

    listener.sni_callback = switch  # type: ignore[assignment]
    return listener


def grpc_server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """The same certificate, key and client verification for the gRPC listener (gRPC's TLS offers 1.2 and 1.3)."""
    root = tls.client_ca.read_bytes() if tls.client_ca is not None and tls.client_cert != "none" else None
    return grpc.ssl_server_credentials([(tls.key.read_bytes(), tls.cert.read_bytes())], root_certificates=root,
                                       require_client_auth=tls.client_cert == "required")
