"""The JSON access log: lines stay whole when several gateway workers write to one pipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from bench.backend_process import REPO
from gateway.accesslog import whole_lines

WRITER = """
import asyncio, os, sys
from gateway.accesslog import AccessLog, AccessRecord

async def main() -> None:
    log = AccessLog(sys.stdout.buffer, flush_s=0.05)
    for i in range(10000):
        log.write(AccessRecord(request_id=f"{os.getpid()}-{i}", method="POST", peer="127.0.0.1:1",
                               path="/v1/models/" + "m" * 100 + ":predict"))
        if i % 500 == 0:
            await asyncio.sleep(0.001)
    log.flush()

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
    assert list(whole_lines(bytearray(buffer), limit)) == pieces


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
