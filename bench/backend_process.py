"""A server subprocess on free loopback ports, for benchmarks that need a real one: `python -m backend`, or any
`python -m MODULE` that serves HTTP on the port it is given (bench.keras_baseline).

Guarantee: leaving the `with` block ends the process — SIGTERM, then SIGKILL after a grace period — whether the
block finished, raised, or was interrupted by Ctrl-C (a second Ctrl-C while waiting skips to the kill). The child
runs in its own session, so a terminal's Ctrl-C reaches only the benchmark, which then stops the server in order
instead of both racing to shut down. The servers open their ports only once every model is loaded, so an accepted
TCP connection means ready; a server that exits first raises ServerExited, with its log.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Iterator, Self, Sequence

from gateway.up import demo_model_config

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


# Ports this process has handed out: never handed out twice, since callers bind them only later.
_handed_out: set[int] = set()


def free_port_range(count: int) -> int:
    """A first port with `count` free ports from it (checked by binding them all, at random places), below the
    system's ephemeral range. The servers bind their ports seconds after this check (a backend loads TensorFlow and its
    models first; a one-process gateway waits for its fleet), and a port in the ephemeral range could be taken
    meanwhile by any connection's local end or port-0 listener on the machine: seen in a full suite as a backend's
    "Failed to bind to address 127.0.0.1:45505". Below it, only another program picking ports the same way can."""
    end = _ephemeral_start()
    for _ in range(200):
        first = 20000 + int.from_bytes(os.urandom(2), "big") % (end - count - 20000)
        ports = range(first, first + count)
        if _handed_out.intersection(ports):
            continue
        sockets: list[socket.socket] = []
        try:
            for port in ports:
                sockets.append(socket.socket())
                sockets[-1].bind((HOST, port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        _handed_out.update(ports)
        return first
    raise RuntimeError(f"no {count} free consecutive ports")


def free_port() -> int:
    return free_port_range(1)


def _ephemeral_start() -> int:
    """Where the ports the kernel hands out itself begin (Linux's default, 32768, when unknown); 50000 when that
    leaves too little room above 20000."""
    try:
        start = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        start = 32768
    return start if start >= 24000 else 50000


class ServerExited(RuntimeError):
    """The server process ended before it was ready; `log` is everything it wrote."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(message)
        self.log = log


class ServerProcess:
    """`python -m MODULE ARGS...`, a server whose arguments include the REST port chosen for it (`rest_port`)."""

    def __init__(self, module: str, args: Sequence[str], rest_port: int, log_path: Path,
                 stop_grace_s: float = 15.0) -> None:
        self.module = module
        self.rest_port = rest_port
        self._command = [sys.executable, "-m", module, *args]
        self._log_path = log_path
        self._stop_grace_s = stop_grace_s
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.rest_port}"

    def __enter__(self) -> Self:
        return self.start()

    def start(self) -> Self:
        """Start the process and return at once, so the caller can do other set-up while the models load."""
        with open(self._log_path, "wb") as log:
            self.process = subprocess.Popen(self._command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True,
                                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    def wait_ready(self, timeout_s: float = 120.0) -> Self:
        assert self.process is not None, "start() it first, or use it as a context manager"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerExited(f"{self.module} exited with {self.process.returncode}:\n{self.log_tail()}",
                                   self.log())
            try:
                with socket.create_connection((HOST, self.rest_port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.module} not ready after {timeout_s:g} s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        """Stop the process (if started) and return its exit code."""
        process = self.process
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        process.terminate()
        try:
            process.wait(timeout=self._stop_grace_s)
        except subprocess.TimeoutExpired:
            pass
        finally:  # also reached on a KeyboardInterrupt during the wait
            if process.poll() is None:
                process.kill()
                process.wait()
        return process.returncode

    def log(self) -> str:
        return self._log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log()[-chars:]


class BackendProcess(ServerProcess):
    """`python -m backend` with `flags`, on free loopback ports for REST and gRPC."""

    def __init__(self, flags: Sequence[str], log_path: Path, stop_grace_s: float = 15.0) -> None:
        rest_port, self.grpc_port = free_port(), free_port()
        super().__init__("backend", [f"--port={self.grpc_port}", f"--rest_api_port={rest_port}",
                                     f"--bind_address={HOST}", *flags], rest_port, log_path, stop_grace_s)


@contextmanager
def demo_backend(models_dir: Path) -> Iterator[BackendProcess]:
    """A backend serving every demo model, as `tfgate up` does; started, not yet ready."""
    with tempfile.TemporaryDirectory(prefix="tfgate-bench-") as workdir:
        config = Path(workdir) / "models.config"
        config.write_text(demo_model_config(models_dir))
        with BackendProcess([f"--model_config_file={config}"], Path(workdir) / "backend.log") as backend:
            yield backend
