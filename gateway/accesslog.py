"""One structured JSON line per request, for log pipelines: on stdout by default.

It carries what an operator searches by: the request id (also returned in `x-request-id` and sent upstream),
model, version or label as routed, route, pool, the upstream that answered, status, attempts and durations. It
never carries bodies or credentials: headers are not logged at all.

Why not the logging module: a LogRecord, a formatter and a flush per request cost more than forwarding the request
itself (measured: the access log was the largest Python cost per request in the gateway). Lines are serialized by
orjson straight from the record, appended to a buffer, and written out at most `flush_s` later (or at once when the
buffer passes 64 KiB, and always on close), like nginx's `access_log ... buffer= flush=`.

The workers of one gateway (gateway/primary.py) share its stdout, often a pipe to a log shipper. A write to a pipe
is whole only up to PIPE_BUF bytes (POSIX): a bigger one can be split and interleaved with another worker's, which
cut lines in two (measured: 3k of 40k lines broken with two workers and a slow reader). So the buffer goes out in
writes of whole lines, each at most PIPE_BUF bytes; only a line longer than that goes alone and may still be split.
"""

from __future__ import annotations

import asyncio
import select
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import orjson

_FLUSH_BYTES = 64 * 1024
_WHOLE_WRITE_BYTES = select.PIPE_BUF


@dataclass(slots=True)
class AccessRecord:
    request_id: str
    method: str
    path: str
    peer: str
    principal: str = ""  # who called: a key or certificate rule's name, a token's subject; never a secret
    ts: float = field(default_factory=time.time)
    status: int = 0
    model: str = ""
    version: int | None = None
    label: str | None = None
    route: str = ""
    pool: str = ""
    upstream: str = ""
    attempts: int = 0
    duration_ms: float = 0.0
    upstream_ms: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    error: str = ""
    protocol: str = "rest"  # or "grpc", whose calls carry their status name in grpc_status (status stays 0)
    grpc_status: str = ""


class AccessLog:
    """Buffered JSON lines on a binary stream; `None` for no access log at all."""

    def __init__(self, stream: BinaryIO | None = None, flush_s: float = 0.1) -> None:
        self._stream = stream
        self._flush_s = flush_s
        self._buffer = bytearray()
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def to_stdout(cls) -> AccessLog:
        return cls(sys.stdout.buffer)

    def write(self, record: AccessRecord) -> None:
        if self._stream is None:
            return
        self._buffer += orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        if len(self._buffer) >= _FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._flush_s, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._buffer and self._stream is not None:
            for chunk in whole_lines(self._buffer, _WHOLE_WRITE_BYTES):
                self._stream.write(chunk)
                self._stream.flush()  # one write per chunk: a buffered stream would merge them again
            self._buffer.clear()


def whole_lines(buffer: bytearray, limit: int) -> Iterator[bytes]:
    """`buffer` (newline-terminated lines) in pieces of whole lines of at most `limit` bytes each; a line longer
    than `limit` is a piece of its own."""
    start = 0
    while start < len(buffer):
        end = start + limit
        if end < len(buffer):
            cut = buffer.rfind(b"\n", start, end)
            if cut < 0:  # a line longer than the limit
                cut = buffer.find(b"\n", end)
            end = len(buffer) if cut < 0 else cut + 1
        yield bytes(buffer[start:end])
        start = end
