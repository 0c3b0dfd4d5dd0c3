"""A lean HTTP/1.1 server for the REST API: an asyncio protocol on httptools (llhttp, the C parser uvicorn uses) that
hands each complete request to one async handler and writes each response with one `transport.write`.

Why not aiohttp: under many small predicts its request/response machinery cost ~500 µs of event-loop Python per
request, and the REST layer needs nothing of it but one catch-all handler.

How it works: the connection reads into one buffer its server owns (asyncio's BufferedProtocol): the parser copies
out what it keeps before the next read reuses it. Over TLS that matters: a plain Protocol makes uvloop allocate
256 KiB per read for the decrypted bytes, which glibc serves with mmap, a page fault, mremap and munmap unless
earlier large frees happened to raise its mmap threshold (measured: ~20% of a small proxy's CPU). The parser's
callbacks assemble a request (body by Content-Length or chunks) and queue it on its connection. One worker task
per connection, made by its first request, answers the queue in order (pipelining); reading is paused until the
queue is empty, so a client can never have more than one read's worth of requests in memory, and after each
response the worker waits until the transport's write buffer drains below its high-water mark. Then it waits for
the connection's next request, and ends with the connection (a Task per request cost ~5k instructions more per
proxied request in the gateway, measured with callgrind).

What it guarantees:
- A body over `max_body_bytes` gets 413 (before any 100 Continue, or as soon as the chunks pass the limit), a
  malformed request 400, a head still incomplete after 64 KiB or with over 100 header fields 431: each in its turn
  after the answers already owed, and then the connection closes. It closes lingering: what the client still sends
  is read and dropped until it closes, for up to `header_timeout_s`, so a client busy sending its body reads the
  refusal instead of a reset. Over plain TCP the server half-closes at once (the client reads an EOF after the
  answer); TLS cannot half-close, so there the linger ends with the client's close or the deadline.
- With a `screen` (a proxy's credential check), a request that announces a body over 64 KiB, or of unknown length
  (chunked), or that awaits a 100 Continue is first shown to it without its body: when it answers, that answer is
  sent instead and the connection closes without the body being read, lingering as after a 413. So a client that
  may not call cannot make the server receive, and hold, an upload up to `max_body_bytes` first. Smaller bodies
  are read as usual: the handler checks them in full anyway.
- A handler's exception is logged with its stack and answered with a bare 500; the connection stays usable.
- A request head must be complete within `header_timeout_s` of its first byte (or of the connection), and its body
  must not pause for longer than that; an idle keep-alive connection is closed after `keepalive_timeout_s`. These
  are deadlines checked by one lazy timer per connection, so a busy connection arms no timer per request.
- An Upgrade offer (h2c, sent by curl --http2 and Java clients) is declined as RFC 9110 allows: the request is
  replayed without it to a fresh parser, which then reads the body that llhttp skips on an upgrade.
- `shutdown()` stops accepting, closes idle connections, lets the responses being made finish and flush within the
  grace, then cancels the handlers still running and aborts what is left: no task or connection outlives it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol
from urllib.parse import unquote_to_bytes

import httptools
import orjson

log = logging.getLogger(__name__)


@dataclass(slots=True, init=False)
class HttpRequest:
    method: str  # "GET", "POST", ...
    path: str  # URL path, percent-decoded, no query string
    query: str  # raw query string ("" if none)
    headers: Mapping[str, str]  # lower-case names; repeated fields joined with ", "
    body: bytes
    peer: str  # "host:port"
    peer_certificate: bytes | None  # the client's TLS certificate (DER), when it sent one the server verified

    def __init__(self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes, peer: str,
                 peer_certificate: bytes | None = None) -> None:
        self.method, self.path, self.query, self.headers = method, path, query, headers
        self.body, self.peer, self.peer_certificate = body, peer, peer_certificate


@dataclass(slots=True, init=False)
class HttpResponse:
    status: int
    body: bytes
    content_type: str
    headers: Sequence[tuple[str, str]]  # besides Content-Type, Content-Length and Connection, which are ours
    # Work that can wait until the response is handed to the transport (access log, metrics): called right after
    # that, or when the client has already gone, so it stays off the client's critical path. An exception in it
    # is logged; the connection goes on.
    after_sent: Callable[[], None] | None

    def __init__(self, status: int, body: bytes = b"", content_type: str = "application/json",
                 headers: Sequence[tuple[str, str]] = (), after_sent: Callable[[], None] | None = None) -> None:
        self.status, self.body, self.content_type, self.headers = status, body, content_type, headers
        self.after_sent = after_sent


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]
# Shown a request's head (an HttpRequest whose body is b"") before its body is read: an answer refuses it; None lets
# it in. It runs in the parser's callback, so it must not block.
Screen = Callable[[HttpRequest], HttpResponse | None]
ErrorBody = Callable[[int, str], bytes]


def json_error_body(status: int, message: str) -> bytes:
    """TF Serving's error document. A message may quote what is not valid Unicode (a lone surrogate, from a file name
    read with surrogateescape, say), which orjson refuses: that part is escaped rather than failing the answer."""
    try:
        return orjson.dumps({"error": message})
    except TypeError:
        return orjson.dumps({"error": unicode_safe(message)})


def unicode_safe(text: str) -> str:
    """`text` with what UTF-8 cannot encode (lone surrogates) written as backslash escapes, so JSON can carry it."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


