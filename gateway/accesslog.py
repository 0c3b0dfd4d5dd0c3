"""One structured JSON line per request, for log pipelines: on stdout by default.

It carries what an operator searches by: the request id (also returned in `x-request-id` and sent upstream),
model, version or label as routed, route, pool, the upstream that answered, status, attempts and durations. It
never carries bodies or credentials: headers are not logged at all.

Why not the logging module: a LogRecord, a formatter and a flush per request cost more than forwarding the request
itself (measured: the access log was the largest Python cost per request in the gateway). Lines are serialized by
orjson straight from the record's fields (gateway/access_record.py), appended to a buffer, and written out at most
`flush_s` later (or at once when the buffer passes 64 KiB, and always on close), like nginx's `access_log ...
buffer= flush=`.

The workers of one gateway (gateway/primary.py) share its stdout, often a pipe to a log shipper. A write to a pipe
is whole only up to PIPE_BUF bytes (POSIX): a bigger one can be split and interleaved with another worker's, which
cut lines in two (measured: 3k of 40k lines broken with two workers and a slow reader). So the buffer goes out in
writes of whole lines, each at most PIPE_BUF bytes; only a line longer than that goes alone and may still be split.
A regular file needs no such care (an O_APPEND write lands whole at the end), so there the buffer goes out in one
write: each write releases and retakes the GIL, which the busy event loop then has to hand over (measured: ~1,300
GIL hand-offs a second at 3k requests/s, writing 64 KiB in 16 pieces).

A write to a pipe blocks while the pipe is full, and a log shipper that stalls (restarting, back-pressured) would
so freeze the event loop, and every request with it. So the writes happen on a thread of their own: the event loop
only hands it the buffer. While the reader is stalled, up to `max_pending_bytes` wait for it; beyond that, lines are
dropped, counted (`dropped_lines`, `on_drop`, the gateway's tfgate_gateway_access_log_dropped_lines_total) and
warned about, as Envoy's access log does: serving matters more than its log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import BinaryIO

import orjson

from backend.http_server import unicode_safe
from gateway.access_record import AccessRecord

_FLUSH_BYTES = 64 * 1024
MAX_PENDING_BYTES = 8 * 1024 * 1024  # ~25k lines waiting for a stalled reader
_DROP_WARNING_INTERVAL_S = 10.0

log = logging.getLogger("tfgate.gateway")


class AccessLog:
    """Buffered JSON lines on a binary stream, written by a thread of its own; `None` for no access log at all."""

    def __init__(self, stream: BinaryIO | None = None, flush_s: float = 0.1,
                 max_pending_bytes: int = MAX_PENDING_BYTES) -> None:
        self._stream = stream
        self._flush_s = flush_s
        self._max_pending_bytes = max_pending_bytes
        self._buffer = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._writer: _Writer | None = None  # started by the first flush with lines to write
        self.dropped_lines = 0
        self.on_drop: Callable[[int], None] | None = None  # called on the event loop with each drop's line count
        self._last_warning = float("-inf")

    @classmethod
    def to_stdout(cls) -> AccessLog:
        return cls(sys.stdout.buffer)

    def write(self, record: AccessRecord) -> None:
        if self._stream is None:
            return
        try:
            line = orjson.dumps(record.as_dict(), option=orjson.OPT_APPEND_NEWLINE)
        except TypeError:  # a value orjson refuses, such as a lone surrogate in a token's `sub`: the line is kept
            line = orjson.dumps(_encodable(record), option=orjson.OPT_APPEND_NEWLINE)
        self._buffer += line
        if len(self._buffer) >= _FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._flush_s, self.flush)

    def flush(self) -> None:
        """Hand the buffered lines to the writer thread, or drop them if too many already wait; never blocks."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buffer or self._stream is None:
            return
        data = bytes(self._buffer)
        self._buffer.clear()
        if self._writer is None:
            self._writer = _Writer(self._stream)
        if not self._writer.offer(data, self._max_pending_bytes):
            self._dropped(data.count(b"\n"))

    async def drain(self) -> None:
        """Flush, and return once the writer has written every line handed to it."""
        self.flush()
        if self._writer is not None:
            await asyncio.to_thread(self._writer.wait_written)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Flush and stop the writer once it has written everything, waiting at most `timeout_s` for a stalled
        reader (the thread is a daemon: a process that exits then loses only those lines)."""
        self.flush()
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.stop()
            await asyncio.to_thread(writer.join, timeout_s)

    def _dropped(self, lines: int) -> None:
        self.dropped_lines += lines
        if self.on_drop is not None:
            self.on_drop(lines)
        now = time.monotonic()
        if now - self._last_warning >= _DROP_WARNING_INTERVAL_S:
            self._last_warning = now
            log.warning("access log: its reader is not keeping up (%d bytes wait for it); dropped %d line(s), %d so "
                        "far", self._max_pending_bytes, lines, self.dropped_lines)


def _encodable(record: AccessRecord) -> dict[str, object]:
    """The record's fields as orjson takes them: text that is not valid Unicode (lone surrogates, which JSON input
    such as a JWT's claims may hold) with that part escaped, integers beyond 64 bits as text."""
    out: dict[str, object] = {}
    for key, value in record.as_dict().items():
        if isinstance(value, str):
            value = unicode_safe(value)
        elif isinstance(value, int) and not -(1 << 63) <= value < (1 << 64):
            value = str(value)
        out[key] = value
    return out


class _Writer:
    """The thread that writes handed-over buffers to the stream, in order, in whole lines (see `whole_lines`)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._piece_bytes = _piece_bytes(stream)
        self._pending: deque[bytes] = deque()
        self._pending_bytes = 0  # handed over and not yet written
        self._changed = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="tfgate-access-log", daemon=True)
        self._thread.start()

    def offer(self, data: bytes, max_pending_bytes: int) -> bool:
        with self._changed:
            if self._pending_bytes + len(data) > max_pending_bytes:
                return False
            self._pending.append(data)
            self._pending_bytes += len(data)
            self._changed.notify_all()
        return True

    def wait_written(self) -> None:
        with self._changed:
            self._changed.wait_for(lambda: not self._pending_bytes)

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    def _run(self) -> None:
        failing = False
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending or self._stopping)
                if not self._pending:
                    return
                data = self._pending[0]
            try:
                for chunk in whole_lines(data, self._piece_bytes):
                    self._stream.write(chunk)
                    self._stream.flush()  # one write per chunk: a buffered stream would merge them again
                failing = False
            except (OSError, ValueError) as error:  # reader gone (EPIPE), stream closed: those lines are lost
                if not failing:
                    log.warning("access log: cannot write to its stream (%s); its lines are lost until it can", error)
                failing = True
            with self._changed:
                self._pending.popleft()
                self._pending_bytes -= len(data)
                self._changed.notify_all()


def _piece_bytes(stream: BinaryIO) -> int:
    """The most one write may carry to `stream`: PIPE_BUF unless it is a regular file (see the module docstring)."""
    try:
        regular = stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (OSError, ValueError):  # io.UnsupportedOperation: no file descriptor, an in-memory stream
        regular = False
    return sys.maxsize if regular else select.PIPE_BUF


def whole_lines(buffer: bytes, limit: int) -> Iterator[bytes]:
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
        yield buffer[start:end]
        start = end
