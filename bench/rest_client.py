"""One persistent HTTP/1.1 connection posting the same JSON body: the lightest client the stdlib offers.

`http.client` reuses the socket while the server keeps the connection alive and reopens it on the next request
after the server closes it or a request fails; `connections` counts the opens, so a report can show that a
keep-alive run really used one connection.
"""

from __future__ import annotations

import http.client
import ipaddress
from typing import Sequence
from urllib.parse import urlsplit

from bench.latency import RequestFailed

_HEADERS = {"Content-Type": "application/json"}
_DEFAULT_PORTS = {"http": 80, "https": 443}


def loopback_address(url: str, schemes: Sequence[str] = ("http",)) -> tuple[str, int]:
    """Host and port of a URL on this machine with one of `schemes`; anything else is refused, since a load
    generator aimed at someone else's server is an attack, not a benchmark."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    is_loopback = host == "localhost" or _is_loopback_ip(host)
    port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    if parts.scheme not in schemes or not is_loopback or parts.path.strip("/") or port is None:
        raise ValueError(f"expected {'|'.join(schemes)}://127.0.0.1:PORT (loopback only, no path), got {url!r}")
    return host, port


def _is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class KeepAliveClient:
    def __init__(self, url: str, path: str, body: bytes, timeout_s: float = 10.0) -> None:
        host, port = loopback_address(url)
        self._connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
        self._path = path
        self._body = body
        self.connections = 0

    def post(self) -> bytes:
        """The body of a 200 response; RequestFailed for another status, the socket's error if it failed."""
        if self._connection.sock is None:
            self.connections += 1
        try:
            self._connection.request("POST", self._path, self._body, _HEADERS)
            response = self._connection.getresponse()
            data = response.read()
        except Exception:
            self._connection.close()  # a half-done exchange leaves the connection unusable: start clean
            raise
        if response.status != 200:
            raise RequestFailed(f"HTTP {response.status}", data[:300].decode(errors="replace"))
        return data

    def close(self) -> None:
        self._connection.close()
