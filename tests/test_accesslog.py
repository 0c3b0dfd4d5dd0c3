"""The JSON access log: lines stay whole when several gateway workers write to one pipe, and a reader that stalls
costs lines, never the event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from bench.backend_process import REPO, BackendProcess, free_port
from bench.proxies import GatewayProcess, gateway_config
from gateway.access_record import AccessRecord
from gateway.accesslog import AccessLog, whole_lines
from gateway.certs import CertPaths
from gateway.http_edge import milliseconds
from gateway.metrics import GatewayMetrics
from tests.gateway_support import MODEL

WRITER = """
import asyncio, os, sys
from gateway.access_record import AccessRecord
from gateway.accesslog import AccessLog

async def main() -> None:
    log = AccessLog(sys.stdout.buffer, flush_s=0.05)
    for i in range(10000):
        log.write(AccessRecord(request_id=f"{os.getpid()}-{i}", method="POST", peer="127.0.0.1:1",
                               path="/v1/models/" + "m" * 100 + ":predict"))
        if i % 500 == 0:
            await asyncio.sleep(0.001)
    await log.close()

asyncio.run(main())
"""


@pytest.mark.parametrize(("buffer", "limit", "pieces"), [
    (b"aa\nbbbb\ncc\n", 6, [b"aa\n", b"bbbb\n", b"cc\n"]),
    (b"aa\nbb\ncc\n", 6, [b"aa\nbb\n", b"cc\n"]),
    (b"abc\n", 100, [b"abc\n"]),
    (b"a\n" + b"x" * 10 + b"\nb\n", 4, [b"a\n", b"x" * 10 + b"\n", b"b\n"]),  # too long: alone, whole
    (b"", 4, []),
])
def test_the_buffer_goes_out_in_whole_lines_within_the_limit(buffer: bytes, limit: int, pieces: list[bytes]) -> None:
    assert list(whole_lines(buffer, limit)) == pieces


def test_a_line_has_every_field_of_the_record_in_order() -> None:
    record = AccessRecord(request_id="r-1", method="POST", path="/v1/models/m:predict", peer="127.0.0.1:1")
    record.model, record.status = "m", 200
    stream = io.BytesIO()

    async def write() -> None:
        access = AccessLog(stream)
        access.write(record)
        await access.close()

    asyncio.run(write())
    line = json.loads(stream.getvalue())
    assert list(line) == [field.name for field in dataclasses.fields(AccessRecord)]
    assert (line["request_id"], line["model"], line["status"], line["version"]) == ("r-1", "m", 200, None)


@pytest.mark.parametrize("seconds, logged", [(0.0, 0.0), (0.25, 250.0), (1.0000004, 1000.0), (0.0000016, 0.002),
                                             (0.0123456, 12.346), (3600.0, 3_600_000.0)])
def test_durations_are_logged_in_milliseconds_to_the_microsecond(seconds: float, logged: float) -> None:
    assert milliseconds(seconds) == logged


def test_two_writers_on_one_pipe_never_cut_each_others_lines() -> None:
    """As two gateway workers on the primary's stdout, read slowly (a log shipper behind): 64 KiB writes used to
    be split by the pipe and interleaved, so lines came out cut in two."""
    read_end, write_end = os.pipe()
    writers = [subprocess.Popen([sys.executable, "-c", WRITER], stdout=write_end, cwd=REPO) for _ in range(2)]
    os.close(write_end)
    received = bytearray()
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while chunk := pipe.read(3000):
            received += chunk
            time.sleep(0.0002)
    assert [writer.wait(timeout=60) for writer in writers] == [0, 0]
    lines = bytes(received).splitlines()
    ids = [json.loads(line)["request_id"] for line in lines]  # each one whole JSON
    assert len(ids) == len(set(ids)) == 20000


class _CountedFile(io.FileIO):
    """A regular file that remembers the size of each write."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "ab")
        self.writes: list[int] = []

    def write(self, data: Any) -> int:  # collections.abc.Buffer from Python 3.12
        self.writes.append(len(memoryview(data)))
        return super().write(data)


