"""A TCP proxy that delays what a backend sends back and can play dead: the "slow backend" and "killed backend" of
the gateway's tests and the `degraded-backend` benchmark, in front of a real backend.

How it works: every accepted connection opens its own connection to the upstream; bytes to the upstream pass at
once, bytes back are written `delay_s` later, in order (each chunk no earlier than the one before). `delay_s` can
change at any time and applies to chunks from then on. `kill()` closes the listener and every connection, so the
backend behind it looks crashed (connections refused/reset); `revive()` listens again on the same port.
"""

from __future__ import annotations

import asyncio
import socket


class DelayProxy:
    def __init__(self, upstream_host: str, upstream_port: int, delay_s: float = 0.0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.delay_s = delay_s
        self.host = "127.0.0.1"
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[_Pipe] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> DelayProxy:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Pipe(self), host, port or self.port, reuse_address=True)
        self.host, self.port = host, self._server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def kill(self) -> None:
        """Refuse new connections and reset the open ones."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for pipe in list(self._pipes):
            pipe.abort()

    async def revive(self) -> None:
        await self.start(self.host, self.port)

    async def close(self) -> None:
        await self.kill()


class _Upstream(asyncio.Protocol):
    def __init__(self, pipe: _Pipe) -> None:
        self._pipe = pipe

    def data_received(self, data: bytes) -> None:
        self._pipe.send_back(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._pipe.upstream_closed()


class _Pipe(asyncio.Protocol):
    def __init__(self, proxy: DelayProxy) -> None:
        self._proxy = proxy
        self._loop = asyncio.get_running_loop()
        self._client: asyncio.Transport | None = None
        self._upstream: asyncio.Transport | None = None
        self._pending: list[bytes] = []  # client bytes that arrived before the upstream connection was up
        self._last_due = 0.0
        self._connecting: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._client = transport  # type: ignore[assignment]
        self._proxy._pipes.add(self)
        self._connecting = self._loop.create_task(self._connect())

    async def _connect(self) -> None:
        try:
            transport, _ = await self._loop.create_connection(lambda: _Upstream(self), *self._proxy.upstream)
        except OSError:
            self.abort()
            return
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._upstream = transport  # type: ignore[assignment]
        for data in self._pending:
            transport.write(data)  # type: ignore[attr-defined]
        self._pending.clear()

    def data_received(self, data: bytes) -> None:
        if self._upstream is None:
            self._pending.append(data)
        else:
            self._upstream.write(data)

    def send_back(self, data: bytes) -> None:
        due = max(self._loop.time() + self._proxy.delay_s, self._last_due)
        self._last_due = due
        self._loop.call_at(due, self._write_back, data)

    def _write_back(self, data: bytes) -> None:
        if self._client is not None and not self._client.is_closing():
            self._client.write(data)

    def upstream_closed(self) -> None:
        due = max(self._loop.time() + self._proxy.delay_s, self._last_due)
        self._loop.call_at(due, self._close_client)

    def _close_client(self) -> None:
        if self._client is not None:
            self._client.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._proxy._pipes.discard(self)
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        if self._upstream is not None:
            self._upstream.close()

    def abort(self) -> None:
        if self._client is not None:
            self._client.abort()
        if self._upstream is not None:
            self._upstream.abort()


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.delay_proxy --upstream HOST:PORT --port N --delay-ms D`: one DelayProxy in a process of its
    own (so its event loop does not share a core's time slices with the load generator), silent, until SIGTERM or
    Ctrl-C. The listening port is open once the process accepts connections."""
    import argparse
    import signal

    import uvloop

    parser = argparse.ArgumentParser(prog="python -m bench.delay_proxy", description=main.__doc__)
    parser.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--port", type=int, required=True, help="port to listen on, on --host")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="delay of every response chunk")
    args = parser.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    if not host or not port.isdigit():
        parser.error(f"--upstream: expected HOST:PORT, got {args.upstream!r}")

    async def serve() -> None:
        proxy = await DelayProxy(host, int(port), args.delay_ms / 1e3).start(args.host, args.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            await proxy.close()

    uvloop.run(serve())
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