_STATUS_LINES = {status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n" for status in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CLOSE = "Connection: close\r\n"
_KEEP_ALIVE = "Connection: keep-alive\r\n"  # HTTP/1.0 closes without it
_INTERNAL_ERROR = "Internal error while serving the request; see the server log"
_MAX_HEADER_FIELDS = 100  # distinct names; as nginx's and Go's servers, a bound on per-request header work
_MAX_HEAD_BYTES = 64 * 1024  # llhttp does not bound the request line and headers; checked after each read
_SCREENED_BODY_BYTES = 64 * 1024  # a body announced larger than this is screened before it is read
_READ_BUFFER_BYTES = 256 * 1024  # as uvloop's own read buffer: a big body takes few reads
# What a connection waits for from its client, which decides the deadline that applies.
_HEAD, _BODY, _NEXT, _LINGER = "head", "body", "next request", "linger"
_SEND = "client reading the response"  # while the transport holds more unsent bytes than its high-water mark


class _StopParsing(Exception):
    """Raised in a parser callback after a refusal, to abandon the rest of the input."""


@dataclass(slots=True, init=False)
class _Turn:
    """One request's place in its connection's answer order."""

    request: HttpRequest | None  # the request, or its head when `refusal` answers a screened one
    refusal: HttpResponse | None  # answered instead of calling the handler; then the connection closes
    keep_alive: bool
    http_1_0: bool

    def __init__(self, request: HttpRequest | None, refusal: HttpResponse | None = None, keep_alive: bool = False,
                 http_1_0: bool = False) -> None:
        self.request, self.refusal, self.keep_alive, self.http_1_0 = request, refusal, keep_alive, http_1_0


def _call_after_sent(response: HttpResponse, turn: _Turn) -> None:
    assert response.after_sent is not None and turn.request is not None
    try:
        response.after_sent()
    except Exception:  # as for a handler's: logged in full, the connection goes on
        log.exception("unexpected error after answering %s %s from %s", turn.request.method, turn.request.path,
                      turn.request.peer)


class _Listener(Protocol):
    """What the server keeps of the asyncio.Server that listens for it. Typed here, not as asyncio.Server, because
    compiled (setup.py) code checks declared types: uvloop's server lists its sockets where asyncio's has a tuple."""

    @property
    def sockets(self) -> Sequence[socket.socket]: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


class HttpServer:
    """Serves `handler` on one listening socket; see the module docstring for the guarantees."""

    def __init__(self, handler: Handler, *, max_body_bytes: int, header_timeout_s: float = 10.0,
                 keepalive_timeout_s: float = 75.0, error_body: ErrorBody = json_error_body,
                 screen: Screen | None = None) -> None:
        self.handler = handler
        self.error_body = error_body
        self.screen = screen
        self.set_limits(max_body_bytes=max_body_bytes, header_timeout_s=header_timeout_s,
                        keepalive_timeout_s=keepalive_timeout_s)
        self.stopping = False
        self._listener: _Listener | None = None
        self._port = 0
        self._connections: set[_Connection] = set()  # open, or still running a handler
        self._all_gone: asyncio.Future[None] | None = None  # made by shutdown()
        # Every connection reads into this: each read is parsed before the next one, on the one event loop.
        self.read_buffer = memoryview(bytearray(_READ_BUFFER_BYTES))

    def set_limits(self, *, max_body_bytes: int, header_timeout_s: float, keepalive_timeout_s: float) -> None:
        """New limits for requests from now on (a config reload); connections keep the deadline already armed."""
        self.max_body_bytes = max_body_bytes
        # A client must read some of its response within the keep-alive timeout, as nginx's send_timeout: one that
        # never reads held its connection and the unsent response for good.
        self.deadlines = {_HEAD: header_timeout_s, _BODY: header_timeout_s, _NEXT: keepalive_timeout_s,
                          _LINGER: header_timeout_s, _SEND: keepalive_timeout_s}

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None,
                    reuse_port: bool = False) -> None:
        """Listen on host:port (0: a free port); with `ssl_context`, TLS, whose handshake must finish within the
        header timeout, so a client that stalls it cannot hold a connection, and whose closing handshake too (the
        default, 30 s, let a silent client keep each timed-out connection that long). `reuse_port`: share the port
        with other processes listening on it the same way (SO_REUSEPORT; the kernel spreads connections over them)."""
        loop = asyncio.get_running_loop()
        tls_timeout = self.deadlines[_HEAD] if ssl_context is not None else None
        listener: _Listener = await loop.create_server(
            lambda: _Connection(self, loop), host, port, reuse_address=True, reuse_port=reuse_port or None,
            ssl=ssl_context, ssl_handshake_timeout=tls_timeout, ssl_shutdown_timeout=tls_timeout)
        self._listener = listener
        self._port = listener.sockets[0].getsockname()[1]

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._listener.sockets) if self._listener is not None else ()

    @property
    def port(self) -> int:
        """The bound port (the one the system chose for port 0), still known after shutdown."""
        return self._port

    async def shutdown(self, grace_s: float) -> None:
        """Stop accepting; close idle connections; let responses being made finish and flush within `grace_s`;
        then cancel the handlers still running and abort the connections left."""
        if self._listener is None or self.stopping:
            return
        self.stopping = True
        self._listener.close()
        self._all_gone = asyncio.get_running_loop().create_future()
        for connection in list(self._connections):
            connection.shut_down()
        self._check_all_gone()
        await asyncio.wait([self._all_gone], timeout=grace_s)
        for connection in list(self._connections):
            connection.abort()
        await self._all_gone
        await self._listener.wait_closed()

    def track(self, connection: _Connection) -> None:
        self._connections.add(connection)

    def forget(self, connection: _Connection) -> None:
        self._connections.discard(connection)
        self._check_all_gone()

    def _check_all_gone(self) -> None:
        if not self._connections and self._all_gone is not None and not self._all_gone.done():
            self._all_gone.set_result(None)