async def test_a_regular_file_takes_each_buffer_in_one_write(tmp_path: Path) -> None:
    """No pipe, no PIPE_BUF pieces: each write costs the writer thread a GIL hand-off with the event loop."""
    stream = _CountedFile(tmp_path / "access.log")
    access = AccessLog(stream)
    for i in range(1000):  # ~330 bytes a line: five times the 64 KiB that hands a buffer over at once
        access.write(AccessRecord(request_id=f"{i:06d}", method="POST", path="/v1/models/m:predict", peer="p"))
    await asyncio.wait_for(access.close(), 60)
    stream.close()
    ids = [json.loads(line)["request_id"] for line in (tmp_path / "access.log").read_bytes().splitlines()]
    assert ids == [f"{i:06d}" for i in range(1000)]
    # each full buffer in one write, and what was left on close; on a pipe they would be PIPE_BUF pieces
    assert len(stream.writes) > 1 and all(size >= 64 * 1024 for size in stream.writes[:-1])


def _read_all(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as pipe:
        return pipe.read()


async def test_a_stalled_reader_costs_lines_past_the_limit_never_the_event_loop() -> None:
    """A log shipper that stops reading fills the pipe: the event loop goes on (it only hands buffers to the
    writer thread), the lines past `max_pending_bytes` are dropped and counted, and the rest arrive whole, in order,
    once the reader is back."""
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "wb")
    metrics = GatewayMetrics()
    access = AccessLog(stream, max_pending_bytes=32 * 1024)
    access.on_drop = metrics.access_lines_dropped
    total = 3000  # ~140 bytes a line: well past the pipe's 64 KiB and the 32 KiB allowed to wait
    for i in range(total):
        access.write(AccessRecord(request_id=f"{i:06d}", method="POST", path="/v1/models/m:predict", peer="p"))
        if i % 100 == 99:
            access.flush()
            await asyncio.sleep(0)  # nothing reads the pipe, and the event loop still turns
    assert access.dropped_lines > 0
    exposition = metrics.exposition()[0].decode()
    assert f"tfgate_gateway_access_log_dropped_lines_total {float(access.dropped_lines)}" in exposition
    reader = asyncio.create_task(asyncio.to_thread(_read_all, read_end))
    await asyncio.wait_for(access.close(), 60)  # a generous bound that only catches a writer that never ends
    stream.close()
    ids = [json.loads(line)["request_id"] for line in (await reader).splitlines()]
    assert len(ids) == total - access.dropped_lines and ids == sorted(ids)


def test_a_gateway_whose_access_log_nobody_reads_keeps_serving(tmp_path: Path, certs: CertPaths,
                                                               backends: list[BackendProcess]) -> None:
    """The real gateway, its stdout a pipe that is open but not read (a stalled log shipper): 1000 requests log
    several times the pipe's 64 KiB, where a write on the event loop would have blocked it, and every line arrives
    once the reader is back."""
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # open, so the gateway can open the other end; not read
    document = gateway_config(certs, [f"127.0.0.1:{b.rest_port}" for b in backends], "round_robin", free_port(),
                              free_port())
    requests_sent = 1000
    with GatewayProcess(document, tmp_path, fifo) as gateway, requests.Session() as session:
        gateway.wait_ready()
        for _ in range(requests_sent):
            reply = session.post(f"https://localhost:{gateway.https_port}/v1/models/{MODEL}:predict",
                                 json={"instances": [2.0]}, verify=str(certs.ca_cert), timeout=10)
            assert reply.status_code == 200
        os.set_blocking(reader, True)
        with ThreadPoolExecutor(1) as pool:
            received = pool.submit(_read_all, reader)  # the reader is back; the gateway stops and writes the rest
            gateway.stop()
            lines = received.result(timeout=60).splitlines()
    assert len(lines) == requests_sent and all(json.loads(line)["status"] == 200 for line in lines)
