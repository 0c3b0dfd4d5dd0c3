"""The gateway's TLS listener context (gateway/tls.py), driven through memory BIOs as uvloop drives it."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from gateway.certs import CertPaths, write_dev_certs
from gateway.config import TlsConfig
from gateway.tls import DirectSSLObject, server_context, switching_context


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return write_dev_certs(tmp_path_factory.mktemp("certs"), hosts=["localhost", "127.0.0.1"])


def _pump(source: ssl.MemoryBIO, target: ssl.MemoryBIO) -> None:
    target.write(source.read())


Pipe = tuple[ssl.MemoryBIO, ssl.MemoryBIO]


def _connect(listener: ssl.SSLContext, ca: Path) -> tuple[ssl.SSLObject, ssl.SSLObject, Pipe, Pipe]:
    """A server connection made by `listener` and a client one, handshake done, through memory BIOs; then the
    pipes to pump from server to client and from client to server."""
    client_context = ssl.create_default_context(cafile=ca)
    server_in, server_out, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
    server = listener.wrap_bio(server_in, server_out, server_side=True)
    client = client_context.wrap_bio(client_in, client_out, server_hostname="localhost")
    for _ in range(10):
        done = 0
        for connection, (read_from, write_to) in ((client, (client_out, server_in)),
                                                  (server, (server_out, client_in))):
            try:
                connection.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
            _pump(read_from, write_to)
        if done == 2:
            break
    return server, client, (server_out, client_in), (client_out, server_in)


def test_the_listener_hands_out_connections_whose_io_methods_are_the_c_objects(certs: CertPaths) -> None:
    tls = TlsConfig(cert=certs.server_cert, key=certs.server_key)
    listener = switching_context(lambda: server_context(tls))
    server, client, to_client, to_server = _connect(listener, certs.ca_cert)
    assert isinstance(server, DirectSSLObject)
    inner = server._sslobj  # type: ignore[attr-defined]
    assert (server.read, server.write, server.pending) == (inner.read, inner.write, inner.pending)

    with pytest.raises(ssl.SSLWantReadError):  # nothing sent yet: as with ssl.SSLObject
        server.read(1024)
    client.write(b"ping" * 100)
    _pump(*to_server)
    assert server.read(4) == b"ping"
    assert server.pending() > 0
    buffer = bytearray(1024)
    assert server.read(1024, buffer) == 396 and bytes(buffer[:8]) == b"pingping"
    assert server.write(b"pong") == 4
    _pump(*to_client)
    assert client.read(1024) == b"pong"


def test_a_new_connection_moves_to_the_current_context(certs: CertPaths) -> None:
    tls = TlsConfig(cert=certs.server_cert, key=certs.server_key)
    contexts = [server_context(tls)]
    listener = switching_context(lambda: contexts[-1])
    contexts.append(server_context(tls))
    server, *_ = _connect(listener, certs.ca_cert)
    assert server.context is contexts[-1]
