"""Shared fixtures: the demo models (built once by the project's own script), real backend subprocesses, and what
the gateway's end-to-end tests run against."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from backend.demo_models import ensure_demo_models
from bench.backend_process import BackendProcess
from bench.delay_proxy import DelayProxy
from gateway.certs import CertPaths, write_dev_certs
from tests.gateway_support import MODEL


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


# ---- the gateway's end-to-end tests: certificates, two real backends (started once), a delay proxy before each


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return write_dev_certs(tmp_path_factory.mktemp("certs"), hosts=["localhost", "127.0.0.1"])


@pytest.fixture(scope="session")
def backends(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[BackendProcess]]:
    """Two real backends serving half_plus_two v1 and v2 (labels stable = 1, canary = 2)."""
    work = tmp_path_factory.mktemp("backends")
    config = write_model_config(work / "models.config", [
        f"name: '{MODEL}' base_path: '{demo_models / MODEL}' model_platform: 'tensorflow' "
        "model_version_policy { all {} } version_labels { key: 'stable' value: 1 } "
        "version_labels { key: 'canary' value: 2 }"])
    started = [BackendProcess([f"--model_config_file={config}"], work / f"backend-{i}.log").start() for i in range(2)]
    try:
        yield [backend.wait_ready() for backend in started]
    finally:
        for backend in started:
            backend.stop()


@pytest.fixture
async def proxies(backends: list[BackendProcess]) -> AsyncIterator[list[DelayProxy]]:
    """One delay proxy per backend: the gateway sees them as its backends."""
    started = [await DelayProxy("127.0.0.1", backend.rest_port).start() for backend in backends]
    yield started
    for proxy in started:
        await proxy.close()
