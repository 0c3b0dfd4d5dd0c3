"""The lean pooled HTTP/1.1 client the gateway forwards with: keep-alive connections to one backend, each an
asyncio.Protocol on httptools' response parser (llhttp), one request in flight per connection.

Why not aiohttp's ClientSession: a forwarded request needs bytes out and bytes in, and on loopback with 32 requests in
flight its machinery cost ~200 µs of CPU per request where this client costs ~30 µs, mostly the write system call.

How it works: `request` encodes the request line, the caller's headers, a Content-Length and the body into one buffer
and writes it with one `transport.write` on an idle connection (the most recently used: LIFO, so a quiet pool keeps
few warm connections and lets the others expire), or on a new one. The parser's callbacks assemble the response and
resolve the future the request awaits; no task is created per request. Each connection has one lazy deadline timer,
re-armed only when a request's deadline is earlier than the one armed, so a busy connection does not arm and cancel
a timer per request. Idle connections are swept by one timer per pool after `idle_timeout_s`.

What it guarantees:
- The response comes back whole: its body by Content-Length, by chunks, or up to the end of the connection; interim
  1xx responses are skipped; its headers have lower-case names, without the hop-by-hop fields (Connection,
  Keep-Alive, Transfer-Encoding, TE, Trailer, Upgrade, Proxy-*, and the fields Connection names), without
  Content-Length (the body is whole, so its length is len(body)) and without chunked trailers.
- A connection is reused only after a complete response that allows it (HTTP/1.1 without Connection: close, and
  not an answer to HEAD: httptools cannot tell llhttp that a HEAD response has no body). Bytes arriving while no
  request is in flight close the connection, so a stray answer can never be taken for the next request's.
- Every failure is an `UpstreamError`; `retryable` is True only when no byte of the response was read. A request
  on a reused connection that dies before any response byte (the server closed it while it was idle, racing our
  write) is sent once more on a new connection, transparently: that is the keep-alive race, not a backend failure.
  Whether the caller may retry anything else (idempotency) is the caller's concern.
- `timeout_s` bounds the whole exchange, connecting included; connecting alone is bounded by `connect_timeout_s`.
  A request whose caller is cancelled closes its connection.
- `close()` closes every connection and returns once all their sockets are closed; this module creates no task.
  Requests still in flight fail, and later ones raise UpstreamError. A connect still in progress when the pool
  closes is closed by the request that made it, as soon as it completes (the gateway closes pools after its
  requests are done or cancelled, so there is none).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import httptools

Kind = Literal["connect", "reset", "timeout", "protocol"]

# Response fields that describe this hop or the framing we undid, never passed on (RFC 9110 7.6.1).
_NOT_FORWARDED = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
                            b"content-length"})
_ANTICIPATE_CONTENT = ("POST", "PUT", "PATCH")  # methods that get a Content-Length even for an empty body


class UpstreamError(Exception):
    """The request failed before a complete response; `retryable` says whether no byte of a response was read
    (connect refused/reset/timeout on connect, reset or EOF before the response's status line) so it is safe to
    retry."""

    def __init__(self, kind: Kind, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.kind: Kind = kind
        self.retryable = retryable


@dataclass(slots=True, init=False)  # made per response (see backend/inference.py's ModelCall)
class UpstreamResponse:
    status: int
    headers: list[tuple[bytes, bytes]]  # lower-case names, in order; hop-by-hop fields and Content-Length removed
    body: bytes

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body


class _StopParsing(Exception):
    """Raised in a parser callback when the rest of the input must not be parsed."""


class HttpPool:
    """Keep-alive connections to one backend ("host:port"), reused LIFO, at most `max_idle` kept idle."""

    def __init__(self, host: str, port: int, *, connect_timeout_s: float = 1.0, max_idle: int = 64,
                 idle_timeout_s: float = 30) -> None:
        self.host = host
        self.port = port
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._connect_timeout_s = connect_timeout_s
        self._max_idle = max_idle
        self._idle_timeout_s = idle_timeout_s
        self._idle: list[_Connection] = []  # oldest first: taken from the end, expired from the start
        self._open: set[_Connection] = set()  # connected and not yet lost, idle or busy
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self._all_gone: asyncio.Future[None] | None = None  # made by close()

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def open(self) -> int:
        return len(self._open)

    async def request(self, method: str, path: str, headers: Sequence[tuple[str, str]], body: bytes,
                      timeout_s: float) -> UpstreamResponse:
        """Send one request and read its whole response. `path` is the request target as it goes on the wire
        (percent-encoded, with its query); `headers` go as given, so they must not hold Content-Length,
        Transfer-Encoding or Connection. Raises UpstreamError."""
        payload = _encode(method, path, headers, body)
        head = method == "HEAD"
        connection = self._take_idle()
        reused = connection is not None
        # An idle connection knows the loop: asking asyncio costs a getpid() system call (its fork check).
        loop = connection.loop if connection is not None else asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if connection is None:
                connection = await self._connect(loop, deadline)
            waiter = connection.send(payload, deadline, head)
            try:
                return await waiter
            except UpstreamError as error:
                if not (reused and error.kind == "reset" and error.retryable) or self._closed:
                    raise
            except asyncio.CancelledError:
                connection.abandon(waiter)
                raise
            connection, reused = None, False  # the keep-alive race: once more, on a new connection

    async def close(self) -> None:
        """Close idle and busy connections, and return once their sockets are closed."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._idle.clear()
        if self._open and self._all_gone is None:
            self._all_gone = asyncio.get_running_loop().create_future()
            for connection in list(self._open):
                connection.abort()
        if self._all_gone is not None:
            await self._all_gone

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        if self._closed:
            raise UpstreamError("connect", f"{self.address}: the connection pool is closed", retryable=True)
        connect_by = min(loop.time() + self._connect_timeout_s, deadline)
        timeout = asyncio.timeout_at(connect_by)
        try:
            async with timeout:
                _, connection = await loop.create_connection(lambda: _Connection(self, loop), self.host, self.port)
        except OSError as error:  # TimeoutError included
            if timeout.expired():
                if connect_by == deadline:
                    raise UpstreamError("timeout", f"{self.address}: no connection before the request's deadline",
                                        retryable=True) from None
                raise UpstreamError("connect", f"{self.address}: no connection within {self._connect_timeout_s} s",
                                    retryable=True) from None
            reason = os.strerror(error.errno) if error.errno else str(error)  # asyncio's own text names no cause
            raise UpstreamError("connect", f"{self.address}: cannot connect: {reason}", retryable=True) from error
        if self._closed:  # closed while connecting: connection_made aborted it
            raise UpstreamError("connect", f"{self.address}: the connection pool is closed", retryable=True)
        if connection.transport.is_closing():  # the server hung up before we could send
            raise UpstreamError("reset", f"{self.address}: connection lost before the request", retryable=True)
        return connection

    def _take_idle(self) -> _Connection | None:
        idle = self._idle
        while idle:
            connection = idle.pop()
            if not connection.transport.is_closing():  # lost, but its connection_lost is still to come
                return connection
        return None

    # -- called by the connections ----------------------------------------------------------------------------

    def _adopt(self, connection: _Connection) -> bool:
        if self._closed:
            return False
        self._open.add(connection)
        return True

    def _release(self, connection: _Connection, now: float) -> None:
        """A connection is free again after a complete response."""
        if self._closed or len(self._idle) >= self._max_idle:
            connection.transport.close()
            return
        connection.idle_since = now
        self._idle.append(connection)
        if self._sweeper is None:
            self._sweeper = connection.loop.call_at(now + self._idle_timeout_s, self._sweep, connection.loop)

    def _forget(self, connection: _Connection) -> None:
        self._open.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)
        if not self._open and self._all_gone is not None and not self._all_gone.done():
            self._all_gone.set_result(None)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close the connections idle for longer than `idle_timeout_s`; they are at the start of the list."""
        self._sweeper = None
        idle = self._idle
        expired_before = loop.time() - self._idle_timeout_s
        count = 0
        while count < len(idle) and idle[count].idle_since <= expired_before:
            idle[count].transport.close()
            count += 1
        del idle[:count]
        if idle:
            self._sweeper = loop.call_at(idle[0].idle_since + self._idle_timeout_s, self._sweep, loop)


def _encode(method: str, path: str, headers: Sequence[tuple[str, str]], body: bytes) -> bytes:
    """Request line, headers, Content-Length and body in one buffer, for one write."""
    if " " in path or "\r" in path or "\n" in path:  # would end the request line early: request smuggling
        raise ValueError(f"not a request target: {path!r}")
    fields = "".join([f"{name}: {value}\r\n" for name, value in headers])
    length = f"Content-Length: {len(body)}\r\n" if body or method in _ANTICIPATE_CONTENT else ""
    return f"{method} {path} HTTP/1.1\r\n{fields}{length}\r\n".encode("latin-1") + body


class _Connection(asyncio.Protocol):
    """One keep-alive connection: a request is sent by `send`, its response resolves the future `send` returned.
    Invariant: `_waiter` is the pending future of the request in flight, None once it is resolved."""

    __slots__ = ("_body", "_deadline", "_framed", "_got_bytes", "_head", "_headers", "_headers_done", "_keep_alive",
                 "_named", "_offers_keep_alive", "_parser", "_pool", "_timer", "_waiter", "idle_since", "loop",
                 "transport")

    def __init__(self, pool: HttpPool, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self.loop = loop
        self.transport: asyncio.Transport  # set by connection_made
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[UpstreamResponse] | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        # The response being read.
        self._head = False  # an answer to HEAD: complete with its head
        self._got_bytes = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._headers_done = False
        self._framed = False  # by Content-Length or chunks; otherwise the body ends with the connection
        self._named: set[bytes] | None = None  # extra hop-by-hop fields named by Connection
        self._offers_keep_alive = False  # Connection names keep-alive (see on_message_complete)
        self._keep_alive = False
        self.idle_since = 0.0  # for the pool's sweeper

    def send(self, payload: bytes, deadline: float, head: bool) -> asyncio.Future[UpstreamResponse]:
        self._waiter = waiter = self.loop.create_future()
        self._head = head
        self._got_bytes = self._headers_done = self._framed = False
        self._headers = []
        self._body = []
        self._named = None
        self._offers_keep_alive = False
        self._deadline = deadline
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(deadline, self._check_deadline)
        self.transport.write(payload)
        return waiter

    def abandon(self, waiter: asyncio.Future[UpstreamResponse]) -> None:
        """The caller is gone: a response still to come would be taken for the next request's, so close."""
        if self._waiter is waiter:
            self._waiter = None
            self.transport.abort()

    def abort(self) -> None:
        self.transport.abort()

    # -- asyncio.Protocol -------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self._pool._adopt(self):
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pool._forget(self)
        waiter = self._waiter
        if waiter is None:
            return
        self._waiter = None
        if self._headers_done and not self._framed and exc is None and not self._pool._closed:
            # the server's end of the connection ends this body
            waiter.set_result(UpstreamResponse(self._parser.get_status_code(), self._headers, b"".join(self._body)))
            return
        why = f": {exc}" if exc is not None else ""
        if self._got_bytes:
            waiter.set_exception(UpstreamError("reset", f"{self._pool.address}: connection lost in the middle of "
                                               f"the response{why}", retryable=False))
        else:
            waiter.set_exception(UpstreamError("reset", f"{self._pool.address}: connection lost before the "
                                               f"response{why}", retryable=True))

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # nothing was asked: whatever this is, it must not be taken for the next answer
            self.transport.abort()
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as error:
            if self._waiter is not None:  # otherwise the response is complete and this came after it
                self._fail(UpstreamError("protocol", f"{self._pool.address}: malformed response: {error}",
                                         retryable=False))
            self.transport.abort()
            return
        if self._waiter is None:  # the response is complete
            if self._keep_alive:
                self._pool._release(self, self.loop.time())
            else:
                self.transport.close()

    # -- httptools callbacks ----------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._waiter is None:  # a second response to one request
            raise _StopParsing

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headers_done:
            return  # a chunked trailer
        name = name.lower()
        if name in _NOT_FORWARDED:
            if name == b"content-length":
                self._framed = True
            elif name == b"transfer-encoding":
                self._framed = value.lower().find(b"chunked") >= 0  # not `in`: see backend/http_server.py's _request
            elif name == b"connection":
                tokens = {token.strip() for token in value.lower().split(b",")}
                self._offers_keep_alive = self._offers_keep_alive or b"keep-alive" in tokens
                named = tokens - {b"close", b"keep-alive", b""}
                if named:
                    self._named = named if self._named is None else self._named | named
        elif not name.startswith(b"proxy-"):
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._headers_done = True
        if self._named is not None:
            named = self._named
            self._headers = [field for field in self._headers if field[0] not in named]
        if self._head and self._parser.get_status_code() >= 200:
            self._complete(keep_alive=False)
            raise _StopParsing  # llhttp would wait for the Content-Length the head announces

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        if parser.get_status_code() < 200:  # an interim response (100 Continue, 103 Early Hints): the final follows
            self._headers = []
            self._headers_done = self._framed = self._offers_keep_alive = False
            self._named = None
            return
        # An HTTP/1.0 answer is not kept alive. llhttp keeps one alive only when its Connection names keep-alive,
        # so only then is the version asked (httptools formats it as text at each call: ~2.3k instructions).
        self._complete(parser.should_keep_alive()
                       and not (self._offers_keep_alive and parser.get_http_version() == "1.0"))

    # -- helpers ------------------------------------------------------------------------------------------------

    def _complete(self, keep_alive: bool) -> None:
        waiter = self._waiter
        assert waiter is not None
        self._waiter = None
        self._keep_alive = keep_alive
        waiter.set_result(UpstreamResponse(self._parser.get_status_code(), self._headers, b"".join(self._body)))

    def _fail(self, error: UpstreamError) -> None:
        waiter = self._waiter
        assert waiter is not None
        self._waiter = None
        waiter.set_exception(error)

    def _check_deadline(self) -> None:
        self._timer = None
        if self._waiter is None:
            return
        if self.loop.time() < self._deadline:  # a later request's deadline
            self._timer = self.loop.call_at(self._deadline, self._check_deadline)
            return
        self._fail(UpstreamError("timeout", f"{self._pool.address}: no complete response in time", retryable=False))
        self.transport.abort()
