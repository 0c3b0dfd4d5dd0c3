"""The public REST endpoint: TF Serving's REST API over TLS, each request routed by model and forwarded to a backend.

How a request flows: read the current snapshot once → parse the model, version or label from the URL →
authenticate and authorize the caller for that model and method, then rate-limit it (gateway/guard.py) → route
(a URL without a version or label follows the route's weighted split, by rewriting the path to the chosen
`/versions/N` or `/labels/L`) → forward through the pool (balancing, retries) → answer with the backend's status
and body untouched. Errors of the gateway's own (unknown model 404, no healthy backend 503, backend failure 502,
timeout 504) are TF Serving's `{"error": "..."}`. Every request gets an id (the client's `x-request-id` when it
is sane, else a new one), sent upstream and returned; one access-log line and the metrics record it. A request
whose body is large (over 64 KiB, or chunked) or awaited (`Expect: 100-continue`) is authenticated and authorized
on its head first (`screen`), so a caller who may not make it is refused before the body is read.

Credentials the client sent (`authorization`, `x-api-key`, cookies) are never forwarded to backends.
"""

from __future__ import annotations

import functools
import os
import random
import re
import time
from collections.abc import Callable, Mapping
from typing import Protocol
from urllib.parse import quote

from backend.http_server import HttpRequest, HttpResponse, json_error_body
from gateway import errors
from gateway.access_record import AccessRecord
from gateway.accesslog import AccessLog
from gateway.auth import Principal
from gateway.guard import Guard
from gateway.metrics import GatewayMetrics
from gateway.routes import RouteDecision
from gateway.snapshot import Snapshot
from gateway.upstream import Attempts, Upstreams

_MODEL_URL = re.compile(r"/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[0-9]{1,18})|/labels/(?P<label>[^/:]+))?"
                        r"(?P<tail>:(?:predict|classify|regress)|/metadata)?", re.IGNORECASE)
# The method a URL calls, as auth grants name them, by what follows the model (and version or label) in the URL.
_METHODS = {"predict": "predict", "classify": "classify", "regress": "regress", "metadata": "metadata", "": "status"}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Paths `quote(path, safe="/:")` would leave as they are: most, so the call is skipped for them.
_QUOTED_AS_IS = re.compile(r"[A-Za-z0-9_.~/:-]*")
# Not forwarded: hop-by-hop headers (RFC 9110 7.6.1), ones the gateway sets itself, and client credentials.
_NOT_FORWARDED = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
                            "upgrade", "host", "content-length", "expect", "authorization", "x-api-key", "cookie",
                            "x-request-id", "x-forwarded-for"})
_NOT_RETURNED = frozenset({b"content-type", b"content-length", b"date", b"server", b"x-request-id",
                           b"x-tfgate-upstream"})


