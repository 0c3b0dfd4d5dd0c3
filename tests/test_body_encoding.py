"""gzip request bodies, as TF Serving's HTTP server reads them: uncompressed within the body limit, refused clearly
when they are not gzip or would expand past it."""

from __future__ import annotations

import gzip

import pytest

from backend.body_encoding import gunzip_body, is_gzip
from backend.errors import BodyTooLarge, InvalidArgument


@pytest.mark.parametrize("value, expected", [
    ("gzip", True), ("x-gzip", True), ("GZIP", True), ("identity, gzip", True), ("", False), ("identity", False),
    ("br", False), ("deflate", False),
])
def test_a_content_encoding_naming_gzip_is_gzip(value: str, expected: bool) -> None:
    assert is_gzip(value) is expected


def test_a_gzip_body_reads_back_whole_up_to_the_limit() -> None:
    document = b'{"instances": [1.0, 2.0]}' * 40
    assert gunzip_body(gzip.compress(document), len(document)) == document


def test_a_gzip_bomb_stops_at_the_limit() -> None:
    bomb = gzip.compress(bytes(50_000_000))  # 50 MB of zeros in ~50 KB
    assert len(bomb) < 100_000
    with pytest.raises(BodyTooLarge, match="larger than the limit of 1000000 bytes once uncompressed") as raised:
        gunzip_body(bomb, 1_000_000)
    assert raised.value.http_status == 413


@pytest.mark.parametrize("body, message", [
    (b'{"instances": [1.0]}', "Unable to uncompress the gzip request body: Error -3"),
    (gzip.compress(b'{"instances": [1.0]}')[:-10], "it ends before its gzip stream does"),
    (b"", "it ends before its gzip stream does"),
])
def test_a_body_that_is_not_whole_gzip_is_invalid(body: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        gunzip_body(body, 1_000_000)
