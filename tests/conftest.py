"""Shared fixtures: the demo models (built once by the project's own script) and real backend subprocesses."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from backend.demo_models import ensure_demo_models
from bench.backend_process import BackendProcess


@pytest.fixture(scope="session")
def demo_models() -> Path:
    return ensure_demo_models()


class Backend(BackendProcess):
    """A real backend subprocess (see bench.backend_process) with the HTTP calls tests make."""

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, timeout=30)

    def post(self, path: str, body: Any) -> requests.Response:
        if isinstance(body, (bytes, str)):
            return requests.post(self.url + path, data=body, timeout=30)
        return requests.post(self.url + path, json=body, timeout=30)


@pytest.fixture
def start_backend(tmp_path: Path) -> Iterator:
    """Start backends with the given flags; each is stopped (SIGTERM) at the end of the test."""
    started: list[Backend] = []

    def start(*args: str, wait: bool = True) -> Backend:
        backend = Backend(list(args), tmp_path / f"backend-{len(started)}.log").start()
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
