"""The gateway's upstream HTTP client against real servers on 127.0.0.1: the backend's HttpServer for the happy path
and connection reuse, and small scripted asyncio servers for the edge cases (chunks, Connection: close, servers that
close idle connections, reset, never answer, or answer out of turn).

Every scenario runs on asyncio's own loop and on uvloop (what the gateway runs on), each in a fresh asyncio.Runner,
and fails if a task outlives it.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Self

import orjson
import pytest
import uvloop

from backend.http_server import HttpRequest, HttpResponse, HttpServer
from gateway.upstream_http import HttpPool, UpstreamError, UpstreamResponse

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def on_each_loop(scenario: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[str], None]:
    """Turn an async scenario into a test run once per event loop, failing if a task outlives the scenario."""
    async def checked() -> None:
        await scenario()
        assert asyncio.all_tasks() == {asyncio.current_task()}, "a task outlived the scenario"

    @pytest.mark.parametrize("loop", sorted(LOOPS))
    def test(loop: str) -> None:
        with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
            runner.run(checked())

    test.__doc__ = scenario.__doc__
    return test


async def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait for what the loop does a step or two after a close (connection_lost)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


@asynccontextmanager
async def pool_to(port: int, **options: Any) -> AsyncIterator[HttpPool]:
    pool = HttpPool("127.0.0.1", port, **options)
    try:
        yield pool
    finally:
        await pool.close()
    assert pool.open == 0 and pool.idle == 0


def fields(response: UpstreamResponse) -> dict[str, str]:
    return {name.decode(): value.decode() for name, value in response.headers}


# ---------------------------------------------------------------------------------------------------------------
# The backend's HttpServer


async def echo(request: HttpRequest) -> HttpResponse:
    if request.path == "/slow":
        await asyncio.sleep(0.2)
    return HttpResponse(200, orjson.dumps({
        "method": request.method, "path": request.path, "query": request.query, "headers": dict(request.headers),
        "body": request.body.decode("latin-1"), "peer": request.peer}),
        headers=[("X-Model", "m"), ("Keep-Alive", "timeout=5"), ("Proxy-Thing", "x")])


@asynccontextmanager
async def backend() -> AsyncIterator[HttpServer]:
    server = HttpServer(echo, max_body_bytes=1 << 20)
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.shutdown(1.0)


async def peer(pool: HttpPool, path: str = "/") -> str:
    response = await pool.request("GET", path, [("Host", "backend")], b"", 5)
    return str(orjson.loads(response.body)["peer"])


@on_each_loop
async def test_a_request_goes_out_as_given_and_its_response_comes_back_without_hop_by_hop_fields() -> None:
    async with backend() as server, pool_to(server.port) as pool:
        response = await pool.request("POST", "/v1/models/m:predict?x=1", [("Host", "backend"), ("X-Id", "7")],
                                      b'{"instances": [1]}', 5)
        seen = orjson.loads(response.body)
        get = orjson.loads((await pool.request("GET", "/v1/models/m", [("Host", "backend")], b"", 5)).body)
    assert response.status == 200
    assert response.headers == [(b"content-type", b"application/json"), (b"x-model", b"m")]
    assert (seen["method"], seen["path"], seen["query"], seen["body"]) == (
        "POST", "/v1/models/m:predict", "x=1", '{"instances": [1]}')
    assert seen["headers"] == {"host": "backend", "x-id": "7", "content-length": "18"}
    assert get["headers"] == {"host": "backend"}  # no Content-Length on a GET without a body


@on_each_loop
async def test_connections_are_reused_most_recent_first() -> None:
    async with backend() as server, pool_to(server.port) as pool:
        assert len({await peer(pool) for _ in range(5)}) == 1
        assert (pool.open, pool.idle) == (1, 1)
        peers = await asyncio.gather(*(peer(pool) for _ in range(8)))
        assert len(set(peers)) == 8 and (pool.open, pool.idle) == (8, 8)
        fast, slow = await asyncio.gather(peer(pool), peer(pool, "/slow"))  # the slow one is released last
        assert fast != slow
        assert [await peer(pool) for _ in range(3)] == [slow] * 3
        assert (pool.open, pool.idle) == (8, 8)


@on_each_loop
async def test_at_most_max_idle_connections_are_kept() -> None:
    async with backend() as server, pool_to(server.port, max_idle=2) as pool:
        await asyncio.gather(*(peer(pool) for _ in range(5)))
        assert pool.idle == 2
        await eventually(lambda: pool.open == 2)


@on_each_loop
async def test_idle_connections_expire() -> None:
    async with backend() as server, pool_to(server.port, idle_timeout_s=0.3) as pool:
        first = await asyncio.gather(peer(pool), peer(pool))
        await asyncio.sleep(0.1)
        third = await peer(pool)  # renews one of them
        await eventually(lambda: pool.open == 1)
        assert pool.idle == 1 and await peer(pool) == third and third in first
        await eventually(lambda: pool.open == 0)
        assert pool.idle == 0 and await peer(pool) not in first


@on_each_loop
async def test_a_head_response_ends_with_its_head() -> None:
    async with backend() as server, pool_to(server.port) as pool:
        head = await asyncio.wait_for(pool.request("HEAD", "/", [("Host", "backend")], b"", 5), 5)
        assert (head.status, head.body) == (200, b"") and fields(head)["x-model"] == "m"
        assert orjson.loads((await pool.request("GET", "/", [("Host", "backend")], b"", 5)).body)["path"] == "/"


# ---------------------------------------------------------------------------------------------------------------
# Scripted servers

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Scripted:
    """A tiny server whose `script` plays each connection, given the connection's number (from 0)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.accepted = 0
        self.ended = 0  # connections whose script is over
        self.requests: list[bytes] = []  # as read by read_request
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await asyncio.gather(*self._tasks)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number, self.accepted = self.accepted, self.accepted + 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self.script(reader, writer, number)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            self.ended += 1

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One request, head and body (by Content-Length), or None at the end of the connection."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        request = head + (await reader.readexactly(int(length[1])) if length else b"")
        self.requests.append(request)
        return request


