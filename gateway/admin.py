"""The admin listener (plain HTTP, on loopback unless the config says otherwise): Prometheus metrics, liveness and
readiness, the live state of every backend, the config in force (redacted), and `POST /admin/reload`.

It runs on its own port so that the public endpoint never exposes it, and answers JSON like the rest. Everything
but the probes and `/metrics` needs a key from `auth.admin_keys` (`Authorization: Bearer <key>`), even on loopback:
the admin API shows the config and reloads it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import orjson

from backend.http_server import HttpRequest, HttpResponse, json_error_body
from gateway.auth import Authenticator, AuthError
from gateway.config import GatewayConfig, redacted

_OPEN = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapers carry no credentials


class AdminTarget(Protocol):
    """What the admin API shows and drives: one gateway process (gateway/app.py), or the primary of several
    (gateway/primary.py), which answers for all of its workers."""

    @property
    def generation(self) -> int: ...

    @property
    def config(self) -> GatewayConfig: ...  # as the operator wrote it

    @property
    def authenticator(self) -> Authenticator: ...

    @property
    def ready(self) -> bool: ...

    async def reload(self, reason: str) -> tuple[bool, str]: ...

    async def backends_document(self) -> dict[str, Any]: ...

    async def exposition(self) -> tuple[bytes, str]: ...


def _json(status: int, document: Any) -> HttpResponse:
    return HttpResponse(status=status, body=orjson.dumps(document, option=orjson.OPT_INDENT_2))


class Admin:
    def __init__(self, target: AdminTarget) -> None:
        self._target = target
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
                self._target.authenticator.authenticate_admin(request.headers)
            except AuthError as error:
                return HttpResponse(status=401, body=json_error_body(401, error.message),
                                    headers=[("www-authenticate", error.challenge or 'Bearer realm="tfgate-admin"')])
        if route is None:
            known = {path for _, path in self._routes}
            status = 405 if request.path in known else 404
            return _json(status, {"error": f"No such admin endpoint: {request.method} {request.path}"})
        return await route()

    async def _exposition(self) -> HttpResponse:
        body, content_type = await self._target.exposition()
        return HttpResponse(status=200, body=body, content_type=content_type)

    async def _live(self) -> HttpResponse:
        return _json(200, {"status": "live"})

    async def _ready(self) -> HttpResponse:
        ready = self._target.ready
        return _json(200 if ready else 503, {"status": "ready" if ready else "not ready"})

    async def _backends(self) -> HttpResponse:
        return _json(200, await self._target.backends_document())

    async def _config(self) -> HttpResponse:
        target = self._target
        return _json(200, {"generation": target.generation, "source": target.config.source,
                           "config": redacted(target.config)})

    async def _reload(self) -> HttpResponse:
        ok, message = await self._target.reload("admin request")
        generation = self._target.generation
        if ok:
            return _json(200, {"status": "applied", "generation": generation, "message": message})
        return _json(400, {"error": message, "generation": generation})
