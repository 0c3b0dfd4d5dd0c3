"""What the access log writes for one request (gateway/accesslog.py), filled in by the edges as the request goes.

Why a module of its own: the record is made and filled for every request, so it is compiled (mypyc) with the request
path. As a native class it is made by its own compiled __init__ and filled by compiled attribute writes; made as the
interpreted dataclass it was, it cost ~6k instructions per request (callgrind; net of `as_dict`, ~2.6k are saved).
The access log serializes `as_dict()`: orjson cannot read a compiled class (handed one, it crashed the process).
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(slots=True, init=False)
class AccessRecord:
    request_id: str
    method: str
    path: str
    peer: str
    principal: str  # who called: a key or certificate rule's name, a token's subject; never a secret
    ts: float
    status: int
    model: str
    version: int | None
    label: str | None
    route: str
    pool: str
    upstream: str
    attempts: int
    duration_ms: float
    upstream_ms: float
    bytes_in: int
    bytes_out: int
    error: str
    protocol: str  # "rest", or "grpc", whose calls carry their status name in grpc_status (status stays 0)
    grpc_status: str

    def __init__(self, request_id: str, method: str, path: str, peer: str, bytes_in: int = 0,
                 protocol: str = "rest") -> None:
        self.request_id, self.method, self.path, self.peer = request_id, method, path, peer
        self.principal, self.ts, self.status = "", time.time(), 0
        self.model, self.version, self.label, self.route, self.pool = "", None, None, "", ""
        self.upstream, self.attempts, self.duration_ms, self.upstream_ms = "", 0, 0.0, 0.0
        self.bytes_in, self.bytes_out, self.error, self.protocol, self.grpc_status = bytes_in, 0, "", protocol, ""

    def as_dict(self) -> dict[str, object]:
        """Every field by name, in the order above: the access log's JSON line."""
        return {"request_id": self.request_id, "method": self.method, "path": self.path, "peer": self.peer,
                "principal": self.principal, "ts": self.ts, "status": self.status, "model": self.model,
                "version": self.version, "label": self.label, "route": self.route, "pool": self.pool,
                "upstream": self.upstream, "attempts": self.attempts, "duration_ms": self.duration_ms,
                "upstream_ms": self.upstream_ms, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "error": self.error, "protocol": self.protocol, "grpc_status": self.grpc_status}
