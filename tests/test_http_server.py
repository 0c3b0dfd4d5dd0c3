"""The backend's HTTP/1.1 server on real loopback sockets, driven by http.client, requests, curl and raw bytes.

Every scenario runs on asyncio's own loop and on uvloop (what the backend runs on), each in a fresh
asyncio.Runner; the clients are blocking and run in threads (to_thread). `serving` shuts the server down at the end
and fails the test if any task outlives that.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import shutil
import socket
import ssl
import subprocess
import time
import unittest
from asyncio import to_thread
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import requests
import uvloop

from backend.http_server import (
    Handler,
    HttpRequest,
    HttpResponse,
    HttpServer,
    json_error_body,
)
from gateway.certs import CertPaths

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
LIMIT = 1000  # max_body_bytes unless a test says otherwise


def on_each_loop(scenario: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[str], None]:
    """Turn an async scenario into a test run once per event loop."""
    @pytest.mark.parametrize("loop", sorted(LOOPS))
    def test(loop: str) -> None:
        with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
            runner.run(scenario())

    test.__doc__ = scenario.__doc__
    return test


async def echo(request: HttpRequest) -> HttpResponse:
    return HttpResponse(200, orjson.dumps({
        "method": request.method, "path": request.path, "query": request.query, "headers": dict(request.headers),
        "body": request.body.decode("latin-1"), "peer": request.peer}))


@asynccontextmanager
async def serving(handler: Handler = echo, *, grace_s: float = 5.0, max_body_bytes: int = LIMIT,
                  ssl_context: ssl.SSLContext | None = None, **options: Any) -> AsyncIterator[HttpServer]:
    server = HttpServer(handler, max_body_bytes=max_body_bytes, **options)
    await server.start("127.0.0.1", 0, ssl_context)
    try:
        yield server
    finally:
        await server.shutdown(grace_s)
    assert asyncio.all_tasks() == {asyncio.current_task()}, "a task outlived shutdown()"


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    reason: str
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


class Wire:
    """A raw client connection: bytes out, responses parsed one at a time (so pipelining and 1xx can be seen)."""

    def __init__(self, port: int, *, receive_buffer: int | None = None) -> None:
        self.sock = socket.socket()
        if receive_buffer:  # before connecting, so the kernel does not grow it: a slow reader
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        self._file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self, method: str = "GET") -> Reply:
        status_line = self._file.readline().decode("latin-1")
        version, status, reason = status_line.rstrip("\r\n").split(" ", 2)
        assert version == "HTTP/1.1", status_line
        headers = http.client.parse_headers(self._file)
        length = headers["Content-Length"]
        body = self._file.read(int(length)) if length is not None and method != "HEAD" else b""
        return Reply(int(status), reason, headers, body)

    def closed_by_server(self) -> bool:
        """True once the server closed (or half-closed) its side with nothing more to read."""
        try:
            return self._file.read() == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self._file.close()
        self.sock.close()


@asynccontextmanager
async def wire(port: int, **options: Any) -> AsyncIterator[Wire]:
    connection = await to_thread(Wire, port, **options)
    try:
        yield connection
    finally:
        connection.close()


def request_bytes(method: str, path: str, *headers: str, body: bytes = b"", version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: test", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# ---------------------------------------------------------------------------------------------------------------
# Requests and responses


@on_each_loop
async def test_the_handler_sees_a_decoded_path_the_raw_query_lower_case_headers_and_the_peer() -> None:
    async with serving() as server, wire(server.port) as client:
        await to_thread(client.send, request_bytes("POST", "/v1/models/a%20b:predict?x=1&y=%20", "X-Thing: A",
                                                   "x-thing: b", body=b"{}"))
        seen = (await to_thread(client.reply)).json()
        host, port = client.sock.getsockname()
    assert seen["method"] == "POST" and seen["path"] == "/v1/models/a b:predict" and seen["query"] == "x=1&y=%20"
    assert seen["headers"] == {"host": "test", "x-thing": "A, b", "content-length": "2"}
    assert seen["body"] == "{}" and seen["peer"] == f"{host}:{port}"


@on_each_loop
async def test_absolute_form_urls_are_reduced_to_path_and_query() -> None:
    async with serving() as server, wire(server.port) as client:
        await to_thread(client.send, request_bytes("GET", "http://h:1/p/q?x=1") + request_bytes("GET", "http://h?y"))
        first, second = (await to_thread(client.reply)).json(), (await to_thread(client.reply)).json()
    assert (first["path"], first["query"], second["path"], second["query"]) == ("/p/q", "x=1", "/", "y")


@on_each_loop
async def test_responses_carry_status_reason_type_length_and_the_handlers_headers() -> None:
    async def teapot(request: HttpRequest) -> HttpResponse:
        return HttpResponse(429, b"slow down", "text/plain", [("Retry-After", "1"), ("X-Why", "test")])

    async with serving(teapot) as server, wire(server.port) as client:
        await to_thread(client.send, request_bytes("GET", "/"))
        reply = await to_thread(client.reply)
    assert (reply.status, reply.reason, reply.body) == (429, "Too Many Requests", b"slow down")
    assert reply.headers["Content-Type"] == "text/plain" and reply.headers["Content-Length"] == "9"
    assert reply.headers["Retry-After"] == "1" and reply.headers["X-Why"] == "test"
    assert "Connection" not in reply.headers


@on_each_loop
async def test_head_requests_get_the_headers_only() -> None:
    async with serving() as server, wire(server.port) as client:
        await to_thread(client.send, request_bytes("HEAD", "/a") + request_bytes("GET", "/b"))
        head = await to_thread(client.reply, "HEAD")
        get = await to_thread(client.reply)
    assert head.status == 200 and int(head.headers["Content-Length"]) > 0 and head.body == b""
    assert get.json()["path"] == "/b"  # the next response starts right after the head


@on_each_loop
async def test_bodies_by_content_length_and_by_chunks() -> None:
    def post(port: int) -> list[str]:
        url = f"http://127.0.0.1:{port}/"
        by_length = requests.post(url, data=b"x" * 500, timeout=10)
        chunked = requests.post(url, data=iter([b"ab", b"", b"cd" * 100, b"e"]), timeout=10)
        assert chunked.json()["headers"]["transfer-encoding"] == "chunked"
        return [by_length.json()["body"], chunked.json()["body"]]

    async with serving() as server:
        assert await to_thread(post, server.port) == ["x" * 500, "ab" + "cd" * 100 + "e"]


@on_each_loop
async def test_a_handler_exception_is_a_logged_500_and_the_connection_stays_usable() -> None:
    async def fragile(request: HttpRequest) -> HttpResponse:
        if request.path == "/boom":
            raise RuntimeError("secret detail")
        return await echo(request)

    def get_twice(port: int) -> tuple[int, bytes, int]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request("GET", "/boom")
            failed = connection.getresponse()
            failed_body = failed.read()
            connection.request("GET", "/fine")
            return failed.status, failed_body, connection.getresponse().status
        finally:
            connection.close()

    async with serving(fragile) as server:
        with unittest.TestCase().assertLogs("backend.http_server", "ERROR") as logs:
            status, body, next_status = await to_thread(get_twice, server.port)
    assert (status, next_status) == (500, 200)
    assert body == json_error_body(500, "Internal error while serving the request; see the server log")
    assert logs.records[0].exc_info is not None and "GET /boom" in logs.records[0].getMessage()


@on_each_loop
async def test_after_sent_runs_once_the_answer_is_written_even_for_a_client_gone_and_may_fail_harmlessly() -> None:
    """The work a handler leaves for after the answer (access log, metrics) runs once the answer is on the wire; a
    failure in it is logged and the connection goes on; a client that left before its answer still gets it run."""
    ran: list[tuple[str, bool]] = []

    async def handler(request: HttpRequest) -> HttpResponse:
        if request.path == "/slow":
            await asyncio.sleep(0.2)  # the client is gone by now
        answered = asyncio.get_running_loop().create_future()

        def after() -> None:
            ran.append((request.path, answered.done()))
            if request.path == "/boom":
                raise RuntimeError("failed after the answer")

        asyncio.get_running_loop().call_soon(answered.set_result, None)  # runs after the handler's own step
        return HttpResponse(200, b"{}", after_sent=after)

    async with serving(handler) as server:
        async with wire(server.port) as client:
            with unittest.TestCase().assertLogs("backend.http_server", "ERROR") as logs:
                for path in ("/boom", "/fine"):
                    await to_thread(client.send, request_bytes("GET", path))
                    assert (await to_thread(client.reply)).status == 200
        async with wire(server.port) as client:
            await to_thread(client.send, request_bytes("GET", "/slow"))
        for _ in range(100):
            if len(ran) == 3:
                break
            await asyncio.sleep(0.02)
    # Run in the handler's own step, right after the write: before anything the loop does next.
    assert ran == [("/boom", False), ("/fine", False), ("/slow", False)]
    assert "GET /boom" in logs.records[0].getMessage() and logs.records[0].exc_info is not None


# ---------------------------------------------------------------------------------------------------------------
# Connections: keep-alive, close, pipelining


@on_each_loop
async def test_http_1_1_keeps_the_connection_alive() -> None:
    def get_twice(port: int) -> list[tuple[int, str | None, str]]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            replies = []
            for path in ("/1", "/2"):
                connection.request("GET", path)
                response = connection.getresponse()
                peer = orjson.loads(response.read())["peer"]
                replies.append((response.status, response.getheader("Connection"), peer))
            return replies
        finally:
            connection.close()

    async with serving() as server:
        (status1, connection1, peer1), (status2, connection2, peer2) = await to_thread(get_twice, server.port)
    assert status1 == status2 == 200 and connection1 is connection2 is None and peer1 == peer2


@on_each_loop
async def test_a_keep_alive_connection_is_answered_by_one_task_that_ends_with_it() -> None:
    async with serving() as server:
        before = asyncio.all_tasks()
        async with wire(server.port) as connection:
            for path in ("/1", "/2", "/3"):
                await to_thread(connection.send, request_bytes("GET", path))
                assert (await to_thread(connection.reply)).status == 200
            workers = asyncio.all_tasks() - before
            assert len(workers) == 1 and not next(iter(workers)).done()
        for _ in range(200):  # the server learns of the close on its next read
            if not asyncio.all_tasks() - before:
                break
            await asyncio.sleep(0.01)
        assert not asyncio.all_tasks() - before


@on_each_loop
async def test_http_1_0_closes_unless_asked_to_keep_alive() -> None:
    async with serving() as server:
        async with wire(server.port) as client:
            await to_thread(client.send, request_bytes("GET", "/", version="1.0"))
            reply = await to_thread(client.reply)
            assert reply.status == 200 and reply.headers["Connection"] == "close"
            assert await to_thread(client.closed_by_server)
        async with wire(server.port) as client:
            for path in ("/1", "/2"):
                await to_thread(client.send, request_bytes("GET", path, "Connection: keep-alive", version="1.0"))
                reply = await to_thread(client.reply)
                assert reply.json()["path"] == path and reply.headers["Connection"] == "keep-alive"
        async with wire(server.port) as client:  # HTTP/1.1 keeps alive without saying so, asked to or not
            for connection in ("Connection: keep-alive", "Connection: Keep-Alive, X-Hop"):
                await to_thread(client.send, request_bytes("GET", "/", connection))
                reply = await to_thread(client.reply)
                assert reply.status == 200 and "Connection" not in reply.headers
        async with wire(server.port) as client:  # an HTTP/1.0 client knows no 100 Continue: none is sent
            await to_thread(client.send, request_bytes("POST", "/", "Expect: 100-continue", "Content-Length: 2",
                                                       version="1.0"))
            await asyncio.sleep(0.1)
            await to_thread(client.send, b"{}")
            reply = await to_thread(client.reply)
            assert reply.status == 200 and reply.json()["body"] == "{}"


@on_each_loop
async def test_connection_close_is_honoured_and_what_follows_is_not_answered() -> None:
    async with serving() as server, wire(server.port) as client:
        await to_thread(client.send, request_bytes("GET", "/last", "Connection: close") + request_bytes("GET", "/x"))
        reply = await to_thread(client.reply)
        assert reply.json()["path"] == "/last" and reply.headers["Connection"] == "close"
        assert await to_thread(client.closed_by_server)


@on_each_loop
async def test_pipelined_requests_are_answered_in_order_one_at_a_time() -> None:
    running, most_running = 0, 0

    async def uneven(request: HttpRequest) -> HttpResponse:
        nonlocal running, most_running
        running += 1
        most_running = max(most_running, running)
        await asyncio.sleep(0.05 if request.path == "/1" else 0)  # the first is slowest: order must not depend on it
        running -= 1
        return await echo(request)

    paths = [f"/{i}" for i in range(1, 6)]
    async with serving(uneven) as server, wire(server.port) as client:
        await to_thread(client.send, b"".join(request_bytes("POST", path, body=path.encode()) for path in paths))
        replies = [await to_thread(client.reply) for _ in paths]
    assert [reply.json()["body"] for reply in replies] == paths
    assert most_running == 1


@on_each_loop
async def test_an_upgrade_offer_is_declined_and_the_request_served_with_its_body() -> None:
    offer = ("Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA")
    chunked_body = b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    async with serving() as server, wire(server.port) as client:
        await to_thread(client.send, request_bytes("POST", "/a", *offer, body=b"hello")
                        + request_bytes("POST", "/b", *offer, "Transfer-Encoding: chunked") + chunked_body
                        + request_bytes("GET", "/c"))
        replies = [(await to_thread(client.reply)).json() for _ in range(3)]
    assert [(reply["path"], reply["body"]) for reply in replies] == [("/a", "hello"), ("/b", "abcde"), ("/c", "")]
    assert "upgrade" not in replies[0]["headers"] and replies[0]["headers"]["connection"] == "HTTP2-Settings"


# ---------------------------------------------------------------------------------------------------------------
# Expect: 100-continue, limits and malformed requests


@on_each_loop
async def test_expect_100_continue_is_answered_before_the_body_is_sent() -> None:
    async with serving() as server, wire(server.port) as client:
        await to_thread(client.send, request_bytes("POST", "/", "Content-Length: 5", "Expect: 100-continue"))
        interim = await to_thread(client.reply)
        await to_thread(client.send, b"hello")
        final = await to_thread(client.reply)
    assert (interim.status, interim.reason, interim.body) == (100, "Continue", b"")
    assert final.status == 200 and final.json()["body"] == "hello"


@on_each_loop
async def test_expect_100_continue_over_the_limit_is_413_without_reading_the_body() -> None:
    async with serving() as server, wire(server.port) as client:
        await to_thread(client.send, request_bytes("POST", "/", "Content-Length: 1001", "Expect: 100-continue"))
        reply = await to_thread(client.reply)
        assert reply.status == 413 and reply.headers["Connection"] == "close"
        assert reply.json() == {"error": "Request body is larger than the limit of 1000 bytes"}
        assert await to_thread(client.closed_by_server)


class Gatekeeper:
    """A screen that refuses heads without `x-key: open` with 401, and remembers what it was shown and what was
    accounted for after sending."""

    def __init__(self) -> None:
        self.shown: list[HttpRequest] = []
        self.sent: list[int] = []

    def __call__(self, head: HttpRequest) -> HttpResponse | None:
        self.shown.append(head)
        if head.headers.get("x-key") == "open":
            return None
        refusal = HttpResponse(401, json_error_body(401, "who are you?"))
        refusal.after_sent = lambda: self.sent.append(refusal.status)
        return refusal


@on_each_loop
async def test_a_screen_refuses_a_large_upload_before_its_body_is_read() -> None:
    handled: list[HttpRequest] = []

    async def handler(request: HttpRequest) -> HttpResponse:
        handled.append(request)
        return await echo(request)

    screen = Gatekeeper()
    async with serving(handler, max_body_bytes=10_000_000, screen=screen) as server, wire(server.port) as client:
        await to_thread(client.send, request_bytes("POST", "/v1/models/m:predict?x=1", "Content-Length: 5000000"))
        reply = await to_thread(client.reply)  # the client has sent no byte of its body
        assert reply.status == 401 and reply.headers["Connection"] == "close"
        assert reply.json() == {"error": "who are you?"}
        assert await to_thread(client.closed_by_server)
    assert not handled and screen.sent == [401]
    head = screen.shown[0]
    assert (head.method, head.path, head.query, head.body) == ("POST", "/v1/models/m:predict", "x=1", b"")


@on_each_loop
async def test_a_screen_answers_an_expect_100_continue_instead_of_the_interim_response() -> None:
    screen = Gatekeeper()
    async with serving(screen=screen) as server, wire(server.port) as client:
        await to_thread(client.send, request_bytes("POST", "/", "Content-Length: 5", "Expect: 100-continue"))
        reply = await to_thread(client.reply)
        assert reply.status == 401 and await to_thread(client.closed_by_server)


@on_each_loop
async def test_a_screen_lets_a_caller_in_and_sees_small_bodies_never() -> None:
    screen = Gatekeeper()
    async with serving(max_body_bytes=1_000_000, screen=screen) as server, wire(server.port) as client:
        await to_thread(client.send, request_bytes("POST", "/big", "X-Key: open", "Content-Length: 70000",
                                                   "Expect: 100-continue"))
        assert (await to_thread(client.reply)).status == 100
        await to_thread(client.send, b"b" * 70000)
        big = await to_thread(client.reply)
        await to_thread(client.send, request_bytes("POST", "/small", body=b"s" * 1000))  # no key: not screened
        small = await to_thread(client.reply)
        chunked = b"POST /chunked HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nc\r\n0\r\n\r\n"
        await to_thread(client.send, chunked)  # of unknown length, so screened: refused
        refused = await to_thread(client.reply)
    assert (big.status, len(big.json()["body"]), small.status, refused.status) == (200, 70000, 200, 401)
    assert [head.path for head in screen.shown] == ["/big", "/chunked"]


@on_each_loop
async def test_a_body_over_the_limit_is_413_read_by_a_client_still_sending_it() -> None:
    def post_too_much_then_enough(port: int) -> tuple[int, Any, int]:
        url = f"http://127.0.0.1:{port}/"
        refused = requests.post(url, data=b"x" * 4_000_000, timeout=10)
        return refused.status_code, refused.json(), requests.post(url, data=b"ok", timeout=10).status_code

    async with serving() as server:
        status, error, next_status = await to_thread(post_too_much_then_enough, server.port)
    assert (status, error) == (413, {"error": "Request body is larger than the limit of 1000 bytes"})
    assert next_status == 200  # the server goes on serving


@on_each_loop
async def test_a_refused_client_may_go_on_sending_until_it_closes() -> None:
    def send_the_body_anyway(client: Wire) -> bool:
        for _ in range(64):  # a reset would fail one of these sends
            client.send(b"z" * 65536)
            time.sleep(0.001)
        return client.closed_by_server()

    async with serving() as server, wire(server.port) as client:
        await to_thread(client.send, request_bytes("POST", "/", "Content-Length: 4194304"))
        assert (await to_thread(client.reply)).status == 413
        assert await to_thread(send_the_body_anyway, client)


@on_each_loop
async def test_chunks_passing_the_limit_are_413_and_close() -> None:
    async with serving() as server, wire(server.port) as client:
        chunk = b"%x\r\n%s\r\n" % (600, b"y" * 600)
        await to_thread(client.send, request_bytes("POST", "/", "Transfer-Encoding: chunked") + chunk * 2)
        reply = await to_thread(client.reply)
        assert reply.status == 413 and reply.headers["Connection"] == "close"
        assert await to_thread(client.closed_by_server)


GARBAGE = [
    b"NONSENSE\r\n\r\n",  # no method
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # no chunk size
    b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",  # two lengths
    b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",  # a tunnel
    b"GET http:/x HTTP/1.1\r\n\r\n",  # a URL only llhttp accepts
]


@on_each_loop
async def test_a_malformed_request_is_400_with_the_error_body_after_the_answers_owed_and_closes() -> None:
    async with serving(error_body=lambda status, message: f"{status}|{message}".encode()) as server:
        for garbage in GARBAGE:
            async with wire(server.port) as client:
                await to_thread(client.send, request_bytes("GET", "/first") + garbage)
                first, refused = await to_thread(client.reply), await to_thread(client.reply)
                assert first.status == 200, garbage
                assert refused.status == 400 and refused.headers["Connection"] == "close", garbage
                assert refused.body.startswith(b"400|Malformed HTTP request"), refused.body
                assert await to_thread(client.closed_by_server)


@on_each_loop
async def test_a_head_still_incomplete_after_64_kib_is_431() -> None:
    async with serving() as server, wire(server.port) as client:
        await to_thread(client.send, b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70_000)
        reply = await to_thread(client.reply)
        assert reply.status == 431 and await to_thread(client.closed_by_server)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_refusal_over_tls_is_answered_then_the_connection_closes(loop: str, certs: CertPaths) -> None:
    """TLS cannot half-close (write_eof raises there): the refusal is still answered, the connection lingers only
    until the deadline, and the server keeps serving. Before, the refusal's worker died on write_eof and left the
    connection open with no deadline at all."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(certs.server_cert, certs.server_key)
    client_context = ssl.create_default_context(cafile=certs.ca_cert)

    def exchange(port: int, request: bytes) -> tuple[bytes, float]:
        """Send `request` and read until the server closes: what came back, and how long the close took."""
        with client_context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                        server_hostname="localhost") as sock:
            sock.sendall(request)
            started, received = time.monotonic(), b""
            while chunk := sock.recv(65536):
                received += chunk
            return received, time.monotonic() - started

    async def scenario() -> None:
        async with serving(ssl_context=server_context, header_timeout_s=0.5) as server:
            for request in (b"GARBAGE\r\n\r\n", request_bytes("POST", "/", body=b"x" * (LIMIT + 1))):
                answer, closed_after = await to_thread(exchange, server.port, request)
                assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 413 ")), answer
                assert b"\r\nConnection: close\r\n" in answer and closed_after < 5
            answer, _ = await to_thread(exchange, server.port, request_bytes("GET", "/ok", "Connection: close"))
            assert answer.startswith(b"HTTP/1.1 200 ")

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(scenario())


