"""One structured JSON line per request on the `tfgate.access` logger (stdout by default), for log pipelines.

It carries what an operator searches by: the request id (also returned in `x-request-id` and sent upstream),
model, version or label as routed, route, pool, the upstream that answered, status, attempts and durations. It
never carries bodies or credentials: headers are not logged at all.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import orjson

log = logging.getLogger("tfgate.access")


@dataclass(slots=True)
class AccessRecord:
    request_id: str
    method: str
    path: str
    peer: str
    status: int = 0
    model: str = ""
    version: int | None = None
    label: str | None = None
    route: str = ""
    pool: str = ""
    upstream: str = ""
    attempts: int = 0
    duration_ms: float = 0.0
    upstream_ms: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    error: str = ""


def write(record: AccessRecord) -> None:
    if log.isEnabledFor(logging.INFO):
        document = {"ts": time.time(), **asdict(record)}
        log.info("%s", orjson.dumps(document).decode())