def ok(body: bytes, *fields: str) -> bytes:
    head = "".join(f"{field}\r\n" for field in fields)
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body


async def until_closed(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


async def get(pool: HttpPool, path: str = "/", timeout_s: float = 5) -> UpstreamResponse:
    return await pool.request("GET", path, [("Host", "b")], b"", timeout_s)


@on_each_loop
async def test_requests_are_written_as_one_buffer_with_content_length() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        while await server.read_request(reader) is not None:
            writer.write(ok(b"ok"))

    async with Scripted(answer) as server, pool_to(server.port) as pool:
        await pool.request("POST", "/p?q=%20", [("Host", "b"), ("X-A", "1")], b"abc", 5)
        await pool.request("POST", "/empty", [("Host", "b")], b"", 5)
        await pool.request("GET", "/g", [("Host", "b")], b"", 5)
        with pytest.raises(ValueError):
            await pool.request("GET", "/a b HTTP/1.1\r\nX-Smuggled: 1\r\n\r\nGET /", [], b"", 5)
    assert server.requests == [b"POST /p?q=%20 HTTP/1.1\r\nHost: b\r\nX-A: 1\r\nContent-Length: 3\r\n\r\nabc",
                               b"POST /empty HTTP/1.1\r\nHost: b\r\nContent-Length: 0\r\n\r\n",
                               b"GET /g HTTP/1.1\r\nHost: b\r\n\r\n"]
    assert server.accepted == 1


@on_each_loop
async def test_a_chunked_response_is_assembled_and_its_connection_reused() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        while await server.read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\nTrailer: X-Sum\r\n\r\n")
            writer.write(b"5\r\nhello\r\n")
            await asyncio.sleep(0.01)  # the rest in another read
            writer.write(b"6\r\n world\r\n0\r\nX-Sum: 42\r\n\r\n")

    async with Scripted(chunked) as server, pool_to(server.port) as pool:
        for _ in range(2):
            response = await get(pool)
            assert (response.status, response.body, response.headers) == (200, b"hello world", [(b"x-a", b"1")])
    assert server.accepted == 1


@on_each_loop
async def test_interim_responses_are_skipped() -> None:
    async def interim(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        while await server.read_request(reader) is not None:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + ok(b"ok"))

    async with Scripted(interim) as server, pool_to(server.port) as pool:
        for _ in range(2):
            response = await get(pool)
            assert (response.status, response.body, response.headers) == (200, b"ok", [])
    assert server.accepted == 1


@on_each_loop
async def test_hop_by_hop_fields_and_those_connection_names_are_removed() -> None:
    async def hops(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        while await server.read_request(reader) is not None:
            writer.write(ok(b"ok", "Connection: keep-alive, X-Hop", "X-Hop: 1", "Keep-Alive: timeout=5",
                            "Proxy-Authenticate: Basic", "Upgrade: h2c", "TE: trailers", "Content-Type: text/plain",
                            "X-End: 2", "x-end: 3"))

    async with Scripted(hops) as server, pool_to(server.port) as pool:
        response = await get(pool)
        assert response.headers == [(b"content-type", b"text/plain"), (b"x-end", b"2"), (b"x-end", b"3")]
        assert pool.idle == 1


@on_each_loop
async def test_connection_close_and_http_1_0_responses_close_their_connection_after_reading() -> None:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await server.read_request(reader)
        if number == 0:
            writer.write(ok(b"last", "Connection: close"))
        elif number == 1:
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nold")
        elif number == 2:  # llhttp would keep this one alive; an HTTP/1.0 answer is not, here
            writer.write(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 3\r\n\r\nnew")
        else:  # HTTP/1.0 without a length: the body ends with the connection
            writer.write(b"HTTP/1.0 200 OK\r\n\r\nuntil the ")
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(b"end")
            writer.write_eof()
        await until_closed(reader)

    async with Scripted(closing) as server, pool_to(server.port) as pool:
        for body in (b"last", b"old", b"new", b"until the end"):
            assert (await get(pool)).body == body
            assert pool.idle == 0
            await eventually(lambda: pool.open == 0)
        await eventually(lambda: server.ended == 4)
    assert server.accepted == 4


@on_each_loop
async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    async def one_each(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await server.read_request(reader)
        writer.write(ok(f"{number}".encode()))
        await writer.drain()
        if number == 0:
            writer.transport.abort()
        else:
            writer.write_eof()

    async with Scripted(one_each) as server, pool_to(server.port) as pool:
        for number in range(3):
            assert (await get(pool)).body == f"{number}".encode()
            await eventually(lambda: pool.open == 0)
            assert pool.idle == 0
    assert server.accepted == 3


@on_each_loop
async def test_a_reused_connection_lost_before_any_response_byte_is_retried_once_on_a_new_one() -> None:
    async def racing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        """Answers the first request of a connection only on connections 0, 1 and 3; closes or resets on the rest,
        as a server does when its idle timeout races the client's next request."""
        answered = False
        while await server.read_request(reader) is not None:
            if answered or number not in (0, 1, 3):
                if number % 2:
                    writer.transport.abort()
                else:
                    writer.write_eof()
                return
            answered = True
            writer.write(ok(f"{number}".encode()))

    async with Scripted(racing) as server, pool_to(server.port) as pool:
        assert (await get(pool)).body == b"0"
        assert (await get(pool)).body == b"1"  # connection 0 closed without an answer: retried on connection 1
        assert server.accepted == 2
        with pytest.raises(UpstreamError) as caught:  # 1 resets, and so does the retry's connection 2
            await get(pool)
        assert (caught.value.kind, caught.value.retryable) == ("reset", True)
        assert server.accepted == 3
        assert (await get(pool)).body == b"3"
        await eventually(lambda: pool.open == 1)
        assert pool.idle == 1


@on_each_loop
async def test_a_new_connection_lost_before_any_response_byte_is_not_retried_by_the_pool() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await server.read_request(reader)

    async with Scripted(hang_up) as server, pool_to(server.port) as pool:
        with pytest.raises(UpstreamError) as caught:
            await get(pool)
        assert (caught.value.kind, caught.value.retryable) == ("reset", True)
    assert server.accepted == 1


@on_each_loop
async def test_a_connection_lost_in_the_middle_of_a_response_is_not_retryable() -> None:
    async def partial(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await server.read_request(reader)
        writer.write([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", b"HTTP/1.1 200 OK\r\nContent-Le"][number])
        await writer.drain()
        if number == 0:
            writer.transport.abort()
        else:
            writer.write_eof()

    async with Scripted(partial) as server, pool_to(server.port) as pool:
        for _ in range(2):
            with pytest.raises(UpstreamError) as caught:
                await get(pool)
            assert (caught.value.kind, caught.value.retryable) == ("reset", False)
    assert server.accepted == 2


@on_each_loop
async def test_a_malformed_response_is_a_protocol_error() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await server.read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await until_closed(reader)

    async with Scripted(garbage) as server, pool_to(server.port) as pool:
        with pytest.raises(UpstreamError) as caught:
            await get(pool)
        assert (caught.value.kind, caught.value.retryable) == ("protocol", False)
        await eventually(lambda: pool.open == 0)


@on_each_loop
async def test_bytes_out_of_turn_close_the_connection() -> None:
    async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await server.read_request(reader)
        writer.write(ok(f"{number}".encode()) + (ok(b"stray") if number == 0 else b""))
        if number == 1:
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(ok(b"late"))  # after the answer, while idle
        await until_closed(reader)

    async with Scripted(chatty) as server, pool_to(server.port) as pool:
        assert (await get(pool)).body == b"0"  # the stray second answer closes connection 0
        await eventually(lambda: pool.open == 0)
        assert (await get(pool)).body == b"1"
        await eventually(lambda: pool.open == 0)
        assert pool.idle == 0 and server.accepted == 2


@on_each_loop
async def test_a_response_not_complete_in_time_is_a_timeout_and_closes_its_connection() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await server.read_request(reader)
        if number == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await until_closed(reader)

    async with Scripted(silent) as server, pool_to(server.port) as pool:
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(UpstreamError) as caught:
                await get(pool, timeout_s=0.2)
            assert 0.15 < time.monotonic() - started < 2
            assert (caught.value.kind, caught.value.retryable) == ("timeout", False)
            await eventually(lambda: pool.open == 0)
        await eventually(lambda: server.ended == 2)


@on_each_loop
async def test_a_cancelled_request_closes_its_connection() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await server.read_request(reader)
        await until_closed(reader)

    async with Scripted(slow) as server, pool_to(server.port) as pool:
        request = asyncio.ensure_future(get(pool))
        await eventually(lambda: len(server.requests) == 1)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await eventually(lambda: pool.open == 0 and server.ended == 1)


@contextmanager
def nothing_listening() -> Iterator[int]:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    yield port


@contextmanager
def full_backlog() -> Iterator[int]:
    """A port whose listener never accepts and whose backlog is full: a connect there waits for its SYN's answer."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = [socket.socket() for _ in range(4)]
    try:
        for filler in fillers:
            filler.setblocking(False)
            try:
                filler.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
        time.sleep(0.05)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@on_each_loop
async def test_connect_failures_are_retryable() -> None:
    with nothing_listening() as port:
        async with pool_to(port) as pool:
            with pytest.raises(UpstreamError) as caught:
                await get(pool)
            assert (caught.value.kind, caught.value.retryable) == ("connect", True)
            assert "refused" in str(caught.value).lower()
    with full_backlog() as port:
        async with pool_to(port, connect_timeout_s=0.1) as pool:
            started = time.monotonic()
            with pytest.raises(UpstreamError) as caught:  # connect_timeout_s
                await get(pool, timeout_s=5)
            assert (caught.value.kind, caught.value.retryable) == ("connect", True)
            assert time.monotonic() - started < 1
            with pytest.raises(UpstreamError) as caught:  # the request's own deadline, still nothing sent
                await get(pool, timeout_s=0.05)
            assert (caught.value.kind, caught.value.retryable) == ("timeout", True)
            assert pool.open == 0


@on_each_loop
async def test_close_closes_idle_and_busy_connections_and_later_requests_fail() -> None:
    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        answered = False
        while await server.read_request(reader) is not None:
            if not answered:
                writer.write(ok(b"ok"))
                answered = True

    async with Scripted(answer_once) as server:
        pool = HttpPool("127.0.0.1", server.port)
        await asyncio.gather(get(pool), get(pool))
        busy = asyncio.ensure_future(get(pool))
        await eventually(lambda: len(server.requests) == 3)
        assert (pool.open, pool.idle) == (2, 1)
        await pool.close()
        assert (pool.open, pool.idle) == (0, 0)
        with pytest.raises(UpstreamError) as caught:
            await busy
        assert caught.value.kind == "reset"
        await eventually(lambda: server.ended == 2)  # the server saw both sockets close
        with pytest.raises(UpstreamError) as caught:
            await get(pool)
        assert (caught.value.kind, caught.value.retryable) == ("connect", True)
        await pool.close()  # again: nothing to do
        assert server.accepted == 2