# ---------------------------------------------------------------------------------------------------------------
# Timeouts


@on_each_loop
async def test_a_head_not_complete_in_time_closes_the_connection() -> None:
    async with serving(header_timeout_s=0.2) as server, wire(server.port) as silent, wire(server.port) as partial:
        await to_thread(partial.send, b"GET / HTTP/1.1\r\nHost:")
        started = time.monotonic()
        assert await to_thread(partial.closed_by_server) and await to_thread(silent.closed_by_server)
        assert 0.15 < time.monotonic() - started < 3


@on_each_loop
async def test_a_body_may_come_slowly_but_not_stall() -> None:
    def trickle(client: Wire) -> Reply:
        client.send(request_bytes("POST", "/", "Content-Length: 6"))
        for byte in b"steady":  # 0.6 s in all, never a pause as long as the timeout
            time.sleep(0.1)
            client.send(bytes([byte]))
        return client.reply()

    async with serving(header_timeout_s=0.3) as server, wire(server.port) as slow, wire(server.port) as stalled:
        await to_thread(stalled.send, request_bytes("POST", "/", "Content-Length: 6") + b"st")
        assert (await to_thread(trickle, slow)).json()["body"] == "steady"
        assert await to_thread(stalled.closed_by_server)


@on_each_loop
async def test_an_idle_keep_alive_connection_is_closed_after_its_timeout() -> None:
    async with serving(header_timeout_s=5, keepalive_timeout_s=0.4) as server, wire(server.port) as client:
        for _ in range(2):  # the second request, inside the first wait, starts the wait anew
            await to_thread(client.send, request_bytes("GET", "/"))
            assert (await to_thread(client.reply)).status == 200
            answered = time.monotonic()
            await asyncio.sleep(0.25)
        assert await to_thread(client.closed_by_server)
        assert 0.35 < time.monotonic() - answered < 3


