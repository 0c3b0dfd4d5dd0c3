"""One worker of a `--workers=N` backend (backend/workers.py), and how it answers for the whole backend.

The kernel hands each connection to any one worker, so what must describe or change the whole backend cannot stay
in one process. Each worker therefore serves a private API on a loopback port, written to `<dir>/worker-<i>.port`
once it serves, that answers only callers holding the group's token (given to the workers in their environment):
- `GET /metrics`: this worker's own Prometheus exposition. A scrape of the REST port answers with every worker's
  merged (gateway/merge.py: counters and histograms summed, gauges the largest), so it counts the whole backend.
- `POST /reload` (a serialized ModelServerConfig): apply it, as HandleReloadConfigRequest does. The worker that gets
  a HandleReloadConfigRequest applies it, keeps it in `<dir>/model-config.pb` (a worker restarted later starts from
  it rather than from its command line), then has every other worker apply it before it answers; a worker that
  refuses it makes the call fail, naming it. One such reload runs at a time in the group (a file lock). A worker
  that is restarting right now is not waited for: it starts from the kept config.

Nothing here imports TensorFlow: the parent process reads `WorkerRole` too.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hmac
import logging
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from backend import errors
from backend.http_server import HttpRequest, HttpResponse, HttpServer, json_error_body
from gateway.merge import merge_expositions

log = logging.getLogger(__name__)

ENV_DIR = "TFGATE_BACKEND_WORKER_DIR"
ENV_INDEX = "TFGATE_BACKEND_WORKER_INDEX"
ENV_TOKEN = "TFGATE_BACKEND_WORKER_TOKEN"
_SCRAPE_TIMEOUT = aiohttp.ClientTimeout(total=10)
_RELOAD_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10)  # a reload waits for its models to load
_PRIVATE_MAX_BODY_BYTES = 64 * 1024 * 1024
_GROUP_POLL_S = 0.05

Exposition = Callable[[], tuple[bytes, str]]
ApplyConfig = Callable[[bytes], Awaitable[None]]  # a serialized ModelServerConfig; raises errors.ServingError


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """Which worker this process is, of which group: set by the parent in the environment."""

    run_dir: Path
    index: int
    token: str

    @classmethod
    def new_group(cls, run_dir: Path) -> WorkerRole:
        """Worker 0 of a new group; `for_index` gives the others."""
        return cls(run_dir, 0, secrets.token_urlsafe(32))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerRole | None:
        if ENV_DIR not in env:
            return None
        return cls(Path(env[ENV_DIR]), int(env[ENV_INDEX]), env[ENV_TOKEN])

    def for_index(self, index: int) -> WorkerRole:
        return WorkerRole(self.run_dir, index, self.token)

    def env(self) -> dict[str, str]:
        return {ENV_DIR: str(self.run_dir), ENV_INDEX: str(self.index), ENV_TOKEN: self.token}

    @property
    def port_file(self) -> Path:
        """Written once the worker serves; gone while it is down."""
        return self.run_dir / f"worker-{self.index}.port"

    @property
    def loaded_file(self) -> Path:
        """Written once the worker loaded its models; gone while it is down."""
        return self.run_dir / f"worker-{self.index}.loaded"

    async def wait_for_group(self, workers: int, stop: asyncio.Event) -> bool:
        """Say this worker has loaded its models, and wait until every worker of the group has (False: stopped
        first). So the ports open when the whole backend can serve, not when its first worker can: a client that
        connects at once is spread over all the workers (a restarted worker finds the others loaded already)."""
        self.loaded_file.touch()
        while not all(self.for_index(index).loaded_file.exists() for index in range(workers)):
            if stop.is_set():
                return False
            await asyncio.sleep(_GROUP_POLL_S)
        return True

    @property
    def kept_config(self) -> Path:
        """The model config last applied by HandleReloadConfigRequest, if any."""
        return self.run_dir / "model-config.pb"


class Siblings:
    """This worker's private API, and its calls to the other workers'."""

    def __init__(self, role: WorkerRole, own_exposition: Exposition, apply_config: ApplyConfig) -> None:
        self._role = role
        self._own_exposition = own_exposition
        self._apply_config = apply_config
        self._server = HttpServer(self._handle, max_body_bytes=_PRIVATE_MAX_BODY_BYTES, error_body=json_error_body)
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def start(self) -> None:
        """Serve the private API, then say so in the port file: from now on the other workers call this one."""
        self._session = aiohttp.ClientSession(headers={"authorization": f"Bearer {self._role.token}"})
        await self._server.start("127.0.0.1", 0)
        staging = self._role.port_file.with_suffix(".tmp")
        staging.write_text(str(self._server.port))
        staging.replace(self._role.port_file)

    async def close(self) -> None:
        """Stop serving the other workers (who stop calling this one once the port file is gone); idempotent."""
        if self._closed:
            return
        self._closed = True
        self._role.port_file.unlink(missing_ok=True)
        await self._server.shutdown(0)
        if self._session is not None:
            await self._session.close()

    async def exposition(self) -> tuple[bytes, str]:
        """Every serving worker's metrics merged into one exposition; a worker that does not answer is left out."""
        own, content_type = self._own_exposition()
        answers = await asyncio.gather(*(self._call(port, "GET", "/metrics", b"", _SCRAPE_TIMEOUT)
                                         for port in self._other_ports().values()))
        texts = [own.decode(), *(body.decode() for ok, body in answers if ok)]
        for ok, body in answers:
            if not ok:
                log.warning("a worker's metrics are left out of this scrape: %s", body.decode(errors="replace"))
        return merge_expositions(texts).encode(), content_type

    async def reload_group(self, config: bytes) -> None:
        """HandleReloadConfigRequest: apply `config` here, keep it for restarts, and have every other worker apply it.
        One group-wide reload at a time (a file lock), so two reloads sent to two workers at once leave every worker
        with the same config: the one applied last."""
        async with self._group_lock():
            await self._apply_config(config)  # refused here: refused, and nobody else is asked
            await self._push_config(config)

    @contextlib.asynccontextmanager
    async def _group_lock(self) -> AsyncIterator[None]:
        lock = os.open(self._role.run_dir / "reload.lock", os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:  # another worker's reload: this one's loop keeps serving (its push too)
                    await asyncio.sleep(_GROUP_POLL_S)
            yield
        finally:
            os.close(lock)  # which releases the lock

    async def _push_config(self, config: bytes) -> None:
        staging = self._role.kept_config.with_suffix(".tmp")
        staging.write_bytes(config)
        staging.replace(self._role.kept_config)
        ports = self._other_ports()
        answers = await asyncio.gather(*(self._call(port, "POST", "/reload", config, _RELOAD_TIMEOUT)
                                         for port in ports.values()))
        refused = [f"worker {index}: {body.decode(errors='replace')}"
                   for index, (ok, body) in zip(ports, answers) if not ok]
        if refused:
            raise errors.Unknown(f"The config is applied by worker {self._role.index}, but not by every other worker "
                                 f"({'; '.join(refused)})")

    def _other_ports(self) -> dict[int, int]:
        """The other serving workers' private ports, by worker index."""
        ports = {}
        for path in self._role.run_dir.glob("worker-*.port"):
            index = int(path.stem.removeprefix("worker-"))
            if index != self._role.index:
                try:
                    ports[index] = int(path.read_text())
                except (OSError, ValueError):  # gone or being replaced: that worker is restarting
                    continue
        return ports

    async def _call(self, port: int, method: str, path: str, body: bytes,
                    timeout: aiohttp.ClientTimeout) -> tuple[bool, bytes]:
        """(True, body) for a 200; (False, why) otherwise. A worker that is gone counts as answered: it is
        restarting, and starts from the kept config."""
        assert self._session is not None, "start() first"
        try:
            async with self._session.request(method, f"http://127.0.0.1:{port}{path}", data=body,
                                             timeout=timeout) as response:
                answer = await response.read()
                return response.status == 200, answer
        except aiohttp.ClientConnectorError as error:
            return method == "POST", f"not serving (restarting): {error}".encode()
        except (aiohttp.ClientError, TimeoutError) as error:
            return False, str(error).encode()

    async def _handle(self, request: HttpRequest) -> HttpResponse:
        expected = f"Bearer {self._role.token}"
        if not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected.encode()):
            return HttpResponse(401, json_error_body(401, "this is a backend worker's private API"))
        if request.method == "GET" and request.path == "/metrics":
            body, content_type = self._own_exposition()
            return HttpResponse(200, body, content_type)
        if request.method == "POST" and request.path == "/reload":
            try:
                await self._apply_config(request.body)
            except errors.ServingError as error:
                return HttpResponse(error.http_status, error.message.encode(), "text/plain; charset=utf-8")
            return HttpResponse(200, b"{}")
        return HttpResponse(404, json_error_body(404, f"No such endpoint: {request.method} {request.path}"))

