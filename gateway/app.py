"""The gateway process: the edge and admin listeners, the upstream pools, and config reloads.

Lifecycle (start in order, stop in reverse): read and validate the config (a bad one stops the start with its
message) → build the first snapshot → start health checks → listen (admin, then the TLS edge) → watch the config
file and SIGHUP. `stop()`: not ready → stop accepting and drain in-flight requests within the grace → stop the
watchers → close the pools. No task outlives it.

Reloads (file change, SIGHUP, `POST /admin/reload`) run one at a time: the file is read and validated, and the TLS
context built, off the event loop; then the new snapshot replaces the old in one assignment. Backends present in
both keep their connections, health and latency state. A bad config, unreadable certificate or a change of listen
address (which needs a restart) is rejected with one log line and the admin response, and the old snapshot keeps
serving. Requests in flight finish on the snapshot they started with.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import signal
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import watchfiles

from backend.http_server import HttpServer, json_error_body
from gateway.accesslog import AccessLog
from gateway.admin import Admin
from gateway.auth import AuthConfigError, Authenticator
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.fleet import Fleet
from gateway.guard import Guard
from gateway.http_edge import Edge
from gateway.metrics import GatewayMetrics
from gateway.ratelimit import RateLimiter
from gateway.routes import RouteTable
from gateway.snapshot import Snapshot
from gateway.tls import TlsError, server_context, switching_context
from gateway.upstream import Upstreams

log = logging.getLogger("tfgate.gateway")


class StartupError(Exception):
    """The gateway cannot start: bad config, unusable certificate, or a port it cannot bind."""


class Gateway:
    def __init__(self, config_path: Path, *, metrics: GatewayMetrics | None = None,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic,
                 watch_file: bool = True, access_log: AccessLog | None = None) -> None:
        self.config_path = config_path
        self.access_log = access_log or AccessLog.to_stdout()
        self.metrics = metrics or GatewayMetrics()
        self._rng = rng or random.Random()
        self._clock = clock
        self._watch_file = watch_file
        self.upstreams = Upstreams(self.metrics, self._rng, clock)
        self._limiter: RateLimiter | None = None  # made with the first config; reconfigured, never replaced
        self._snapshot: Snapshot | None = None
        self._declared: tuple[GatewayConfig, ssl.SSLContext, Authenticator] | None = None  # the config as written
        self.fleet: Fleet | None = None
        self._reload_lock = asyncio.Lock()
        self._edge_server: HttpServer | None = None
        self._admin_server: HttpServer | None = None
        self._watchers: list[asyncio.Task[object]] = []
        self._stopping = False
        self._serving = False  # the edge listens (not yet while the fleet loads)

    @property
    def snapshot(self) -> Snapshot:
        assert self._snapshot is not None, "the gateway has not started"
        return self._snapshot

    @property
    def ready(self) -> bool:
        return self._serving and not self._stopping

    @property
    def https_port(self) -> int:
        assert self._edge_server is not None
        return self._edge_server.port

    @property
    def admin_port(self) -> int:
        assert self._admin_server is not None
        return self._admin_server.port

    async def start(self) -> None:
        try:
            config, context, authenticator = await asyncio.to_thread(_read, self.config_path)
        except (ConfigError, TlsError, AuthConfigError) as error:
            raise StartupError(str(error)) from None
        self._limiter = RateLimiter(config.rate_limits)
        self._install(config, context, authenticator, generation=1)
        try:
            await self._apply_fleet(config)
        except ValueError as error:  # the plan does not fit: e.g. too many workers for the port range
            raise StartupError(f"fleet: {error}") from None
        limits = config.limits
        guard = Guard(self._limiter, self.metrics, self._clock)
        edge = Edge(self, self.upstreams, guard, self.metrics, self.access_log, self._rng, self._clock)
        admin = Admin(self, self.upstreams, self.metrics, self._clock)
        self._admin_server = HttpServer(admin.handle, max_body_bytes=64 * 1024,
                                        header_timeout_s=limits.header_timeout_s, error_body=json_error_body)
        self._edge_server = HttpServer(edge.handle, max_body_bytes=limits.max_body_bytes,
                                       header_timeout_s=limits.header_timeout_s,
                                       keepalive_timeout_s=limits.idle_timeout_s, error_body=json_error_body)
        try:
            await self._admin_server.start(config.listen.admin.host, config.listen.admin.port)
            if self.fleet is not None:
                await self._wait_for_fleet(self.fleet)
            await self._edge_server.start(config.listen.https.host, config.listen.https.port,
                                          switching_context(lambda: self.snapshot.tls))
            self._serving = True
        except OSError as error:
            await self.stop(0)
            raise StartupError(f"cannot listen: {error}") from None
        if self._watch_file:
            self._watchers.append(asyncio.create_task(self._watch(), name="config watcher"))
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)
        except (RuntimeError, ValueError):  # not the main thread: SIGHUP reloads only work in the process's main loop
            pass
        log.info("tfgate gateway: https on %s:%d, admin on http://%s:%d, config %s", config.listen.https.host,
                 self.https_port, config.listen.admin.host, self.admin_port, self.config_path)

    def _install(self, config: GatewayConfig, context: ssl.SSLContext, authenticator: Authenticator,
                 generation: int) -> None:
        self._declared = (config, context, authenticator)
        self._swap(generation)
        assert self._limiter is not None
        self._limiter.reconfigure(config.rate_limits)
        if authenticator.misconfigured:
            log.error("every request will get 401: %s", authenticator.misconfigured)
        if self._edge_server is not None:
            self._edge_server.set_limits(max_body_bytes=config.limits.max_body_bytes,
                                         header_timeout_s=config.limits.header_timeout_s,
                                         keepalive_timeout_s=config.limits.idle_timeout_s)

    def _swap(self, generation: int) -> None:
        """Build the snapshot of the declared config plus the fleet's ready workers, and make it the live one."""
        assert self._declared is not None
        declared, context, authenticator = self._declared
        config = self._with_fleet(declared)
        pools = self.upstreams.build(config)
        self._snapshot = Snapshot(generation=generation, config=config, routes=RouteTable(config.routes),
                                  pools=pools, tls=context, authenticator=authenticator)
        self.upstreams.apply(pools, config.limits.request_timeout_s)

    def _with_fleet(self, config: GatewayConfig) -> GatewayConfig:
        if self.fleet is None or config.fleet is None:
            return config
        pool = config.pools[config.fleet.pool]
        pools = {**config.pools, pool.name: dataclasses.replace(pool, backends=pool.backends + self.fleet.backends())}
        return dataclasses.replace(config, pools=pools)

    def _fleet_changed(self) -> None:
        """A worker joined or left: the same config, with the fleet's members as they are now."""
        if self._snapshot is not None:
            self._swap(self._snapshot.generation)

    async def _apply_fleet(self, config: GatewayConfig) -> None:
        """Start, change or stop the fleet as `config` says; a change rolls in the background (gateway/fleet.py)."""
        if config.fleet is None:
            if self.fleet is not None:
                fleet, self.fleet = self.fleet, None
                self._fleet_changed()
                await fleet.stop()
        elif self.fleet is None:
            pool = config.pools[config.fleet.pool]
            self.fleet = Fleet(config.fleet, health_path=pool.health_check.path, on_change=self._fleet_changed,
                               metrics=self.metrics, rng=self._rng, clock=self._clock)
            await self.fleet.start()
        else:
            await self.fleet.reconfigure(config.fleet)

    async def _wait_for_fleet(self, fleet: Fleet) -> None:
        log.info("waiting for the fleet's workers to load their models (up to %.0f s) ...",
                 fleet.config.ready_timeout_s)
        started = self._clock()
        if await fleet.wait_ready(fleet.config.ready_timeout_s):
            states = [worker["state"] for worker in fleet.describe()]
            log.info("fleet: %d of %d worker(s) ready after %.1f s", states.count("ready"), len(states),
                     self._clock() - started)
        else:
            log.warning("fleet: not every worker is ready after %.0f s; serving with those that are",
                        fleet.config.ready_timeout_s)

    def describe_fleet(self) -> dict[str, object] | None:
        """The fleet's workers for GET /admin/backends; None without a fleet."""
        if self.fleet is None:
            return None
        return {"pool": self.fleet.config.pool, "workers": self.fleet.describe()}

    async def reload(self, reason: str) -> tuple[bool, str]:
        """Apply the config file as it is now; (applied, message). See the module docstring."""
        async with self._reload_lock:
            current = self.snapshot
            try:
                config, context, authenticator = await asyncio.to_thread(_read, self.config_path)
                if config.listen != current.config.listen:
                    raise ConfigError(f"listen: changed from {_listen(current.config)} to {_listen(config)}; "
                                      "a new listen address needs a restart")
                if config.tls.client_cert != current.config.tls.client_cert:
                    # The listener's TLS context keeps the verify mode it started with (OpenSSL does not take it
                    # from the context a connection switches to), so this change would not apply: refuse it.
                    raise ConfigError("tls.client_cert: asking clients for certificates (or not) needs a restart")
            except (ConfigError, TlsError, AuthConfigError) as error:
                self.metrics.reloaded(False)
                log.error("config reload (%s) rejected, still serving generation %d: %s", reason,
                          current.generation, error)
                return False, f"config rejected, still serving generation {current.generation}: {error}"
            try:
                await self._apply_fleet(config)
            except ValueError as error:
                self.metrics.reloaded(False)
                log.error("config reload (%s) rejected, still serving generation %d: fleet: %s", reason,
                          current.generation, error)
                return False, f"config rejected, still serving generation {current.generation}: fleet: {error}"
            self._install(config, context, authenticator, current.generation + 1)
            self.metrics.reloaded(True)
            log.info("config reload (%s): generation %d applied from %s", reason, current.generation + 1,
                     self.config_path)
            return True, f"generation {current.generation + 1} applied"

    def _on_sighup(self) -> None:
        task = asyncio.create_task(self.reload("SIGHUP"), name="SIGHUP reload")
        self._watchers.append(task)
        task.add_done_callback(self._watchers.remove)

    async def _watch(self) -> None:
        """Reload when the config file changes; watches its directory, since editors replace files by rename."""
        target = self.config_path.resolve()
        async for changes in watchfiles.awatch(target.parent, debounce=200, step=50,
                                               watch_filter=lambda _change, path: Path(path).resolve() == target):
            if changes and target.exists():
                await self.reload("file changed")

    async def stop(self, grace_s: float) -> None:
        """Graceful stop; see the module docstring."""
        self._stopping = True
        try:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        except (RuntimeError, ValueError):
            pass
        if self._edge_server is not None:
            await self._edge_server.shutdown(grace_s)
        watchers = list(self._watchers)
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        if self._admin_server is not None:
            await self._admin_server.shutdown(0)
        if self.fleet is not None:
            await self.fleet.stop()
        await self.upstreams.close()
        self.access_log.flush()


def _read(path: Path) -> tuple[GatewayConfig, ssl.SSLContext, Authenticator]:
    """Everything a snapshot needs from files: off the event loop, since it reads the config, certificates and JWKS."""
    config = load_config(path)
    return config, server_context(config.tls), Authenticator.from_config(config.auth)


def _listen(config: GatewayConfig) -> str:
    return f"https {config.listen.https}, admin {config.listen.admin}"