@on_each_loop
async def test_timeouts_do_not_cut_a_slow_handler_or_a_second_request() -> None:
    async def slow(request: HttpRequest) -> HttpResponse:
        await asyncio.sleep(0.4)
        return await echo(request)

    async with serving(slow, header_timeout_s=0.2, keepalive_timeout_s=0.2) as server, wire(server.port) as client:
        for path in ("/1", "/2"):
            await to_thread(client.send, request_bytes("GET", path))
            assert (await to_thread(client.reply)).json()["path"] == path


# ---------------------------------------------------------------------------------------------------------------
# Back-pressure


@on_each_loop
async def test_reading_pauses_while_a_request_is_handled() -> None:
    release = asyncio.Event()

    async def blocked(request: HttpRequest) -> HttpResponse:
        await release.wait()
        return HttpResponse(200)

    def flood(client: Wire) -> int:
        """Pipeline a huge request behind the blocked one; how much the kernel and server took before refusing."""
        client.send(request_bytes("GET", "/blocked") + request_bytes("POST", "/", "Content-Length: 100000000"))
        client.sock.setblocking(False)
        sent, chunk = 0, b"z" * 65536
        while sent < 64 * 2**20:
            try:
                sent += client.sock.send(chunk)
            except BlockingIOError:
                time.sleep(0.2)  # let the kernel move what it can; still full means nobody reads
                try:
                    sent += client.sock.send(chunk)
                except BlockingIOError:
                    break
        return sent

    async with serving(blocked, max_body_bytes=10**9) as server, wire(server.port) as client:
        sent = await to_thread(flood, client)
        release.set()
    assert sent < 32 * 2**20  # socket buffers only: the server did not read on into memory


