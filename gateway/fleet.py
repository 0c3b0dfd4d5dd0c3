"""The fleet supervisor: the backend processes the gateway starts itself, one per GPU (or a few CPU workers), kept
running and joined to their pool only while ready.

How it works: `start()` detects GPUs and plans the workers (gateway/fleet_plan.py); each worker gets a slot with one
task that keeps it running:
- start `python -m backend` with the worker's environment (`CUDA_VISIBLE_DEVICES` pins it to its GPU), in its own
  session so a terminal's Ctrl-C reaches only the gateway, and with a parent-death signal so it cannot outlive a
  gateway that was killed; its stdout and stderr go to a rotated log file. Its port pair is held by the fleet from
  the moment it is chosen until the process has exited (gateway/fleet_ports.py; a pair another program holds a port
  of is skipped), so the ports are still free when the backend binds them, once its models are loaded;
- poll its readiness path until it answers 200 (it exits, or `ready_timeout_s` passes: a crash); once ready, the
  worker joins the pool (`on_change` makes the gateway build a new snapshot from `backends()`; where that happens
  later, in other processes, it returns a future of when it has: a process leaving waits for that before its stop);
- when it exits unasked, it leaves the pool at once and is started again after the restart policy's backoff
  (gateway/restart_policy.py); a crash loop is given up: the worker stays `failed` until a config change;
- when `reconfigure()` changes a worker (flags, files, GPU), a rolling change replaces one worker at a time: the
  replacement starts on another port pair and joins once ready, then the old process leaves the pool and is stopped
  (SIGTERM lets it finish what it has, SIGKILL after `stop_grace_s`), so capacity never drops.
`stop()` takes every worker out of the pool first, then stops all processes in parallel.

Guarantees: no task or process outlives `stop()` (a process still starting included); `backends()` lists only
processes that answered ready and have not exited since; no two processes of the fleet, one stopping included, are
given a port in common.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import logging.handlers
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gateway.config import Backend, GatewayConfig, HostPort
from gateway.config_fleet import FleetConfig
from gateway.devices import Gpu, detect_gpus, run_command
from gateway.fleet_plan import Worker, plan_workers, port_flags
from gateway.fleet_ports import FleetPorts, PortLease
from gateway.metrics import GatewayMetrics, WorkerState
from gateway.restart_policy import RestartPolicy
from gateway.upstream_http import HttpPool, UpstreamError

log = logging.getLogger("tfgate.fleet")

HOST = "127.0.0.1"
_POLL_S = 0.2
_LEAVE_TIMEOUT_S = 10.0
_PROBE_TIMEOUT_S = 2.0
# Called when the set of serving workers changed; None once the gateway applied it, or a future of when it has.
MembershipListener = Callable[[], "asyncio.Future[None] | None"]
_PR_SET_PDEATHSIG = 1


@dataclass(eq=False)
class _Process:
    """One backend process: where it listens, and whether it answered ready."""

    process: asyncio.subprocess.Process
    pair: int
    rest: HostPort
    grpc: HostPort
    spec: tuple[object, ...]  # what it was started with: a different spec means replace it
    pump: asyncio.Task[None]
    ports: PortLease  # released once the process has exited
    ready: bool = False


@dataclass(eq=False)
class _Slot:
    """One worker of the plan, over its processes' lifetimes."""

    worker: Worker
    spec: tuple[object, ...]  # what the worker should run with now
    policy: RestartPolicy
    log: logging.Handler
    state: WorkerState = "starting"
    current: _Process | None = None
    replacement: _Process | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class Fleet:
    def __init__(self, config: FleetConfig, *, health_path: str, on_change: MembershipListener,
                 metrics: GatewayMetrics, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic, environ: Mapping[str, str] | None = None,
                 run: Callable[[Sequence[str]], str | None] = run_command, cpu_count: int | None = None) -> None:
        self.config = config
        self._health_path = health_path
        self._on_change = on_change
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._clock = clock
        self._environ = dict(os.environ if environ is None else environ)
        self._run = run
        self._cpu_count = cpu_count or os.cpu_count() or 1
        self._slots: list[_Slot] = []
        self._ports = FleetPorts(HOST)
        self._roll = asyncio.Lock()  # one replacement at a time across the fleet
        self._stopping = False

    # ---- the gateway's view -------------------------------------------------------------------------------------

    def backends(self) -> tuple[Backend, ...]:
        """The processes that serve: ready, not exited, not being stopped."""
        serving = []
        for slot in self._slots:
            for process in (slot.current, slot.replacement):
                if process is not None and process.ready:
                    serving.append(Backend(rest=process.rest, grpc=process.grpc))
        return tuple(serving)

    def describe(self) -> list[dict[str, object]]:
        """GET /admin/backends: each worker with its GPU, process and restarts."""
        workers: list[dict[str, object]] = []
        for slot in self._slots:
            process = slot.current
            gpu = slot.worker.gpu
            workers.append({
                "worker": slot.worker.index, "state": slot.state,
                "gpu": None if gpu is None else {"index": gpu.index, "name": gpu.name, "uuid": gpu.uuid},
                "pid": None if process is None else process.process.pid,
                "rest": None if process is None else str(process.rest),
                "grpc": None if process is None else str(process.grpc),
                "restarts": slot.policy.restarts, "log": str(self._log_path(slot.worker.index)),
                "cuda_visible_devices": slot.worker.env.get("CUDA_VISIBLE_DEVICES"),
            })
        return workers

    async def wait_ready(self, timeout_s: float) -> bool:
        """Until every worker is ready or given up; False when `timeout_s` passes first."""
        deadline = self._clock() + timeout_s
        while any(slot.state not in ("ready", "failed") for slot in self._slots):
            if self._clock() >= deadline:
                return False
            await asyncio.sleep(_POLL_S)
        return True

    # ---- lifecycle ----------------------------------------------------------------------------------------------

    async def start(self, reserved_ports: Collection[int] = ()) -> None:
        """Plan and start the workers; ValueError when the plan does not fit (see plan_workers)."""
        workers = await self._plan(self.config, reserved_ports)
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        gpus = [worker.gpu for worker in workers if worker.gpu is not None]
        log.info("fleet: %d %s worker(s) for pool %s%s", len(workers), "GPU" if gpus else "CPU", self.config.pool,
                 "".join(f"; worker {w.index} on GPU {w.gpu.index} ({w.gpu.name})" for w in workers if w.gpu))
        for worker in workers:
            self._add_slot(worker)

    async def reconfigure(self, config: FleetConfig, reserved_ports: Collection[int] = ()) -> None:
        """Apply a changed `fleet:` section: changed workers roll one at a time, new ones start, extra ones stop."""
        workers = await self._plan(config, reserved_ports)
        old_config, self.config = self.config, config
        config.log_dir.mkdir(parents=True, exist_ok=True)
        for slot, worker in zip(self._slots, workers):
            spec = self._spec(worker)
            if spec != slot.spec:
                slot.worker, slot.spec = worker, spec
                slot.policy = self._policy()  # a new spec gets a fresh start, even after a crash loop
                slot.changed.set()
        for worker in workers[len(self._slots):]:
            self._add_slot(worker)
        extra = self._slots[len(workers):]
        del self._slots[len(workers):]
        self._on_change()  # the pool may have another name now
        await asyncio.gather(*(self._retire_slot(slot, old_config) for slot in extra))

    async def stop(self) -> None:
        """Every worker leaves the pool, then every process stops (in parallel); no task is left."""
        self._stopping = True
        slots, self._slots = self._slots, []
        self._on_change()
        await asyncio.gather(*(self._retire_slot(slot, self.config) for slot in slots))
        self._ports.close()  # every process has exited: nothing holds a lease any more

    # ---- one worker ---------------------------------------------------------------------------------------------

    def _add_slot(self, worker: Worker) -> None:
        handler = logging.handlers.RotatingFileHandler(self._log_path(worker.index), maxBytes=self.config.log_max_bytes,
                                                       backupCount=self.config.log_backups, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        slot = _Slot(worker=worker, spec=self._spec(worker), policy=self._policy(), log=handler)
        slot.task = asyncio.create_task(self._supervise(slot), name=f"fleet worker {worker.index}")
        self._slots.append(slot)
        self._set_state(slot, "starting")

    async def _retire_slot(self, slot: _Slot, config: FleetConfig) -> None:
        assert slot.task is not None
        slot.task.cancel()
        await asyncio.gather(slot.task, return_exceptions=True)
        processes = [p for p in (slot.current, slot.replacement) if p is not None]
        slot.current = slot.replacement = None
        await asyncio.gather(*(self._terminate(p, config.stop_grace_s) for p in processes))
        self._set_state(slot, "stopped")
        slot.log.close()

    async def _supervise(self, slot: _Slot) -> None:
        """Keep `slot` running its latest spec (see the module docstring); ends only by cancellation."""
        while True:
            if slot.current is None:
                slot.current = await self._start_ready(slot)
                if slot.current is None:
                    await self._after_crash(slot)
                else:
                    self._joined(slot)
                continue
            running = slot.current
            exited = asyncio.ensure_future(running.process.wait())
            changed = asyncio.ensure_future(slot.changed.wait())
            try:
                await asyncio.wait((exited, changed), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in (exited, changed):
                    waiter.cancel()
            if running.process.returncode is not None:
                await self._crashed(slot, running)
                await self._after_crash(slot)
            elif slot.changed.is_set():
                slot.changed.clear()
                if running.spec != slot.spec:
                    await self._replace(slot, running)

    async def _replace(self, slot: _Slot, old: _Process) -> None:
        """A rolling change of one worker: the replacement serves before the old process stops."""
        async with self._roll:
            log.info("fleet: worker %d rolls to its new config", slot.worker.index)
            slot.replacement = await self._start_ready(slot)
            if slot.replacement is not None:
                slot.current, slot.replacement = slot.replacement, None
                self._joined(slot)
                await self._terminate(old, self.config.stop_grace_s)
                return
        log.error("fleet: worker %d's replacement did not become ready; the old process keeps serving",
                  slot.worker.index)
        if await self._backoff(slot):
            slot.changed.set()  # try the replacement again
        else:
            log.error("fleet: worker %d keeps its old config until the next change", slot.worker.index)
        self._set_state(slot, "ready")

    def _joined(self, slot: _Slot) -> None:
        assert slot.current is not None
        log.info("fleet: worker %d (pid %d) ready on %s, joins pool %s", slot.worker.index, slot.current.process.pid,
                 slot.current.rest, self.config.pool)
        self._set_state(slot, "ready")
        self._on_change()

    async def _crashed(self, slot: _Slot, process: _Process) -> None:
        slot.current = None
        process.ready = False
        process.ports.release()
        self._on_change()
        await asyncio.gather(process.pump, return_exceptions=True)
        log.error("fleet: worker %d (pid %d) exited with %s; see %s", slot.worker.index, process.process.pid,
                  exit_text(process.process.returncode), self._log_path(slot.worker.index))

    async def _after_crash(self, slot: _Slot) -> None:
        """Wait out the backoff, or, once the policy gave up, until a config change revives the worker."""
        if not await self._backoff(slot):
            await slot.changed.wait()
            slot.changed.clear()

    async def _backoff(self, slot: _Slot) -> bool:
        delay = slot.policy.on_exit(self._clock(), self._rng)
        if delay is None:
            log.error("fleet: worker %d keeps crashing; given up until its config changes", slot.worker.index)
            self._set_state(slot, "failed")
            return False
        self._metrics.fleet_restarted(pool=self.config.pool, worker=str(slot.worker.index))
        if slot.current is None:
            self._set_state(slot, "backoff")
        log.info("fleet: worker %d starts again in %.1f s", slot.worker.index, delay)
        await asyncio.sleep(delay)
        return True

    async def _start_ready(self, slot: _Slot) -> _Process | None:
        """Start a process for `slot` and wait until it is ready; None when it exits or times out first. Cancelled
        meanwhile (the worker is retired), it stops the process it started: the caller never saw it."""
        if slot.current is None:
            self._set_state(slot, "starting")
        try:
            process = await self._spawn(slot)
        except OSError as error:
            log.error("fleet: cannot start worker %d: %s", slot.worker.index, error)
            return None
        try:
            return await self._wait_ready(slot, process)
        except asyncio.CancelledError:
            await self._terminate(process, self.config.stop_grace_s)
            raise

    async def _wait_ready(self, slot: _Slot, process: _Process) -> _Process | None:
        slot.policy.on_started(self._clock())
        deadline = self._clock() + self.config.ready_timeout_s
        while process.process.returncode is None and self._clock() < deadline:
            if await self._answers_ready(process.rest):
                process.ready = True
                return process
            try:
                await asyncio.wait_for(asyncio.shield(process.process.wait()), _POLL_S)
            except TimeoutError:
                pass
        if process.process.returncode is None:
            log.error("fleet: worker %d not ready after %.0f s; stopping it", slot.worker.index,
                      self.config.ready_timeout_s)
            await self._terminate(process, self.config.stop_grace_s)
        else:
            process.ports.release()
            await asyncio.gather(process.pump, return_exceptions=True)
            log.error("fleet: worker %d (pid %d) exited with %s before it was ready; see %s", slot.worker.index,
                      process.process.pid, exit_text(process.process.returncode), self._log_path(slot.worker.index))
        return None

    async def _spawn(self, slot: _Slot) -> _Process:
        # Before the first await: a sibling spawning meanwhile sees the lease (so does one whose process is stopping).
        lease, choice = self._ports.lease(self.config.base_port, slot.worker.index, len(self._slots))
        for busy in choice.skipped:
            log.warning("fleet: %s in use by another program; worker %d takes a free pair no other worker owns",
                        f"port {busy[0]} is" if len(busy) == 1 else f"ports {' and '.join(map(str, busy))} are",
                        slot.worker.index)
        command = [sys.executable, "-m", "backend", *port_flags(self.config.base_port, choice.pair),
                   f"--bind_address={HOST}", *self._file_flags(), *slot.worker.flags]
        env = {**self._environ, **slot.worker.env, "PYTHONUNBUFFERED": "1"}
        try:
            child = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=die_with_parent)
        except BaseException:
            lease.release()
            raise
        pinned = " ".join(f"{name}={value}" for name, value in slot.worker.env.items())
        _write(slot.log, f"---- tfgate fleet: worker {slot.worker.index} pid {child.pid} started: {pinned} "
                         f"{' '.join(command)}")
        assert child.stdout is not None
        pump = asyncio.create_task(_pump(child.stdout, slot.log), name=f"fleet worker {slot.worker.index} log")
        return _Process(child, choice.pair, HostPort(HOST, lease.rest), HostPort(HOST, lease.grpc), slot.spec, pump,
                        lease)

    async def _terminate(self, process: _Process, grace_s: float) -> None:
        """Out of the pool first, then SIGTERM (the backend drains), SIGKILL after the grace."""
        if process.ready:
            process.ready = False
            applied = None if self._stopping else self._on_change()
            if applied is not None:  # the gateway's processes stop sending to it before it stops
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(applied), _LEAVE_TIMEOUT_S)
        child = process.process
        if await stop_process(child, grace_s):
            log.warning("fleet: pid %d did not stop within %.0f s; killed it", child.pid, grace_s)
        process.ports.release()
        await asyncio.gather(process.pump, return_exceptions=True)

    async def _answers_ready(self, rest: HostPort) -> bool:
        """One readiness probe, with the client the gateway's own health checks use."""
        probe = HttpPool(rest.host, rest.port, connect_timeout_s=_PROBE_TIMEOUT_S)
        try:
            response = await probe.request("GET", self._health_path, [("host", str(rest))], b"", _PROBE_TIMEOUT_S)
        except UpstreamError:
            return False
        finally:
            await probe.close()
        return response.status == 200

    # ---- helpers ------------------------------------------------------------------------------------------------

    async def _plan(self, config: FleetConfig, reserved_ports: Collection[int]) -> tuple[Worker, ...]:
        if config.gpus == "none":
            gpus: tuple[Gpu, ...] = ()
        else:
            environ = self._environ if config.gpus == "auto" else {
                "CUDA_VISIBLE_DEVICES": ",".join(str(index) for index in config.gpus)}
            gpus = await asyncio.to_thread(detect_gpus, self._run, environ)
        return plan_workers(gpus, cpu_count=self._cpu_count, cpu_replicas=config.replicas,
                            base_port=config.base_port, extra_flags=config.flags, reserved_ports=reserved_ports)

    def _file_flags(self) -> list[str]:
        flags = [f"--model_config_file={self.config.model_config_file}"]
        if self.config.batching_parameters_file is not None:
            flags += ["--enable_batching", f"--batching_parameters_file={self.config.batching_parameters_file}"]
        return flags

    def _spec(self, worker: Worker) -> tuple[object, ...]:
        return (worker.gpu, tuple(worker.env.items()), worker.flags, tuple(self._file_flags()), self.config.base_port)

    def _policy(self) -> RestartPolicy:
        restart = self.config.restart
        return RestartPolicy(initial_s=restart.initial_s, max_s=restart.max_s,
                             crash_loop_restarts=restart.crash_loop_restarts,
                             crash_loop_window_s=restart.crash_loop_window_s, healthy_after_s=restart.healthy_after_s)

    def _log_path(self, index: int) -> Path:
        return self.config.log_dir / f"fleet-{index}.log"

    def _set_state(self, slot: _Slot, state: WorkerState) -> None:
        slot.state = state
        self._metrics.fleet_state(pool=self.config.pool, worker=str(slot.worker.index), state=state)


