"""`workers: N` (N > 1): a primary process and N gateway worker processes sharing the TLS port.

How it works: the primary reads and checks the config, binds the https port with SO_REUSEPORT without listening
(so port 0 resolves once, and the port stays theirs while a worker restarts), runs the fleet, and starts N workers:
`python -m gateway` on a worker config derived from the operator's (`gateway.config.worker_document`: one process,
that exact port, the fleet's ready members as plain backends, an admin API on a free loopback port, the primary's
own admin key). Each worker is a whole one-process gateway (gateway/app.py) listening with SO_REUSEPORT, so the
kernel spreads connections over them, and keeping its token buckets in one shared file (gateway/shared_buckets.py),
so a rate limit holds across workers. A worker writes its admin port to a file once it serves.

The primary owns what must be one: the admin API (its `/metrics` and `/admin/backends` merge every worker's,
gateway/merge.py), reloads (file change, SIGHUP, `POST /admin/reload`: checked once, then the worker config is
rewritten and every worker reloads it), the fleet (a member joining or leaving rewrites the worker config and
reloads the workers), and the workers themselves (a worker that exits is restarted with the fleet's backoff).

Stop: SIGTERM to every worker (each drains its in-flight requests within the grace), then the admin API, the
fleet, and the shared files. No task or process outlives `stop()`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from backend.http_server import HttpServer, json_error_body
from gateway.admin import Admin
from gateway.auth import Authenticator
from gateway.config import AdminKey, GatewayConfig, HostPort, worker_document
from gateway.config_watch import watch_config
from gateway.fleet import FleetSection, die_with_parent, exit_text, stop_process
from gateway.fleet_ports import reserve_shared_port
from gateway.keys import digest
from gateway.merge import merge_backends, merge_expositions
from gateway.metrics import GatewayMetrics
from gateway.reloading import (
    READ_ERRORS,
    Lifecycle,
    ReadConfig,
    read_config,
    reload_config,
)
from gateway.restart_policy import RestartPolicy
from gateway.shared_buckets import SharedBuckets
from gateway.upstream_http import HttpPool, UpstreamError

log = logging.getLogger("tfgate.gateway")

_WORKER_READY_TIMEOUT_S = 60.0
_ADMIN_CALL_TIMEOUT_S = 10.0
_POLL_S = 0.1
# The workers' own reload counters count the primary's pushes, not config reloads: the primary's count.
_PRIMARY_ONLY = ("tfgate_gateway_config_",)


class StartupError(Exception):
    """The primary cannot start: bad config, a port it cannot bind, or workers that do not come up."""


@dataclass(eq=False)
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    admin: HttpPool | None = None  # once it serves


class Primary:
    def __init__(self, config_path: Path, workers: int, grace_s: float, *, metrics: GatewayMetrics | None = None,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config_path = config_path
        self.metrics = metrics or GatewayMetrics()
        self._grace_s = grace_s
        self._rng = rng or random.Random()
        self._clock = clock
        self._workers = [_Worker(index) for index in range(workers)]
        self._fleet = FleetSection(self._members_changed, self.metrics, self._rng, clock)
        self._admin_key = "tfg_" + secrets.token_urlsafe(32)  # the primary's, to drive its workers' admin APIs
        self._read: ReadConfig | None = None
        self._generation = 0
        self._reload_lock = asyncio.Lock()
        self._push_needed = asyncio.Event()
        self._next_push: asyncio.Future[None] | None = None  # what the changes since the last push wait for
        self._tasks: list[asyncio.Task[Any]] = []  # watchers, the pusher, SIGHUP reloads
        self._keepers: list[asyncio.Task[None]] = []  # one per worker process
        self._run_dir: Path | None = None
        self._buckets: SharedBuckets | None = None
        self._reserved: socket.socket | None = None
        self._https: HostPort | None = None
        self._reserved_grpc: socket.socket | None = None
        self._grpc: HostPort | None = None
        self._admin_server: HttpServer | None = None
        self._lifecycle = Lifecycle(self._tasks, self.reload)

    # ---- what the admin API and `tfgate up` read ------------------------------------------------------------------

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def config(self) -> GatewayConfig:
        assert self._read is not None, "the primary has not started"
        return self._read[0]

    @property
    def authenticator(self) -> Authenticator:
        assert self._read is not None, "the primary has not started"
        return self._read[2]

    @property
    def ready(self) -> bool:
        return self._lifecycle.ready and any(w.admin is not None for w in self._workers)

    @property
    def https_port(self) -> int:
        assert self._https is not None
        return self._https.port

    @property
    def grpc_port(self) -> int:
        return 0 if self._grpc is None else self._grpc.port

    @property
    def admin_port(self) -> int:
        assert self._admin_server is not None
        return self._admin_server.port

    async def backends_document(self) -> dict[str, Any]:
        documents = [orjson.loads(body) for body in await self._ask_workers("GET", "/admin/backends")]
        document: dict[str, Any] = merge_backends(documents)
        fleet = self._fleet.describe()
        if fleet is not None:
            document["fleet"] = fleet
        return document

    async def exposition(self) -> tuple[bytes, str]:
        own, content_type = self.metrics.exposition()
        texts = [body.decode() for body in await self._ask_workers("GET", "/metrics")]
        return merge_expositions([own.decode(), *texts], first_only=_PRIMARY_ONLY).encode(), content_type

    # ---- lifecycle ------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._lifecycle.starting(self._start())

    async def _start(self) -> None:
        self._run_dir = Path(tempfile.mkdtemp(prefix="tfgate-primary-"))
        try:
            read = await asyncio.to_thread(read_config, self._stage())
        except (*READ_ERRORS, OSError) as error:
            await self.stop(0)
            raise StartupError(str(error)) from None
        self._accept(read)
        config = self.config
        self._generation = 1
        self._buckets = SharedBuckets.create(self._run_dir / "rate-limits")
        try:
            self._reserved, self._https = _reserve(config.listen.https)
            if config.listen.grpc is not None:
                self._reserved_grpc, self._grpc = _reserve(config.listen.grpc)
        except OSError as error:
            await self.stop(0)
            raise StartupError(f"cannot listen: {error}") from None
        admin = Admin(self)
        self._admin_server = HttpServer(admin.handle, max_body_bytes=64 * 1024,
                                        header_timeout_s=config.limits.header_timeout_s, error_body=json_error_body)
        try:
            await self._fleet.apply(config)
            await self._admin_server.start(config.listen.admin.host, config.listen.admin.port)
        except (OSError, ValueError) as error:
            await self.stop(0)
            raise StartupError(f"cannot start: {error}") from None
        await self._fleet.wait_ready()
        self._write_worker_config()
        watcher = asyncio.create_task(watch_config(self.config_path, self.reload), name="config watcher")
        self._tasks.append(watcher)  # before anyone is served: a change from now on is seen
        self._keepers = [asyncio.create_task(self._keep_running(worker), name=f"gateway worker {worker.index}")
                         for worker in self._workers]
        if not await self._workers_ready(_WORKER_READY_TIMEOUT_S):
            await self.stop(0)
            raise StartupError("the gateway workers did not start; see their log lines above")
        self._tasks.append(asyncio.create_task(self._push_forever(), name="worker config pusher"))
        self._lifecycle.serving.set()
        log.info("tfgate gateway: %d workers on https %s, admin on http://%s:%d, config %s", len(self._workers),
                 self._https, config.listen.admin.host, self.admin_port, self.config_path)

    async def stop(self, grace_s: float) -> None:
        self._lifecycle.stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(self._stop_worker(worker, grace_s) for worker in self._workers))
        await asyncio.gather(*self._keepers, return_exceptions=True)
        if self._admin_server is not None:
            await self._admin_server.shutdown(0)
        await self._fleet.stop()
        if self._buckets is not None:
            self._buckets.close()
        for reserved in (self._reserved, self._reserved_grpc):
            if reserved is not None:
                reserved.close()
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
        self._lifecycle.remove()

    # ---- reloads --------------------------------------------------------------------------------------------------

    async def reload(self, reason: str) -> tuple[bool, str]:
        async with self._reload_lock:
            try:
                staged = self._stage()
            except OSError as error:
                self.metrics.reloaded(False)
                return False, f"config rejected, still serving generation {self._generation}: {error}"
            return await reload_config(staged, self.config, self._generation, reason, self.metrics, self._fleet,
                                       self._install_next, shown_as=self.config_path)

    def _stage(self) -> Path:
        """A copy of the operator's file as it is now: what gets checked is exactly what the workers will get, even
        if the file changes meanwhile (relative paths in it still resolve against the working directory)."""
        assert self._run_dir is not None
        staged = self._run_dir / "candidate.yaml"
        staged.write_bytes(self.config_path.read_bytes())
        return staged

    def _accept(self, read: ReadConfig) -> None:
        """The staged copy passed: it is the config now (named after the operator's file, as they know it)."""
        assert self._run_dir is not None
        (self._run_dir / "candidate.yaml").replace(self._run_dir / "accepted.yaml")
        config, context, authenticator = read
        self._read = dataclasses.replace(config, source=str(self.config_path)), context, authenticator

    async def _install_next(self, read: ReadConfig) -> str:
        self._accept(read)
        refused = await self._push()
        self._generation += 1  # once the workers have it: a client that sees the generation sees the config
        applied = f"generation {self._generation} applied"
        return applied if not refused else f"{applied}; workers {refused} refused it (see their log lines)"

    def _members_changed(self) -> asyncio.Future[None]:
        """A fleet worker joined or left: the workers need the new member list (coalesced, in order). The future is
        done once a push that includes this change has reached the workers."""
        self._push_needed.set()
        if self._next_push is None:
            self._next_push = asyncio.get_running_loop().create_future()
        return self._next_push

    async def _push_forever(self) -> None:
        while True:
            await self._push_needed.wait()
            async with self._reload_lock:
                await self._push()

    async def _push(self) -> list[int]:
        """Rewrite the worker config and have every serving worker reload it; the workers that refused."""
        self._push_needed.clear()
        pushed, self._next_push = self._next_push, None  # changes from now on wait for the next push
        try:
            self._write_worker_config()
            serving = [worker for worker in self._workers if worker.admin is not None]
            answers = await asyncio.gather(*(self._call(worker, "POST", "/admin/reload") for worker in serving))
        finally:
            if pushed is not None and not pushed.done():
                pushed.set_result(None)
        return [worker.index for worker, answer in zip(serving, answers) if answer is None]

    def _write_worker_config(self) -> None:
        assert self._run_dir is not None and self._https is not None
        text = worker_document(self._run_dir / "accepted.yaml", https=self._https, grpc=self._grpc,
                               backends=self._fleet.members(self.config),
                               admin_key=AdminKey("tfgate-primary", digest(self._admin_key)))
        path = self._run_dir / "worker.yaml"
        staging = path.with_suffix(".tmp")
        staging.write_text(text)
        staging.replace(path)  # a worker (re)starting now reads a whole file, old or new

    async def _keep_running(self, worker: _Worker) -> None:
        """Start the worker, and again after it exits unasked (with backoff; a crash loop is given up)."""
        policy = RestartPolicy()
        while True:
            assert self._run_dir is not None and self._buckets is not None
            ready_file = self._run_dir / f"worker-{worker.index}.admin"
            ready_file.unlink(missing_ok=True)
            worker.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "--config", str(self._run_dir / "worker.yaml"),
                "--grace-s", f"{self._grace_s:g}", "--worker-ready-file", str(ready_file),
                "--shared-rate-limits", str(self._buckets.path), "--worker-index", str(worker.index),
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True, preexec_fn=die_with_parent)
            policy.on_started(self._clock())
            waiting = asyncio.create_task(self._admin_when_ready(worker, ready_file))
            code = await worker.process.wait()
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
            if worker.admin is not None:
                admin, worker.admin = worker.admin, None
                await admin.close()
            if self._lifecycle.stopping:
                return
            log.error("gateway worker %d (pid %d) exited with %s", worker.index, worker.process.pid, exit_text(code))
            delay = policy.on_exit(self._clock(), self._rng)
            if delay is None:
                log.error("gateway worker %d keeps crashing; not restarting it", worker.index)
                return
            await asyncio.sleep(delay)

    async def _admin_when_ready(self, worker: _Worker, ready_file: Path) -> None:
        while not ready_file.exists() or not ready_file.read_text().strip():
            await asyncio.sleep(_POLL_S)
        worker.admin = HttpPool("127.0.0.1", int(ready_file.read_text()), connect_timeout_s=_ADMIN_CALL_TIMEOUT_S)
        if self._lifecycle.serving.is_set():  # restarted: it may have read the worker config just before a change
            log.info("gateway worker %d is back", worker.index)
            self._push_needed.set()

    async def _workers_ready(self, timeout_s: float) -> bool:
        deadline = self._clock() + timeout_s
        while any(worker.admin is None for worker in self._workers):
            if self._clock() >= deadline or all(keeper.done() for keeper in self._keepers):
                return False
            await asyncio.sleep(_POLL_S)
        return True

    async def _stop_worker(self, worker: _Worker, grace_s: float) -> None:
        if worker.process is not None and await stop_process(worker.process, grace_s + 10):
            log.warning("gateway worker %d did not stop in time; killed it", worker.index)

    async def _call(self, worker: _Worker, method: str, path: str) -> bytes | None:
        """One call to a worker's admin API with the primary's key: the body of a 200, else None (logged)."""
        if worker.admin is None:
            return None
        headers = [("host", "127.0.0.1"), ("authorization", f"Bearer {self._admin_key}")]
        try:
            response = await worker.admin.request(method, path, headers, b"", _ADMIN_CALL_TIMEOUT_S)
        except UpstreamError as error:
            log.warning("gateway worker %d: %s %s failed: %s", worker.index, method, path, error)
            return None
        if response.status != 200:
            log.warning("gateway worker %d: %s %s answered %d: %s", worker.index, method, path, response.status,
                        bytes(response.body)[:300].decode(errors="replace"))
            return None
        return bytes(response.body)

    async def _ask_workers(self, method: str, path: str) -> list[bytes]:
        """The serving workers' answers to one admin call (a worker restarting right now is left out)."""
        bodies = await asyncio.gather(*(self._call(worker, method, path) for worker in self._workers))
        return [body for body in bodies if body is not None]


def _reserve(address: HostPort) -> tuple[socket.socket, HostPort]:
    sock = reserve_shared_port(address.host, address.port)
    return sock, HostPort(address.host, sock.getsockname()[1])


def worker_count(setting: int | str) -> int:
    """`workers:` as a number of processes: auto is one per core."""
    return (os.cpu_count() or 1) if setting == "auto" else int(setting)
