"""Request bodies sent gzip-compressed. TF Serving's HTTP server uncompresses a body whose Content-Encoding names
gzip before its handlers read it (net_http's auto_uncompress_input, on by default), so clients that compress their
JSON work against it; they work here too.

What it guarantees: the uncompressed body is bounded by the same limit as a plain one (--rest_api_max_body_bytes),
read incrementally, so a small compressed body cannot expand into gigabytes (a zip bomb); a body that is not valid
gzip is INVALID_ARGUMENT, saying so.
"""

from __future__ import annotations

import zlib

from backend.errors import BodyTooLarge, InvalidArgument

_GZIP_WINDOW = 16 + zlib.MAX_WBITS  # zlib's way to ask for the gzip header and trailer


def is_gzip(content_encoding: str) -> bool:
    """As TF Serving decides: any Content-Encoding value that contains "gzip"."""
    return "gzip" in content_encoding.lower()


def gunzip_body(body: bytes, max_bytes: int) -> bytes:
    inflater = zlib.decompressobj(_GZIP_WINDOW)
    try:
        data = inflater.decompress(body, max_bytes + 1)
    except zlib.error as error:
        raise InvalidArgument(f"Unable to uncompress the gzip request body: {error}") from None
    if len(data) > max_bytes:
        raise BodyTooLarge(f"Request body is larger than the limit of {max_bytes} bytes once uncompressed")
    if not inflater.eof:
        raise InvalidArgument("Unable to uncompress the gzip request body: it ends before its gzip stream does")
    return data
