"""The admin listener (plain HTTP, on loopback unless the config says otherwise): Prometheus metrics, liveness and
readiness, the live state of every backend, the config in force (redacted), and `POST /admin/reload`.

It runs on its own port so that the public endpoint never exposes it, and answers JSON like the rest. Everything
but the probes and `/metrics` needs a key from `auth.admin_keys` (`Authorization: Bearer <key>`), even on loopback:
the admin API shows the config and reloads it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import orjson

from backend.http_server import HttpRequest, HttpResponse
from gateway.auth import AuthError
from gateway.config import redacted
from gateway.metrics import GatewayMetrics
from gateway.snapshot import Snapshot
from gateway.upstream import Upstreams

_OPEN = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapers carry no credentials


class AdminTarget(Protocol):
    @property
    def snapshot(self) -> Snapshot: ...

    @property
    def ready(self) -> bool: ...

    async def reload(self, reason: str) -> tuple[bool, str]: ...

    def describe_fleet(self) -> dict[str, object] | None: ...


def _json(status: int, document: Any) -> HttpResponse:
    return HttpResponse(status=status, body=orjson.dumps(document, option=orjson.OPT_INDENT_2))


class Admin:
    def __init__(self, target: AdminTarget, upstreams: Upstreams, metrics: GatewayMetrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._target = target
        self._upstreams = upstreams
        self._metrics = metrics
        self._clock = clock
        self._routes: dict[tuple[str, str], Callable[[], Awaitable[HttpResponse]]] = {
            ("GET", "/metrics"): self._exposition,
            ("GET", "/healthz"): self._live,
            ("GET", "/readyz"): self._ready,
            ("GET", "/admin/backends"): self._backends,
            ("GET", "/admin/config"): self._config,
            ("POST", "/admin/reload"): self._reload,
        }

    async def handle(self, request: HttpRequest) -> HttpResponse:
        method = "GET" if request.method == "HEAD" else request.method
        route = self._routes.get((method, request.path))
        if route is not None and request.path not in _OPEN:
            try:
                self._target.snapshot.authenticator.authenticate_admin(request.headers)
            except AuthError as error:
                return HttpResponse(status=401, body=orjson.dumps({"error": error.message}),
                                    headers=[("www-authenticate", error.challenge or 'Bearer realm="tfgate-admin"')])
        if route is None:
            known = {path for _, path in self._routes}
            status = 405 if request.path in known else 404
            return _json(status, {"error": f"No such admin endpoint: {request.method} {request.path}"})
        return await route()

    async def _exposition(self) -> HttpResponse:
        body, content_type = self._metrics.exposition()
        return HttpResponse(status=200, body=body, content_type=content_type)

    async def _live(self) -> HttpResponse:
        return _json(200, {"status": "live"})

    async def _ready(self) -> HttpResponse:
        ready = self._target.ready
        return _json(200 if ready else 503, {"status": "ready" if ready else "not ready"})

    async def _backends(self) -> HttpResponse:
        document: dict[str, object] = {"pools": self._upstreams.describe(self._clock())}
        fleet = self._target.describe_fleet()
        if fleet is not None:
            document["fleet"] = fleet
        return _json(200, document)

    async def _config(self) -> HttpResponse:
        snapshot = self._target.snapshot
        return _json(200, {"generation": snapshot.generation, "source": snapshot.config.source,
                           "config": redacted(snapshot.config)})

    async def _reload(self) -> HttpResponse:
        ok, message = await self._target.reload("admin request")
        generation = self._target.snapshot.generation
        if ok:
            return _json(200, {"status": "applied", "generation": generation, "message": message})
        return _json(400, {"error": message, "generation": generation})