async def _pump(stream: asyncio.StreamReader, handler: logging.Handler) -> None:
    """Copy the process's output into its rotated log file, line by line, until it closes."""
    while line := await stream.readline():
        _write(handler, line.decode("utf-8", "replace").rstrip("\n"))


def _write(handler: logging.Handler, line: str) -> None:
    handler.handle(logging.makeLogRecord({"msg": line, "levelno": logging.INFO}))


async def stop_process(child: asyncio.subprocess.Process, within_s: float) -> bool:
    """SIGTERM (the process drains), then SIGKILL if it has not exited within `within_s`; True if it was killed.
    A process that has exited already is left as it is."""
    if child.returncode is not None:
        return False
    child.terminate()
    try:
        await asyncio.wait_for(asyncio.shield(child.wait()), within_s)
    except TimeoutError:
        child.kill()
        await child.wait()
        return True
    return False


def exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"status {code}"


def die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when the gateway dies, even by SIGKILL (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def local_ports(config: GatewayConfig) -> frozenset[int]:
    """The ports the rest of `config` uses on this host, which the fleet's loopback workers must leave alone: the
    gateway's listeners (on loopback or every address) and pool backends on loopback."""
    listen = config.listen
    listeners = [listen.https, listen.admin, *([listen.grpc] if listen.grpc is not None else [])]
    backends = [address for pool in config.pools.values() for backend in pool.backends
                for address in (backend.rest, backend.grpc) if address is not None]
    return frozenset({address.port for address in listeners if _is_local(address.host, wildcard=True)}
                     | {address.port for address in backends if _is_local(address.host, wildcard=False)})


def _is_local(host: str, wildcard: bool) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.") or (wildcard and host in ("0.0.0.0", "::", ""))


class FleetSection:
    """The fleet a gateway runs as its config's `fleet:` section says: none, started, changed or stopped on each
    apply. Shared by the one-process gateway (gateway/app.py) and the primary of several (gateway/primary.py)."""

    def __init__(self, on_change: MembershipListener, metrics: GatewayMetrics, rng: random.Random,
                 clock: Callable[[], float]) -> None:
        self.fleet: Fleet | None = None
        self._on_change = on_change
        self._metrics = metrics
        self._rng = rng
        self._clock = clock

    async def apply(self, config: GatewayConfig) -> None:
        """Start, change or stop the fleet; a change rolls in the background. ValueError: the plan does not fit."""
        if config.fleet is None:
            if self.fleet is not None:
                fleet, self.fleet = self.fleet, None
                self._on_change()
                await fleet.stop()
        elif self.fleet is None:
            pool = config.pools[config.fleet.pool]
            self.fleet = Fleet(config.fleet, health_path=pool.health_check.path, on_change=self._on_change,
                               metrics=self._metrics, rng=self._rng, clock=self._clock)
            await self.fleet.start(local_ports(config))
        else:
            await self.fleet.reconfigure(config.fleet, local_ports(config))

    def members(self, config: GatewayConfig) -> dict[str, tuple[Backend, ...]]:
        """The fleet's ready workers by the pool they join ({} without a fleet)."""
        if self.fleet is None or config.fleet is None:
            return {}
        return {config.fleet.pool: self.fleet.backends()}

    def describe(self) -> dict[str, object] | None:
        """For GET /admin/backends; None without a fleet."""
        if self.fleet is None:
            return None
        return {"pool": self.fleet.config.pool, "workers": self.fleet.describe()}

    async def wait_ready(self) -> None:
        """Before serving: until every worker is ready or given up, within the fleet's ready timeout."""
        fleet = self.fleet
        if fleet is None:
            return
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

    async def stop(self) -> None:
        if self.fleet is not None:
            await self.fleet.stop()
