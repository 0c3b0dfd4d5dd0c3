"""Shared fixtures: the demo models (built once by the project's own script) and real backend subprocesses."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests

from backend.demo_models import ensure_demo_models

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def demo_models() -> Path:
    return ensure_demo_models()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Backend:
    """A real `python -m backend` process on loopback ports; its log is kept for assertions and failures."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.rest_port = free_port()
        self.grpc_port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "wb")
        command = [sys.executable, "-m", "backend", f"--port={self.grpc_port}",
                   f"--rest_api_port={self.rest_port}", "--bind_address=127.0.0.1", *args]
        self.process = subprocess.Popen(command, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.url = f"http://127.0.0.1:{self.rest_port}"

    def wait_ready(self, timeout_s: float = 90.0) -> Backend:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"backend exited with {self.process.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.rest_port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"backend not ready after {timeout_s}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, timeout=30)

    def post(self, path: str, body: object | bytes) -> requests.Response:
        if isinstance(body, (bytes, str)):
            return requests.post(self.url + path, data=body, timeout=30)
        return requests.post(self.url + path, json=body, timeout=30)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture
def start_backend(tmp_path: Path) -> Iterator:
    """Start backends with the given flags; each is stopped (SIGTERM) at the end of the test."""
    started: list[Backend] = []

    def start(*args: str, wait: bool = True) -> Backend:
        backend = Backend(list(args), tmp_path / f"backend-{len(started)}.log")
        started.append(backend)
        return backend.wait_ready() if wait else backend

    yield start
    for backend in started:
        backend.stop()


def copy_versions(demo_models: Path, model: str, destination: Path, versions: list[str]) -> Path:
    """A private base path holding some versions of a demo model, for tests that change it on disk."""
    destination.mkdir(parents=True, exist_ok=True)
    for version in versions:
        shutil.copytree(demo_models / model / version, destination / version)
    return destination


def write_model_config(path: Path, entries: list[str]) -> Path:
    path.write_text("model_config_list {\n" + "\n".join(f"  config {{ {entry} }}" for entry in entries) + "\n}\n")
    return path