@on_each_loop
async def test_the_next_response_waits_until_a_slow_reader_drains_the_last() -> None:
    calls = 0
    big = b"b" * 16 * 2**20

    async def large(request: HttpRequest) -> HttpResponse:
        nonlocal calls
        calls += 1
        return HttpResponse(200, big, "application/octet-stream")

    async with serving(large) as server, wire(server.port, receive_buffer=65536) as client:
        await to_thread(client.send, request_bytes("GET", "/1") + request_bytes("GET", "/2"))
        await asyncio.sleep(0.5)
        assert calls == 1  # the first response is stuck in the buffers: the second is not made yet
        replies = [await to_thread(client.reply) for _ in range(2)]
    assert calls == 2 and all(reply.body == big for reply in replies)


@on_each_loop
async def test_a_client_that_stops_reading_is_dropped_after_the_keep_alive_timeout() -> None:
    """A client must take some of its response within the keep-alive timeout (as nginx's send_timeout): one that
    never read held its connection and the unsent response for good. A slow reader that keeps taking some is not
    cut, however long the whole response takes."""
    big = b"b" * 16 * 2**20

    async def large(request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, big, "application/octet-stream")

    def slow_reader(port: int) -> int:
        """Read the 16 MB in sips of at most 256 KB, 40 ms apart (~2.6 s, past two timeouts): the bytes received."""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request_bytes("GET", "/slow"))
            received = 0
            while received < len(big) and (chunk := sock.recv(256 * 1024)):
                received += len(chunk)
                time.sleep(0.04)
            return received

    def received_until_dropped(client: Wire) -> int:
        """Everything the server sent before it dropped the connection (a hang here times out at 10 s)."""
        total = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := client.sock.recv(1 << 20):
                total += len(chunk)
        return total

    async with serving(large, keepalive_timeout_s=1.0) as server:
        async with wire(server.port, receive_buffer=65536) as stalled:
            await to_thread(stalled.send, request_bytes("GET", "/stalled"))
            await asyncio.sleep(3)  # three timeouts, and not a byte read
            assert await to_thread(received_until_dropped, stalled) < len(big)
        assert await to_thread(slow_reader, server.port) >= len(big)