def _forwarded_headers(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """The client's headers that go upstream: neither ours, credentials nor hop-by-hop, which includes any field the
    client's Connection header names (RFC 9110 7.6.1), as nginx and Envoy drop them."""
    named = headers.get("connection", "")
    hop_by_hop = _NOT_FORWARDED | {token.strip().lower() for token in named.split(",")} if named else _NOT_FORWARDED
    return [(key, value) for key, value in headers.items() if key not in hop_by_hop]


def milliseconds(seconds: float) -> float:
    """`seconds` (a duration, not negative) in milliseconds to the microsecond, for the access log. Rounded half up
    by a compiled int(), not by round(), which compiled code calls generically (~1.1k instructions a call, measured
    with callgrind), and round(x, 3), exact decimal rounding, costs twice that."""
    return int(seconds * 1e6 + 0.5) / 1e3


class RequestIds:
    """Unique ids made cheaply: a random prefix per process, then a counter (uuid4 costs a system call each), in
    decimal: compiled, that is ~90 ns an id, where a zero-padded hex counter took ~490."""

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._count = 0

    def next(self) -> str:
        self._count += 1
        return f"{self._prefix}-{self._count}"


class SnapshotSource(Protocol):
    @property
    def snapshot(self) -> Snapshot: ...


class Edge:
    def __init__(self, source: SnapshotSource, upstreams: Upstreams, guard: Guard, metrics: GatewayMetrics,
                 access_log: AccessLog, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._source = source
        self._guard = guard
        self._access_log = access_log
        self._ids = RequestIds()
        self._upstreams = upstreams
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._clock = clock

    async def handle(self, request: HttpRequest) -> HttpResponse:
        snapshot = self._source.snapshot
        started = self._clock()
        record = self._record(request)
        attempts = Attempts()
        with self._metrics.in_flight:
            try:
                response = await self._forward(snapshot, request, record, attempts)
            except errors.GatewayError as error:
                response = _refusal(error, record, attempts)
        return self._answered(snapshot, record, attempts, response, started)

    def screen(self, head: HttpRequest) -> HttpResponse | None:
        """The HTTP server's screen (backend/http_server.py): before a large or awaited body is read, the caller must
        be authenticated and authorized for the model and method, so an upload nobody may make is refused without
        being received, as nginx's and Envoy's auth filters do. None lets it in; `handle` checks everything again."""
        match = _MODEL_URL.fullmatch(head.path)
        if match is None:
            return None  # answered 404 by `handle`, after a body the server still bounds by max_body_bytes
        snapshot = self._source.snapshot
        started = self._clock()
        name, tail = match.group("name"), match.group("tail") or ""
        try:
            self._identify(snapshot, head, name, tail)
        except errors.GatewayError as error:
            record, attempts = self._record(head), Attempts()
            record.model = name
            return self._answered(snapshot, record, attempts, _refusal(error, record, attempts), started)
        return None

    def _identify(self, snapshot: Snapshot, request: HttpRequest, name: str, tail: str) -> Principal:
        """The caller, granted the method `tail` (the URL's part after the model) calls on model `name`."""
        return self._guard.identify(snapshot.authenticator, request.headers, request.peer_certificate, name,
                                    _METHODS[tail[1:].lower()])

    def _record(self, request: HttpRequest) -> AccessRecord:
        """The request's access record, under the client's `x-request-id` when it is sane, else a new id."""
        given = request.headers.get("x-request-id", "")
        return AccessRecord(request_id=given if given and _REQUEST_ID.fullmatch(given) else self._ids.next(),
                            method=request.method, path=request.path, peer=request.peer, bytes_in=len(request.body))

    def _answered(self, snapshot: Snapshot, record: AccessRecord, attempts: Attempts, response: HttpResponse,
                  started: float) -> HttpResponse:
        """`response` with the gateway's headers, and its accounting to do once it is sent."""
        elapsed = self._clock() - started
        extra = [("x-request-id", record.request_id)]
        if snapshot.config.expose_upstream_header and attempts.upstream:
            extra.append(("x-tfgate-upstream", attempts.upstream))
        response.headers = [*response.headers, *extra]
        # Not the response itself: it holds this callback, and the cycle would leave every request's objects to the
        # cyclic garbage collector instead of freeing them as soon as the answer is sent.
        response.after_sent = functools.partial(self._account, record, attempts, response.status,
                                                len(response.body), elapsed)
        return response

    def _account(self, record: AccessRecord, attempts: Attempts, status: int, bytes_out: int, elapsed: float
                 ) -> None:
        """The access line and the request's metrics, once the answer is on its way (as nginx's log phase): at one
        request in flight this work would otherwise add its time to every answer."""
        record.status, record.attempts = status, attempts.count
        record.upstream, record.upstream_ms = attempts.upstream, milliseconds(attempts.upstream_s)
        record.duration_ms, record.bytes_out = milliseconds(elapsed), bytes_out
        # A model name is a label only once a backend has served it: names clients make up (404s, refused calls)
        # would grow the series without bound.
        served = bool(attempts.upstream) and 200 <= status < 300
        self._metrics.observe_request(model=record.model if served else "", route=record.route,
                                      status=status, upstream=attempts.upstream, seconds=elapsed)
        self._access_log.write(record)

    async def _forward(self, snapshot: Snapshot, request: HttpRequest, record: AccessRecord,
                       attempts: Attempts) -> HttpResponse:
        match = _MODEL_URL.fullmatch(request.path)
        if match is None:
            raise errors.NotFound(f"No such endpoint: {request.method} {request.path}")
        name, url_version, url_label, tail = match.group("name", "version", "label", "tail")
        tail = tail or ""
        record.model = name
        principal = self._identify(snapshot, request, name, tail)
        record.principal = principal.name
        version = None if url_version is None else int(url_version)
        decision = snapshot.routes.route(name, version, url_label, self._rng)
        if decision is None:
            raise errors.NotFound(f"Servable not found for request: Latest({name})")
        record.route, record.pool = decision.route, decision.pool
        limit_headers = self._guard.limit(principal, name, decision.route)
        record.version, record.label = decision.version, decision.label
        explicit = url_version is not None or url_label is not None
        path = _upstream_path(request, name, tail, explicit, decision)
        headers = _forwarded_headers(request.headers)
        client = request.peer.rsplit(":", 1)[0].strip("[]")
        headers += [("x-request-id", record.request_id), ("x-forwarded-for", client)]
        deadline = self._clock() + snapshot.config.limits.request_timeout_s
        upstream = await self._upstreams.forward(snapshot.pools[decision.pool], request.method, path, headers,
                                                 request.body, deadline, attempts)
        content_type = "application/json"
        returned = []
        for key, value in upstream.headers:  # names in lower case (gateway/upstream_http.py)
            if key == b"content-type":
                content_type = value.decode("latin-1")
            elif key not in _NOT_RETURNED:
                returned.append((key.decode("latin-1"), value.decode("latin-1")))
        returned.extend(limit_headers)
        return HttpResponse(status=upstream.status, body=upstream.body, content_type=content_type, headers=returned)


def _refusal(error: errors.GatewayError, record: AccessRecord, attempts: Attempts) -> HttpResponse:
    record.error = attempts.detail or error.message
    return HttpResponse(status=error.status, body=json_error_body(error.status, error.message),
                        headers=list(error.headers))


def _upstream_path(request: HttpRequest, name: str, tail: str, explicit: bool, decision: RouteDecision) -> str:
    """The path sent upstream: as the client wrote it, except that an inference call (`tail`, the URL's part after
    the model, version or label) the split sent to a version or label names it; `explicit`: the URL named one."""
    path = request.path
    if tail.startswith(":") and not explicit and (decision.version is not None or decision.label is not None):
        chosen = f"/versions/{decision.version}" if decision.version is not None else f"/labels/{decision.label}"
        path = f"/v1/models/{name}{chosen}{tail}"
    if not _QUOTED_AS_IS.fullmatch(path):
        path = quote(path, safe="/:")  # the server handed us the decoded path
    return f"{path}?{request.query}" if request.query else path
