"""`workers: 2` for real: a primary and two gateway worker processes on one TLS port in front of real backends.
Rate limits hold across workers, one reload (admin call or SIGHUP) reaches every worker, `/metrics` and
`/admin/backends` add up the workers, a killed worker is restarted, and SIGTERM leaves no process."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from bench.backend_process import BackendProcess, free_port
from bench.proxies import ADMIN_KEY, GatewayProcess, gateway_config
from gateway.certs import CertPaths
from gateway.keys import digest
from tests.gateway_support import MODEL
from tests.process_support import alive, children, wait_for

PREDICT = f"/v1/models/{MODEL}:predict"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
KEY = "tfg_workers-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def start_workers(tmp_path: Path, certs: CertPaths,
                  backends: list[BackendProcess]) -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def start(**overrides: Any) -> GatewayProcess:
        document = gateway_config(certs, [f"127.0.0.1:{b.rest_port}" for b in backends], "least_latency",
                                  free_port(), free_port(), workers=2)
        document["auth"] = {"api_keys": [{"name": "client", "sha256": digest(KEY)}],
                            "admin_keys": [{"name": "bench", "sha256": digest(ADMIN_KEY)}]}
        document.update(overrides)
        work = tmp_path / f"gateway-{len(started)}"
        work.mkdir()
        gateway = GatewayProcess(document, work, work / "access.log")
        started.append(gateway)
        return gateway.start().wait_ready(timeout_s=90)

    yield start
    for gateway in started:
        gateway.stop()


def predict_on_new_connection(gateway: GatewayProcess, certs: CertPaths) -> requests.Response:
    """Each call a new TCP connection, so the kernel picks a worker each time."""
    return requests.post(f"https://localhost:{gateway.https_port}{PREDICT}", json={"instances": [2.0]},
                         headers={**AUTH, "Connection": "close"}, verify=str(certs.ca_cert), timeout=10)


def test_two_workers_serve_one_port_and_rate_limits_hold_across_them(
        start_workers: Callable[..., GatewayProcess], certs: CertPaths) -> None:
    gateway = start_workers(rate_limits={"default": {"per_second": 0.5, "burst": 6}})
    assert gateway.process is not None
    workers = wait_for(lambda: len(c := children(gateway.process.pid)) == 2 and c, 10, "two worker processes")
    statuses = [predict_on_new_connection(gateway, certs).status_code for _ in range(24)]
    # One shared bucket of 6 (+ at most a couple refilled at 0.5/s): per-worker buckets would admit up to 12.
    assert 6 <= statuses.count(200) <= 8 and statuses.count(429) >= 16, statuses
    metrics = requests.get(f"{gateway.admin}/metrics", timeout=10).text
    allowed = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("tfgate_gateway_rate_limit_decisions_total{") and 'result="allowed"' in line)
    assert allowed == statuses.count(200)
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "metrics"], input=metrics, capture_output=True, text=True,
                               check=False)
        assert check.returncode == 0, check.stderr + check.stdout
    document = requests.get(f"{gateway.admin}/admin/backends", headers=ADMIN, timeout=10).json()
    assert document["workers"] == 2
    assert sum(b["requests"] for b in document["pools"]["backends"]) == statuses.count(200)
    gateway.process.send_signal(signal.SIGTERM)
    assert gateway.process.wait(timeout=60) == 0
    assert not [pid for pid in workers if alive(pid)]


def test_a_reload_reaches_every_worker(start_workers: Callable[..., GatewayProcess], certs: CertPaths) -> None:
    """The file watcher also reloads on each write, so generations are compared, not counted: each step waits for
    what every new connection sees (the kernel picks a worker per connection)."""
    gateway = start_workers()
    assert all(predict_on_new_connection(gateway, certs).status_code == 200 for _ in range(6))
    document = yaml.safe_load(gateway.config_path.read_text())
    document["routes"] = [{"model": "other", "pool": "backends"}]
    gateway.config_path.write_text(yaml.safe_dump(document))
    reload = requests.post(f"{gateway.admin}/admin/reload", headers=ADMIN, timeout=30)
    assert reload.status_code == 200 and reload.json()["generation"] >= 2, reload.text
    assert [predict_on_new_connection(gateway, certs).status_code for _ in range(12)] == [404] * 12
    settled = wait_for(lambda: _stable_generation(gateway), 30, "the file watcher's reload too")
    assert gateway.process is not None
    gateway.process.send_signal(signal.SIGHUP)  # the file as it is: a new generation, pushed to every worker
    wait_for(lambda: generation(gateway) == settled + 1, 30, "the SIGHUP reload")
    assert [predict_on_new_connection(gateway, certs).status_code for _ in range(12)] == [404] * 12
    document["routes"] = [{"model": "*", "pool": "backends"}]
    gateway.config_path.write_text(yaml.safe_dump(document))
    wait_for(lambda: generation(gateway) > settled + 1, 30, "the file change's reload")
    assert [predict_on_new_connection(gateway, certs).status_code for _ in range(12)] == [200] * 12
    gateway.config_path.write_text("pools: [")
    bad = requests.post(f"{gateway.admin}/admin/reload", headers=ADMIN, timeout=30)
    assert bad.status_code == 400 and "still serving generation" in bad.json()["error"]
    assert predict_on_new_connection(gateway, certs).status_code == 200
    # Each worker logs the reloads the primary pushed to it, and says which worker it is.
    pushed = re.findall(r"\[worker (\d+)\]: config reload \(admin request\)", gateway.log())
    assert set(pushed) == {"0", "1"}, gateway.log_tail()


def generation(gateway: GatewayProcess) -> int:
    return int(requests.get(f"{gateway.admin}/admin/config", headers=ADMIN, timeout=10).json()["generation"])


def _stable_generation(gateway: GatewayProcess) -> int | None:
    """The generation, once no reload has changed it for a second (the watcher debounces for 0.2 s)."""
    before = generation(gateway)
    time.sleep(1.0)
    return before if generation(gateway) == before else None


def test_a_killed_worker_is_restarted(start_workers: Callable[..., GatewayProcess], certs: CertPaths) -> None:
    gateway = start_workers()
    assert gateway.process is not None
    first = wait_for(lambda: len(c := children(gateway.process.pid)) == 2 and c, 10, "two worker processes")
    os.kill(first[0], signal.SIGKILL)
    wait_for(lambda: len(c := children(gateway.process.pid)) == 2 and first[0] not in c, 30, "a new worker")
    wait_for(lambda: requests.get(f"{gateway.admin}/admin/backends", headers=ADMIN, timeout=10).json()[
        "workers"] == 2, 30, "the new worker serving")
    assert all(predict_on_new_connection(gateway, certs).status_code == 200 for _ in range(10))
