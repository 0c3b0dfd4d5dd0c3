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
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1.health import aio as health_aio

from backend.grpc_health_service import add_health
from backend.http_server import HttpServer, json_error_body
from gateway.accesslog import AccessLog
from gateway.admin import Admin
from gateway.auth import Authenticator
from gateway.config import GatewayConfig
from gateway.config_watch import watch_config
from gateway.fleet import FleetSection
from gateway.grpc_descriptors import DescriptorError, served_pool
from gateway.grpc_edge import GrpcEdge, add_reflection, set_serving
from gateway.guard import Guard
from gateway.http_edge import Edge
from gateway.metrics import GatewayMetrics
from gateway.ratelimit import RateLimiter
from gateway.reloading import (
    READ_ERRORS,
    Lifecycle,
    ReadConfig,
    read_config,
    reload_config,
)
from gateway.routes import RouteTable
from gateway.shared_buckets import SharedBuckets
from gateway.snapshot import Snapshot
from gateway.tls import GrpcCertificates, switching_context
from gateway.upstream import Upstreams

log = logging.getLogger("tfgate.gateway")


class StartupError(Exception):
    """The gateway cannot start: bad config, unusable certificate, or a port it cannot bind."""


class Gateway:
    def __init__(self, config_path: Path, *, metrics: GatewayMetrics | None = None,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic,
                 watch_file: bool = True, access_log: AccessLog | None = None, reuse_port: bool = False,
                 rate_store: SharedBuckets | None = None) -> None:
        self.config_path = config_path
        self.access_log = access_log or AccessLog.to_stdout()
        self.metrics = metrics or GatewayMetrics()
        self.access_log.on_drop = self.metrics.access_lines_dropped
        self._rng = rng or random.Random()
        self._clock = clock
        self._watch_file = watch_file
        self._reuse_port = reuse_port  # a worker of gateway/primary.py: the port is shared with the other workers
        self._rate_store = rate_store  # ... and so are the rate limits' buckets
        self.upstreams = Upstreams(self.metrics, self._rng, clock)
        self._limiter: RateLimiter | None = None  # made with the first config; reconfigured, never replaced
        self._snapshot: Snapshot | None = None
        self._declared: tuple[GatewayConfig, ssl.SSLContext, Authenticator] | None = None  # the config as written
        self._fleet = FleetSection(self._fleet_changed, self.metrics, self._rng, clock)
        self._reload_lock = asyncio.Lock()
        self._edge_server: HttpServer | None = None
        self._grpc_server: grpc.aio.Server | None = None
        self._grpc_edge: GrpcEdge | None = None
        self._grpc_certificates: GrpcCertificates | None = None
        self._grpc_health: health_aio.HealthServicer | None = None
        self.grpc_port = 0  # once listening, when listen.grpc is set
        self._admin_server: HttpServer | None = None
        self._watchers: list[asyncio.Task[object]] = []
        # Serving once the edge listens, not while the fleet loads.
        self._lifecycle = Lifecycle(self._watchers, self.reload)

    @property
    def snapshot(self) -> Snapshot:
        assert self._snapshot is not None, "the gateway has not started"
        return self._snapshot

    @property
    def generation(self) -> int:
        return self.snapshot.generation

    @property
    def config(self) -> GatewayConfig:
        """The config as the operator wrote it (the snapshot's also holds the fleet's workers)."""
        assert self._declared is not None, "the gateway has not started"
        return self._declared[0]

    @property
    def authenticator(self) -> Authenticator:
        return self.snapshot.authenticator

    async def backends_document(self) -> dict[str, Any]:
        """GET /admin/backends: every pool's backends, and the fleet's workers when there is a fleet."""
        document: dict[str, Any] = {"pools": self.upstreams.describe(self._clock())}
        fleet = self._fleet.describe()
        if fleet is not None:
            document["fleet"] = fleet
        return document

    async def exposition(self) -> tuple[bytes, str]:
        return self.metrics.exposition()

    @property
    def ready(self) -> bool:
        return self._lifecycle.ready

    @property
    def https_port(self) -> int:
        assert self._edge_server is not None
        return self._edge_server.port

    @property
    def admin_port(self) -> int:
        assert self._admin_server is not None
        return self._admin_server.port

    async def start(self) -> None:
        await self._lifecycle.starting(self._start())

    async def _start(self) -> None:
        try:
            config, context, authenticator = await asyncio.to_thread(read_config, self.config_path)
        except READ_ERRORS as error:
            raise StartupError(str(error)) from None
        descriptors = None
        if config.listen.grpc is not None:  # before anything starts: a broken install stops the start at once
            try:
                descriptors = await asyncio.to_thread(served_pool)
            except DescriptorError as error:
                raise StartupError(f"gRPC reflection: {error}") from None
        self._limiter = RateLimiter(config.rate_limits, store=self._rate_store)
        self._install(config, context, authenticator, generation=1)
        try:
            await self._fleet.apply(config)
        except ValueError as error:  # the plan does not fit: e.g. too many workers for the port range
            raise StartupError(f"fleet: {error}") from None
        limits = config.limits
        guard = Guard(self._limiter, self.metrics, self._clock)
        edge = Edge(self, self.upstreams, guard, self.metrics, self.access_log, self._rng, self._clock)
        admin = Admin(self)
        self._admin_server = HttpServer(admin.handle, max_body_bytes=64 * 1024,
                                        header_timeout_s=limits.header_timeout_s, error_body=json_error_body)
        self._edge_server = HttpServer(edge.handle, max_body_bytes=limits.max_body_bytes,
                                       header_timeout_s=limits.header_timeout_s,
                                       keepalive_timeout_s=limits.idle_timeout_s, error_body=json_error_body,
                                       screen=edge.screen)
        try:
            await self._admin_server.start(config.listen.admin.host, config.listen.admin.port)
            await self._fleet.wait_ready()
            await self._edge_server.start(config.listen.https.host, config.listen.https.port,
                                          switching_context(lambda: self.snapshot.tls), reuse_port=self._reuse_port)
            if descriptors is not None:
                await self._start_grpc(config, guard, descriptors)
            self._lifecycle.serving.set()
        except (OSError, RuntimeError) as error:  # gRPC reports a port it cannot bind as RuntimeError
            await self.stop(0)
            raise StartupError(f"cannot listen: {error}") from None
        if self._watch_file:
            watcher = asyncio.create_task(watch_config(self.config_path, self.reload), name="config watcher")
            self._watchers.append(watcher)
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
        members = self._fleet.members(config)
        pools = {**config.pools, **{name: dataclasses.replace(config.pools[name],
                                                             backends=config.pools[name].backends + backends)
                                    for name, backends in members.items()}}
        return dataclasses.replace(config, pools=pools) if members else config

    def _fleet_changed(self) -> None:
        """A worker joined or left: the same config, with the fleet's members as they are now (applied at once)."""
        if self._snapshot is not None:
            self._swap(self._snapshot.generation)

    async def reload(self, reason: str) -> tuple[bool, str]:
        """Apply the config file as it is now; (applied, message). See the module docstring."""
        async with self._reload_lock:
            return await reload_config(self.config_path, self.config, self.generation, reason, self.metrics,
                                       self._fleet, self._install_next)

    async def _install_next(self, read: ReadConfig) -> str:
        if self._grpc_certificates is not None:  # the files were just read and checked: read them for gRPC too
            await asyncio.to_thread(self._grpc_certificates.update, read[0].tls)
        generation = self.generation + 1
        self._install(*read, generation)
        return f"generation {generation} applied"

    async def _start_grpc(self, config: GatewayConfig, guard: Guard, descriptors: DescriptorPool) -> None:
        """The gRPC listener (gateway/grpc_edge.py) with the same certificates, health and server reflection.
        SO_REUSEPORT only as a worker of gateway/primary.py: elsewhere a second gateway on the same port must fail,
        not share it silently. Messages up to limits.max_body_bytes, as REST bodies (gRPC's default is 4 MB): set
        here once, so a reload that raises the limit reaches gRPC at the next start; one that lowers it applies at
        once (grpc_edge checks each request against the live snapshot)."""
        assert config.listen.grpc is not None
        self._grpc_edge = GrpcEdge(self, self.upstreams, guard, self.metrics, self.access_log, self._rng,
                                   self._clock)
        self._grpc_server = grpc.aio.server(handlers=[self._grpc_edge], options=[
            ("grpc.so_reuseport", int(self._reuse_port)),
            ("grpc.max_receive_message_length", config.limits.max_body_bytes)])
        self._grpc_health = add_health(self._grpc_server)
        add_reflection(self._grpc_server, descriptors)
        self._grpc_certificates = GrpcCertificates(config.tls)
        self.grpc_port = self._grpc_server.add_secure_port(str(config.listen.grpc),
                                                           self._grpc_certificates.credentials)
        await self._grpc_server.start()
        await set_serving(self._grpc_health, True)

    async def stop(self, grace_s: float) -> None:
        """Graceful stop; see the module docstring."""
        self._lifecycle.stopping = True
        if self._grpc_health is not None:
            await set_serving(self._grpc_health, False)  # health checkers stop sending first, as /readyz does
        drains = [self._edge_server.shutdown(grace_s)] if self._edge_server is not None else []
        if self._grpc_server is not None:
            drains.append(self._grpc_server.stop(grace_s))
        await asyncio.gather(*drains)
        if self._grpc_edge is not None:
            await self._grpc_edge.close()
        watchers = list(self._watchers)
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        if self._admin_server is not None:
            await self._admin_server.shutdown(0)
        await self._fleet.stop()
        await self.upstreams.close()
        await self.access_log.close()
        self._lifecycle.remove()