class _Connection(asyncio.BufferedProtocol):
    """One client connection: parser callbacks in, and one worker task for the connection's life that answers
    whatever is queued, then waits to be woken for the next request. Not a task per request: a Task costs more to
    make and finish (its context copy, its registration in asyncio's WeakSet of tasks, in Python on 3.11, the step it
    is scheduled for) than waking one that waits."""

    def __init__(self, server: HttpServer, loop: asyncio.AbstractEventLoop) -> None:
        self._server = server
        self._loop = loop
        self._transport: asyncio.Transport  # set by connection_made
        self._parser = httptools.HttpRequestParser(self)
        self._peer = ""
        self._peer_certificate: bytes | None = None
        # The request being received.
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._head_bytes = 0
        self._trailer_bytes = 0
        self._waiting = _HEAD
        self._continue_due = False  # owe the client a 100 Continue as soon as it is its turn
        # Answering.
        self._turns: deque[_Turn] = deque()
        self._worker: asyncio.Task[None] | None = None  # made by the first request, ended with the connection
        self._answering = False  # the worker is answering: reading is paused and a handler's time is not limited
        self._wake: asyncio.Future[None] | None = None  # what the idle worker waits for
        self._done_reading = False  # after a refusal or a last request: further input is dropped
        self._closing = False  # shutdown: close after the response being made
        self._lost = False
        self._drained: asyncio.Future[None] | None = None  # while the transport asks us to stop writing
        # The one deadline that applies now (see _watch) and the timer that checks it.
        self._deadline_for: str | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._unsent = 0  # bytes the transport held when the send deadline was armed: less later is progress

    # -- asyncio.BufferedProtocol ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        host, port = (transport.get_extra_info("peername") or ("?", 0))[:2]  # None if the client already left
        self._peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        tls = transport.get_extra_info("ssl_object")  # the handshake is over by now: asyncio calls this after it
        self._peer_certificate = tls.getpeercert(binary_form=True) if tls is not None else None
        self._server.track(self)
        if self._server.stopping:  # accepted just as shutdown began
            transport.close()
            return
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = self._done_reading = True
        self._deadline_for = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._release_writer()
        self._wake_worker()  # an idle worker ends
        if not self._answering:  # otherwise the worker, still running its handler, forgets us when it ends
            self._server.forget(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._server.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        data: memoryview | bytes = self._server.read_buffer[:nbytes]
        while data and not self._done_reading:
            data = self._parse(data)
        self._after_input()

    def pause_writing(self) -> None:
        self._drained = self._loop.create_future()
        self._watch()

    def resume_writing(self) -> None:
        self._release_writer()
        self._watch()

    # -- httptools callbacks ----------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._waiting = _HEAD
        self._head_bytes = 0
        self._url = b""
        self._headers = {}
        self._body_bytes = 0
        self._trailer_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._waiting == _BODY:  # a chunked body's trailer section, which the head's byte limit does not cover
            self._trailer_bytes += len(name) + len(value)
            if self._trailer_bytes > _MAX_HEAD_BYTES:
                self._refuse(431, f"Request trailer fields are larger than the limit of {_MAX_HEAD_BYTES} bytes")
                raise _StopParsing
            return  # dropped, not merged into the headers (RFC 9110 6.5.1): a credential there must not count
        if len(self._headers) >= _MAX_HEADER_FIELDS:
            self._refuse(431, f"Too many request header fields (the limit is {_MAX_HEADER_FIELDS})")
            raise _StopParsing
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        self._headers[key] = f"{self._headers[key]}, {text}" if key in self._headers else text

    def on_headers_complete(self) -> None:
        self._waiting = _BODY
        parser = self._parser
        if parser.should_upgrade():
            return  # declined once llhttp stops at the end of this head; the replayed head is checked instead
        declared = self._headers.get("content-length")
        if declared is not None and int(declared) > self._server.max_body_bytes:
            self._refuse_too_large()
        # An HTTP/1.0 client knows no 100 Continue. The version is asked only when it matters: httptools formats it
        # as text with str.format at each call (~2.3k instructions, measured with callgrind).
        awaits_continue = (self._headers.get("expect", "").lower() == "100-continue"
                           and parser.get_http_version() != "1.0")
        if self._server.screen is not None and (awaits_continue or self._announces_large_body(declared)):
            self._screen()
        if awaits_continue:
            self._continue_due = True  # sent once this chunk is parsed, unless the body came with it

    def on_body(self, body: bytes) -> None:
        self._continue_due = False  # the client did not wait for it, which is allowed
        self._body_bytes += len(body)
        if self._body_bytes > self._server.max_body_bytes:
            self._refuse_too_large()
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        self._waiting = _NEXT
        self._continue_due = False
        if parser.should_upgrade():
            return  # see _declined_upgrade: the replay completes this request with its body
        request = self._request(b"".join(self._body))
        self._body.clear()
        keep_alive = parser.should_keep_alive()
        self._turns.append(_Turn(request, None, keep_alive, keep_alive and self._is_http_1_0()))
        if not keep_alive:
            self._done_reading = True
        self._start_worker()

    def _is_http_1_0(self) -> bool:
        """For a request llhttp keeps alive: whether it is HTTP/1.0, whose answer must then say keep-alive. llhttp
        keeps a request older than HTTP/1.1 alive only when its Connection header has the keep-alive token, so
        without that word in the header the request is HTTP/1.1 or later, and the version, costly to ask (see
        on_headers_complete), is not asked."""
        return "keep-alive" in self._headers.get("connection", "").lower() and self._parser.get_http_version() == "1.0"

    def _request(self, body: bytes) -> HttpRequest:
        """The request just parsed, with `body`; refused with 400 (and _StopParsing raised) for a malformed URL."""
        try:
            url = httptools.parse_url(self._url)
        except httptools.HttpParserInvalidURLError:
            self._refuse(400, "Malformed HTTP request: invalid URL")
            raise _StopParsing from None
        path = url.path or b"/"  # absolute-form without a path: "http://host"
        # find, not `in`: bytes.__contains__ first tries its operand as an integer, and a bytes operand costs it a
        # TypeError raised and cleared (~1.5k instructions, per request here).
        if path.find(b"%") >= 0:
            path = unquote_to_bytes(path)
        return HttpRequest(method=self._parser.get_method().decode("ascii"), path=path.decode("utf-8", "replace"),
                           query=url.query.decode("latin-1") if url.query else "", headers=self._headers, body=body,
                           peer=self._peer, peer_certificate=self._peer_certificate)

    def _announces_large_body(self, declared: str | None) -> bool:
        """Over _SCREENED_BODY_BYTES by its Content-Length (`declared`), or of a length unknown yet (chunked)."""
        return int(declared) > _SCREENED_BODY_BYTES if declared is not None else "transfer-encoding" in self._headers

    def _screen(self) -> None:
        """Show the head to the server's screen; when it answers, send that in turn and read no more."""
        assert self._server.screen is not None
        head = self._request(b"")
        try:
            refusal = self._server.screen(head)
        except Exception:  # a bug in the screen: logged, and the handler, which checks everything again, decides
            log.exception("unexpected error screening %s %s from %s", head.method, head.path, head.peer)
            return
        if refusal is not None:
            self._refuse_with(refusal, head)
            raise _StopParsing

    def _parse(self, data: memoryview | bytes) -> bytes:
        """Feed one chunk to the parser; returns what is left to feed (only after a declined upgrade)."""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            return self._declined_upgrade(data[int(upgrade.args[0]):])
        except httptools.HttpParserError as error:
            if not self._done_reading:  # not a stop we raised ourselves after refusing
                log.debug("malformed request from %s: %s", self._peer, error)
                self._refuse(400, f"Malformed HTTP request: {error}")
            return b""
        if self._waiting == _HEAD and not self._done_reading:
            self._head_bytes += len(data)
            if self._head_bytes > _MAX_HEAD_BYTES:
                self._refuse(431, f"Request header fields are larger than the limit of {_MAX_HEAD_BYTES} bytes")
        return b""

    # -- answering ----------------------------------------------------------------------------------------------

    def _start_worker(self) -> None:
        if self._answering:
            return
        self._answering = True
        self._transport.pause_reading()
        if self._worker is None:
            self._worker = self._loop.create_task(self._answer_turns())
        else:
            self._wake_worker()

    def _wake_worker(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None:
            wake.set_result(None)

    async def _answer_turns(self) -> None:
        """Answer the queued requests in order, then read again (reading stays paused meanwhile) and wait to be woken
        by the next request; return once no more can come."""
        transport = self._transport
        try:
            while True:
                ended = False  # the connection ends with this turn: nothing more is read or answered on it
                while self._turns and not self._lost:
                    turn = self._turns.popleft()
                    if turn.refusal is not None:
                        transport.write(self._encode(turn.refusal, turn))
                        if turn.refusal.after_sent is not None:
                            _call_after_sent(turn.refusal, turn)
                        # Lingering close: keep reading (and dropping) until the client closes or the linger deadline
                        # passes. TLS has no half-close, so there the client learns the end from Connection: close.
                        if transport.can_write_eof():
                            transport.write_eof()
                        ended = True
                        break
                    request = turn.request
                    assert request is not None
                    try:  # the handler awaited here, not in a helper coroutine: one coroutine less per request
                        response = await self._server.handler(request)
                    except Exception:  # the one place an unexpected error stops: logged in full, never sent
                        log.exception("unexpected error answering %s %s from %s", request.method, request.path,
                                      request.peer)
                        response = HttpResponse(500, self._server.error_body(500, _INTERNAL_ERROR))
                    if not self._lost:
                        transport.write(self._encode(response, turn))
                    if response.after_sent is not None:
                        _call_after_sent(response, turn)
                    if self._lost:
                        break
                    if not turn.keep_alive or self._closing:
                        transport.close()
                        ended = True
                        break
                    if self._drained is not None:
                        await self._drained
                self._answering = False
                if not transport.is_closing():
                    transport.resume_reading()
                    self._after_input()
                if self._answering:
                    continue  # resume_reading handed over a request already received: answer it
                if ended or self._lost or self._done_reading or transport.is_closing():
                    return
                self._wake = self._loop.create_future()
                await self._wake
        finally:
            self._worker = None
            self._answering = False
            self._wake = None
            if self._lost:
                self._server.forget(self)

    def _encode(self, response: HttpResponse, turn: _Turn) -> bytes:
        """Status line, headers and body in one buffer, for one write."""
        if not turn.keep_alive or self._closing:
            connection = _CLOSE
        else:
            connection = _KEEP_ALIVE if turn.http_1_0 else ""
        extra = "".join(f"{name}: {value}\r\n" for name, value in response.headers) if response.headers else ""
        status = _STATUS_LINES.get(response.status) or f"HTTP/1.1 {response.status} \r\n"
        head = (f"{status}Content-Type: {response.content_type}\r\nContent-Length: {len(response.body)}\r\n"
                f"{extra}{connection}\r\n").encode("latin-1")
        return head if turn.request is not None and turn.request.method == "HEAD" else head + response.body

    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` in turn, then close: nothing after this request is read."""
        self._refuse_with(HttpResponse(status, self._server.error_body(status, message)))

    def _refuse_with(self, refusal: HttpResponse, head: HttpRequest | None = None) -> None:
        self._done_reading = True
        self._continue_due = False
        self._turns.append(_Turn(head, refusal))
        self._start_worker()

    def _refuse_too_large(self) -> None:
        self._refuse(413, f"Request body is larger than the limit of {self._server.max_body_bytes} bytes")
        raise _StopParsing

    def _declined_upgrade(self, rest: memoryview | bytes) -> bytes:
        """The head just parsed, without its Upgrade offer, followed by `rest`, for a fresh parser to read as plain
        HTTP/1.1 (llhttp has no way to decline an upgrade and go on)."""
        parser = self._parser
        method = parser.get_method().decode("ascii")
        if method == "CONNECT":  # always an upgrade for llhttp; a tunnel is not ours to open
            self._refuse(400, "Malformed HTTP request: CONNECT is not supported")
            return b""
        lines = [f"{method} {self._url.decode('latin-1')} HTTP/{parser.get_http_version()}"]
        for name, value in self._headers.items():
            if name == "connection":
                value = ", ".join(token for token in value.split(",") if token.strip().lower() != "upgrade")
            if name != "upgrade" and value:
                lines.append(f"{name}: {value}")
        self._parser = httptools.HttpRequestParser(self)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + rest

    def _after_input(self) -> None:
        """Once a chunk is parsed or the queue is answered: send a due 100 Continue, and keep the right deadline."""
        if self._continue_due and not self._answering:
            self._continue_due = False
            self._transport.write(_CONTINUE)
        self._watch()

    def _release_writer(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    # -- deadlines and shutdown -------------------------------------------------------------------------------

    def _watch(self) -> None:
        """Keep the one deadline that applies now: for a head to complete, for more of a body, for a next request,
        for the end of lingering, or for the client to take some of a response the transport cannot send yet. A
        handler's own time is not limited here."""
        if self._lost:
            waiting_for = None
        elif self._drained is not None:
            waiting_for = _SEND
        elif self._answering:
            waiting_for = None
        else:
            waiting_for = _LINGER if self._done_reading else self._waiting
        if waiting_for == self._deadline_for and waiting_for != _BODY:
            return  # the same wait goes on, with the deadline it started with; a body's is renewed by each read
        self._deadline_for = waiting_for
        if waiting_for is None:
            return  # the timer, if armed, will find nothing to do
        if waiting_for == _SEND:
            self._unsent = self._transport.get_write_buffer_size()
        self._deadline = self._loop.time() + self._server.deadlines[waiting_for]
        if self._timer is None or self._timer.when() > self._deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(self._deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        self._timer = None
        if self._deadline_for is None:
            return
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._check_deadline)
            return
        if self._deadline_for == _SEND and self._transport.get_write_buffer_size() < self._unsent:
            self._deadline_for = None  # the client reads, slowly: a new period starts
            self._watch()
            return
        log.debug("closing the connection from %s: no %s in time", self._peer, self._deadline_for)
        if self._deadline_for == _SEND:
            self._transport.abort()  # close() would wait for the unsent bytes the client does not take
        else:
            self._transport.close()

    def shut_down(self) -> None:
        """Close at once if idle; otherwise after the response being made."""
        self._closing = True
        if not self._answering and not self._lost:
            self._transport.close()

    def abort(self) -> None:
        """Past the grace: cancel the handler, drop what is unsent."""
        if self._answering and self._worker is not None:
            self._worker.cancel()
        if not self._lost:
            self._transport.abort()
