"""One keep-alive HTTP/1.1 connection on asyncio streams, sending the same pre-encoded request over and over.

Why not aiohttp's client: the load generator shares the machine's two cores with the server it measures, so every
microsecond it spends per request is taken from the server. Here a request is one `write` of bytes built once, and
a response is read as little as HTTP allows: the status line, Content-Length, and the body by length. A chunked or
length-less response is refused (TF Serving's API and tfgate always send Content-Length). A response with
`Connection: close` or any failure mid-exchange closes the socket; the next send reconnects, and `opened` counts
every connect, so a report shows whether keep-alive held.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncio
import ssl

from bench.latency import RequestFailed

_HEAD_END = b"\r\n\r\n"


def encode_request(method: str, host: str, port: int, path: str, body: bytes = b"",
                   content_type: str = "application/json", headers: Sequence[tuple[str, str]] = ()) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", *(f"{name}: {value}" for name, value in headers)]
    if body or method == "POST":
        lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def parse_head(head: bytes) -> tuple[int, int, bool]:
    """Status, Content-Length and whether the server will close, from a response head ending in a blank line."""
    status_line, _, header_block = head.partition(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise RequestFailed("bad response", status_line[:200].decode("latin-1"))
    length: int | None = None
    close = parts[0] == b"HTTP/1.0"
    for line in header_block.lower().split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            close = value.strip() == b"close"
        elif name == b"transfer-encoding":
            raise RequestFailed("unsupported response", f"Transfer-Encoding {value.strip().decode('latin-1')}")
    if length is None:
        raise RequestFailed("unsupported response", "no Content-Length")
    return int(parts[1]), length, close


class HttpConnection:
    def __init__(self, host: str, port: int, request: bytes, tls: ssl.SSLContext | None = None) -> None:
        self._host, self._port = host, port
        self._request = request
        self._tls = tls
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.opened = 0

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(
            self._host, self._port, ssl=self._tls, server_hostname=self._host if self._tls else None)
        self.opened += 1

    async def send(self) -> None:
        """One exchange; returns on a 200, raises RequestFailed for another status and the socket's error if the
        exchange failed."""
        if self._writer is None:
            await self.connect()
        assert self._reader is not None and self._writer is not None
        try:
            self._writer.write(self._request)
            head = await self._reader.readuntil(_HEAD_END)
            status, length, close = parse_head(head)
            body = await self._reader.readexactly(length)
        except BaseException:  # cancelled or failed mid-exchange: the stream's position is unknown
            self.close()
            raise
        if close:
            self.close()
        if status != 200:
            raise RequestFailed(f"HTTP {status}", body[:300].decode(errors="replace"))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None