# ---------------------------------------------------------------------------------------------------------------
# Shutdown


@on_each_loop
async def test_shutdown_finishes_requests_in_flight_and_closes_idle_connections() -> None:
    started = asyncio.Event()
    big = b"s" * 4 * 2**20

    async def slow(request: HttpRequest) -> HttpResponse:
        if request.path == "/slow":
            started.set()
            await asyncio.sleep(0.3)
            return HttpResponse(200, big, "application/octet-stream")
        return HttpResponse(200)

    async with serving(slow) as server, wire(server.port) as idle, wire(server.port) as busy:
        await to_thread(idle.send, request_bytes("GET", "/"))
        assert (await to_thread(idle.reply)).status == 200
        await to_thread(busy.send, request_bytes("GET", "/slow"))
        await started.wait()
        reply_in_flight = asyncio.create_task(to_thread(busy.reply))  # reading while the server drains
        await server.shutdown(grace_s=5)
        reply = await reply_in_flight
        assert reply.status == 200 and reply.body == big and reply.headers["Connection"] == "close"
        assert await to_thread(idle.closed_by_server) and await to_thread(busy.closed_by_server)
        with pytest.raises(ConnectionRefusedError):
            await to_thread(socket.create_connection, ("127.0.0.1", server.port), 5)


@on_each_loop
async def test_shutdown_cancels_handlers_still_running_after_the_grace() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def stuck(request: HttpRequest) -> HttpResponse:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return HttpResponse(200)

    async with serving(stuck) as server, wire(server.port) as client:
        await to_thread(client.send, request_bytes("GET", "/"))
        await started.wait()
        begun = time.monotonic()
        await server.shutdown(grace_s=0.2)
        assert 0.15 < time.monotonic() - begun < 3 and cancelled.is_set()
        assert await to_thread(client.closed_by_server)


