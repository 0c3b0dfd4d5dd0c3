"""`--workers=N` with N > 1 (a tfgate addition): N backend processes serving the same ports.

Why: a backend process answers requests on one core at a time (its event loop parses and encodes them holding the
GIL), so one process leaves a multi-core CPU host's other cores to TensorFlow alone. N workers answer on N cores.
Each loads every model, so memory grows N-fold; batches form per worker.

How it works: this parent binds --port and --rest_api_port with SO_REUSEPORT without listening (a port another
program holds fails the start at once, and the ports stay the group's while a worker restarts), then starts N
`python -m backend` children with the same command line and their role in the environment (backend/siblings.py).
Each child is a whole backend: it loads every model, polls base paths and the config file itself, and listens on
the shared ports with SO_REUSEPORT, so the kernel spreads connections over the workers. The workers open the ports
only once all of them have loaded their models: as with one backend, an open port means the backend is ready. The
parent imports no TensorFlow. It restarts a worker that exits unasked (with the gateway fleet's backoff; a crash
loop is given up), and on SIGTERM/SIGINT sends SIGTERM to every worker, each of which drains its requests within
--grace_period_s.

As with one backend, the start fails (exit 1) if a worker exits before it serves: a bad flag, config or model.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from backend.flags import ServerFlags
from backend.siblings import WorkerRole
from gateway.fleet import die_with_parent, exit_text, stop_process
from gateway.fleet_ports import reserve_shared_port
from gateway.restart_policy import RestartPolicy

log = logging.getLogger("backend.workers")

_POLL_S = 0.1
_KILL_AFTER_GRACE_S = 10.0


class WorkerGroup:
    """The N worker processes of one backend, kept running until `stop` is set."""

    def __init__(self, argv: list[str], flags: ServerFlags, role: WorkerRole) -> None:
        self._argv = argv
        self._flags = flags
        self._roles = [role.for_index(index) for index in range(flags.workers)]
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._serving = False  # every worker has served once: from now on an exit is restarted
        self._stopping = False
        self._failure: str | None = None  # why the group failed: its first start, or every worker kept crashing

    async def run(self, stop: asyncio.Event) -> int:
        """Serve until `stop` is set (0), or until the first start fails or every worker kept crashing (1); while
        some worker still runs, the backend serves on it."""
        keepers = [asyncio.create_task(self._keep_running(role), name=f"backend worker {role.index}")
                   for role in self._roles]
        try:
            if await self._first_start(stop, keepers):
                self._serving = True
                log.info("%d backend workers serving (pids %s)", len(self._roles),
                         " ".join(str(process.pid) for process in self._processes.values()))
                stopped = asyncio.create_task(stop.wait())
                running = set(keepers)  # a keeper ends only when its worker kept crashing
                while running and not stopped.done():
                    done, _ = await asyncio.wait([stopped, *running], return_when=asyncio.FIRST_COMPLETED)
                    running -= done
                stopped.cancel()
                if not stop.is_set():
                    self._failure = "every backend worker kept crashing"
        finally:
            self._stopping = True
            await asyncio.gather(*(self._stop(index, process) for index, process in self._processes.items()))
            for keeper in keepers:
                keeper.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
        if self._failure is not None:
            log.error("%s", self._failure)
            return 1
        return 0

    async def _first_start(self, stop: asyncio.Event, keepers: list[asyncio.Task[None]]) -> bool:
        """Wait until every worker serves; False if stopped first or a worker exited first."""
        while not all(role.port_file.exists() for role in self._roles):
            if stop.is_set() or self._failure is not None or all(keeper.done() for keeper in keepers):
                return False
            await asyncio.sleep(_POLL_S)
        return True

    async def _keep_running(self, role: WorkerRole) -> None:
        """Start the worker, and again after it exits unasked once the group has served."""
        policy, rng = RestartPolicy(), random.Random()
        while True:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "backend", *self._argv, env={**os.environ, **role.env()},
                stdin=asyncio.subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
            self._processes[role.index] = process
            policy.on_started(time.monotonic())
            code = await process.wait()
            for gone in (role.port_file, role.loaded_file):  # it no longer serves, whatever it managed to clean up
                gone.unlink(missing_ok=True)
            if self._stopping:
                return
            if not self._serving:
                self._failure = f"backend worker {role.index} exited with {exit_text(code)} before serving"
                return
            log.error("backend worker %d (pid %d) exited with %s", role.index, process.pid, exit_text(code))
            delay = policy.on_exit(time.monotonic(), rng)
            if delay is None:
                log.error("backend worker %d keeps crashing; not restarting it", role.index)
                return
            await asyncio.sleep(delay)

    async def _stop(self, index: int, process: asyncio.subprocess.Process) -> None:
        if await stop_process(process, self._flags.grace_period_s + _KILL_AFTER_GRACE_S):
            log.warning("backend worker %d did not stop in time; killed it", index)


async def run_workers(argv: list[str], flags: ServerFlags) -> int:
    """The parent of a `--workers=N` backend: hold the ports, run the workers until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reserved: list[socket.socket] = []
    run_dir = Path(tempfile.mkdtemp(prefix="tfgate-backend-"))
    try:
        for flag, port in (("--port", flags.port), ("--rest_api_port", flags.rest_api_port)):
            if port:
                try:
                    reserved.append(reserve_shared_port(flags.bind_address, port))
                except OSError as error:
                    log.error("cannot serve on %s (%s): %s", port, flag, error.strerror or error)
                    return 1
        log.info("starting %d backend workers on %s", flags.workers,
                 " and ".join(f"{flags.bind_address}:{sock.getsockname()[1]}" for sock in reserved))
        return await WorkerGroup(argv, flags, WorkerRole.new_group(run_dir)).run(stop)
    finally:
        for sock in reserved:
            sock.close()
        shutil.rmtree(run_dir, ignore_errors=True)