# ---------------------------------------------------------------------------------------------------------------
# curl


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@on_each_loop
async def test_curl_keep_alive_expect_100_continue_and_http2_upgrade() -> None:
    body = "j" * 2000

    def curl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["curl", "-sS", "-v", "--max-time", "10", *args], capture_output=True, text=True,
                              timeout=20, check=True)

    async with serving(max_body_bytes=10_000) as server:
        url = f"http://127.0.0.1:{server.port}"
        twice = await to_thread(curl, "-H", "Expect: 100-continue", "--data-binary", body, "-w", "\\n",
                                f"{url}/a", f"{url}/b")
        upgrade = await to_thread(curl, "--http2", "--data-binary", "up", f"{url}/h2c")
    assert "HTTP/1.1 100 Continue" in twice.stderr and "Re-using existing connection" in twice.stderr
    documents = [orjson.loads(line) for line in twice.stdout.splitlines()]
    assert [(document["path"], document["body"]) for document in documents] == [("/a", body), ("/b", body)]
    assert "Upgrade: h2c" in upgrade.stderr and orjson.loads(upgrade.stdout)["body"] == "up"



async def test_too_many_header_fields_get_431() -> None:
    async with serving() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        fields = "".join(f"x-field-{index}: {index}\r\n" for index in range(101))
        writer.write(f"GET / HTTP/1.1\r\nHost: x\r\n{fields}\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_an_error_body_quoting_what_is_not_unicode_is_still_a_json_error() -> None:
    """A lone surrogate (a file name read with surrogateescape, say) is escaped, not a failed answer."""
    body = json_error_body(404, "no model at /models/caf\udce9")
    assert orjson.loads(body) == {"error": "no model at /models/caf\\udce9"}
    assert json_error_body(400, "plain") == b'{"error":"plain"}'


@on_each_loop
async def test_trailer_fields_are_dropped_and_bounded_like_the_head() -> None:
    """Fields after a chunked body (trailers) never join the request's headers, so a credential or request id sent
    there counts for nothing (RFC 9110 6.5.1); and they are bounded as the head is: 80 KB of them is a 431, where
    unbounded ones cost the event loop seconds (16 MB took 4.6 s)."""
    chunked = b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
    async with serving() as server, wire(server.port) as client:
        await to_thread(client.send, chunked + b"Authorization: Bearer key\r\nX-Request-Id: from-trailer\r\n\r\n")
        reply = await to_thread(client.reply)
        assert reply.status == 200 and reply.json()["body"] == "hello"
        assert not {"authorization", "x-request-id"} & set(reply.json()["headers"])
        await to_thread(client.send, chunked + b"X-T: %s\r\n" % (b"a" * 2000) * 40 + b"\r\n")
        reply = await to_thread(client.reply)
        assert reply.status == 431 and "trailer fields" in reply.json()["error"]


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_silent_tls_client_is_dropped_soon_after_the_header_timeout(loop: str, certs: CertPaths) -> None:
    """After the header timeout the server starts TLS's closing handshake; a client that never answers it held the
    connection for asyncio's default shutdown timeout, 30 s. That wait is now the header timeout too."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(certs.server_cert, certs.server_key)
    client_context = ssl.create_default_context(cafile=certs.ca_cert)

    def silent_client(port: int) -> float:
        """Handshake, then never send or answer anything: how long until the server drops the TCP connection."""
        with socket.create_connection(("127.0.0.1", port), timeout=60) as raw:
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = client_context.wrap_bio(incoming, outgoing, server_hostname="localhost")
            started = time.monotonic()
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    raw.sendall(outgoing.read())
                    incoming.write(raw.recv(65536))
            raw.sendall(outgoing.read())
            with contextlib.suppress(ConnectionResetError):
                while raw.recv(65536):  # session tickets, then the server's close_notify: read, never answered
                    pass
            return time.monotonic() - started

    async def scenario() -> None:
        async with serving(ssl_context=server_context, header_timeout_s=0.5) as server:
            assert await to_thread(silent_client, server.port) < 10

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(scenario())
