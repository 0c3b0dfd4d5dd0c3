"""The fleet for real: `python -m gateway` starting real backend processes (a fake `nvidia-smi` on PATH stands in for
GPUs), crash restarts under load, a crash loop given up, a rolling config change under load, and `tfgate up` from
its printed curl line to a SIGTERM that leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
import yaml
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from bench.backend_process import HOST, REPO, free_port_range
from bench.proxies import ADMIN_KEY, GatewayProcess, gateway_config
from gateway.certs import CertPaths
from tests.gateway_support import MODEL
from tests.process_support import alive, children, process_cmdline, process_environ, wait_for

PREDICT = f"/v1/models/{MODEL}:predict"
POOL = "backends"  # bench.proxies.gateway_config's one pool
BENCH_ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def fake_nvidia_smi(directory: Path, gpus: int) -> dict[str, str]:
    """An environment whose PATH finds an `nvidia-smi` listing `gpus` GPUs (0: one that fails, as on a machine
    without a driver); CUDA_VISIBLE_DEVICES is unset so detection reads the list."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = "\n".join(f"GPU {index}: NVIDIA Tesla T4 (UUID: GPU-{index:08d}-0000-0000-0000-000000000000)"
                      for index in range(gpus))
    script = directory / "nvidia-smi"
    script.write_text("#!/bin/sh\n" + (f"cat <<'EOF'\n{lines}\nEOF\n" if gpus else
                                       "echo 'NVIDIA-SMI has failed' >&2; exit 9\n"))
    script.chmod(0o755)
    env = {name: value for name, value in os.environ.items() if name != "CUDA_VISIBLE_DEVICES"}
    env["PATH"] = f"{directory}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture
def models_config(tmp_path: Path, demo_models: Path) -> Path:
    path = tmp_path / "models.config"
    path.write_text(f"model_config_list {{ config {{ name: '{MODEL}' base_path: '{demo_models / MODEL}' "
                    "model_platform: 'tensorflow' } }\n")
    return path


@pytest.fixture
def start_fleet(tmp_path: Path, certs: CertPaths, models_config: Path) -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def start(fleet: dict[str, Any], env: dict[str, str] | None = None, wait: bool = True,
              workers: int = 1) -> GatewayProcess:
        ports = free_port_range(2 + 12)  # the listeners, then the fleet's: up to 4 workers and a replacement
        document = gateway_config(certs, [], "least_latency", ports, ports + 1, workers=workers)
        document["pools"][POOL]["health_check"] = {"interval_s": 0.5}
        document["fleet"] = {"pool": POOL, "model_config_file": str(models_config), "gpus": "none", "replicas": 2,
                             "base_port": ports + 2, "log_dir": str(tmp_path / "logs"),
                             "stop_grace_s": 10, **fleet}
        work = tmp_path / f"gateway-{len(started)}"
        work.mkdir()
        gateway = GatewayProcess(document, work, work / "access.log", grace_s=2.0, env=env)
        started.append(gateway)
        gateway.start()
        if wait:
            gateway.wait_ready(timeout_s=180)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


class Load:
    """Clients predicting through the gateway in threads, until stopped; every answer's status is counted."""

    def __init__(self, gateway: GatewayProcess, ca: Path, clients: int = 4) -> None:
        self.statuses: Counter[int | str] = Counter()
        self._stop = threading.Event()
        self._url = f"https://localhost:{gateway.https_port}{PREDICT}"
        self._ca = ca
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _client(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                try:
                    response = session.post(self._url, json={"instances": [2.0]}, verify=str(self._ca), timeout=10)
                    status: int | str = response.status_code
                    if status != 200:
                        status = f"{status}: {response.text[:200]}"
                except requests.RequestException as error:
                    status = f"client error: {error}"
                self.statuses[status] += 1
                time.sleep(0.005)


@pytest.mark.parametrize("gpus", [2, 4])
def test_each_worker_is_pinned_to_one_gpu(start_fleet: Callable[..., GatewayProcess], tmp_path: Path,
                                          certs: CertPaths, gpus: int) -> None:
    env = fake_nvidia_smi(tmp_path / "bin", gpus)
    gateway = start_fleet({"gpus": "auto"}, env=env, wait=False)
    workers = wait_for(lambda: (w := _fleet_or_none(gateway)) and all(x["pid"] for x in w) and w, 60,
                       "every worker to have a process",
                       lambda: f"fleet: {_fleet_or_none(gateway)}\ngateway log:\n{gateway.log_tail()}")
    assert [w["gpu"]["index"] for w in workers] == list(range(gpus))
    assert all(w["gpu"]["name"] == "NVIDIA Tesla T4" for w in workers)
    for worker in workers:
        environ = process_environ(worker["pid"])
        assert environ["CUDA_VISIBLE_DEVICES"] == str(worker["gpu"]["index"]) == worker["cuda_visible_devices"]
        assert environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        command = process_cmdline(worker["pid"])
        share = max(1, (os.cpu_count() or 1) // gpus)
        assert f"--tensorflow_intra_op_parallelism={share}".encode() in command
    if gpus == 2:  # both serve: the pool balances over the two GPU workers
        gateway.wait_ready(timeout_s=180)
        with requests.Session() as session:
            for _ in range(20):
                response = session.post(f"https://localhost:{gateway.https_port}{PREDICT}",
                                        json={"instances": [2.0]}, verify=str(certs.ca_cert))
                assert response.status_code == 200 and response.json() == {"predictions": [4.0]}
        served = {b["rest"]: b["requests"] for b in gateway.backends()[POOL]}
        assert len(served) == 2 and all(count > 0 for count in served.values()), served
    pids = [w["pid"] for w in workers]
    assert gateway.process is not None
    gateway.process.send_signal(signal.SIGTERM)
    assert gateway.process.wait(timeout=60) == 0
    assert not [pid for pid in pids if alive(pid)]


def _fleet_or_none(gateway: GatewayProcess) -> list[dict[str, Any]] | None:
    try:
        return gateway.fleet()
    except OSError:
        return None


def fleet_diagnostics(gateway: GatewayProcess, workers: list[dict[str, Any]] | None = None,
                      chars: int = 8000) -> str:
    """What a fleet failure seen once in CI needs to explain itself: the workers as the admin API showed them, the
    fleet's lines of the gateway log (starts, exits, rolls, skipped ports) and the tail of each worker's own log (a
    backend's traceback, say a port it could not bind)."""
    workers = workers if workers is not None else _fleet_or_none(gateway) or []
    fleet_lines = [line for line in gateway.log().splitlines() if "tfgate.fleet" in line]
    parts = [f"fleet: {json.dumps(workers)}", "gateway log, fleet lines:", *fleet_lines[-60:]]
    for worker in workers:
        path = Path(worker["log"])
        tail = path.read_text(errors="replace")[-chars:] if path.exists() else "(no log file)"
        parts.append(f"---- tail of {path}:\n{tail}")
    return "\n".join(parts)


@pytest.mark.parametrize("gateway_workers", [1, 2])
def test_a_killed_worker_restarts_and_rejoins_with_no_failed_request(
        start_fleet: Callable[..., GatewayProcess], tmp_path: Path, certs: CertPaths, gateway_workers: int) -> None:
    env = fake_nvidia_smi(tmp_path / "bin", 0)  # nvidia-smi fails: CPU workers
    gateway = start_fleet({"gpus": "auto", "restart": {"initial_s": 0.5}}, env=env, workers=gateway_workers)
    workers = gateway.fleet()
    assert [(w["gpu"], w["cuda_visible_devices"]) for w in workers] == [(None, "-1")] * 2
    assert process_environ(workers[0]["pid"])["CUDA_VISIBLE_DEVICES"] == "-1"
    victim = workers[0]["pid"]
    with Load(gateway, certs.ca_cert) as load:
        wait_for(lambda: load.statuses[200] > 50, 30, "load to start")
        os.kill(victim, signal.SIGKILL)
        rejoined = wait_for(lambda: (w := gateway.fleet()[0])["state"] == "ready" and w["pid"] != victim and w,
                            120, "worker 0 to come back")
        wait_for(lambda: len(gateway.backends()[POOL]) == 2, 10, "worker 0 back in the pool")
        before = load.statuses[200]
        wait_for(lambda: load.statuses[200] > before + 50, 30, "more load after the restart")
    assert set(load.statuses) == {200}, load.statuses
    assert rejoined["restarts"] == 1
    served = {b["rest"]: b["requests"] for b in gateway.backends()[POOL]}
    assert served[rejoined["rest"]] > 0, served  # the restarted worker serves again
    metrics = requests.get(gateway.admin + "/metrics", timeout=10).text
    assert 'tfgate_fleet_worker_restarts_total{pool="backends",worker="0"} 1.0' in metrics
    assert 'tfgate_fleet_worker_state{pool="backends",state="ready",worker="0"} 1.0' in metrics


def test_a_port_another_program_holds_is_skipped(start_fleet: Callable[..., GatewayProcess],
                                                 certs: CertPaths) -> None:
    base = free_port_range(12)
    with socket.socket() as holder:  # worker 0's own REST port, as a stray listener (or a connection's end) holds it
        holder.bind((HOST, base + 1))
        holder.listen()
        gateway = start_fleet({"base_port": base})
        workers = gateway.fleet()
        assert [(w["state"], w["restarts"]) for w in workers] == [("ready", 0)] * 2, workers
        assert f"{HOST}:{base + 1}" not in {w["rest"] for w in workers}
        response = requests.post(f"https://localhost:{gateway.https_port}{PREDICT}", json={"instances": [2.0]},
                                 verify=str(certs.ca_cert), timeout=10)
        assert response.status_code == 200 and response.json() == {"predictions": [4.0]}
    warning = f"port {base + 1} is in use by another program; worker 0 takes a free pair no other worker owns"
    assert warning in gateway.log()


def test_a_crash_loop_is_given_up_and_reported(start_fleet: Callable[..., GatewayProcess], tmp_path: Path,
                                               certs: CertPaths) -> None:
    broken = tmp_path / "broken.config"
    broken.write_text("model_config_list { config { name: 'x' base_path: '/nonexistent' model_platform: 'pytorch' } }\n")
    gateway = start_fleet({"replicas": 1, "model_config_file": str(broken),
                           "restart": {"initial_s": 0.1, "max_s": 0.2, "crash_loop_restarts": 1}})
    (worker,) = gateway.fleet()
    assert worker["state"] == "failed" and worker["restarts"] == 1 and worker["pid"] is None
    response = requests.post(f"https://localhost:{gateway.https_port}{PREDICT}", json={"instances": [2.0]},
                             verify=str(certs.ca_cert), timeout=10)
    assert response.status_code == 503 and "error" in response.json()
    metrics = requests.get(gateway.admin + "/metrics", timeout=10).text
    assert 'tfgate_fleet_worker_state{pool="backends",state="failed",worker="0"} 1.0' in metrics
    log = (tmp_path / "logs" / "fleet-0.log").read_text()
    assert log.count("---- tfgate fleet: worker 0 pid") == 2 and "pytorch" in log
    assert "keeps crashing; given up" in gateway.log()


@pytest.mark.parametrize("gateway_workers", [1, 2])
def test_a_fleet_change_rolls_with_no_failed_request(start_fleet: Callable[..., GatewayProcess], certs: CertPaths,
                                                     gateway_workers: int) -> None:
    """With 2 gateway workers, each leaving backend waits until both workers stopped sending to it."""
    gateway = start_fleet({}, workers=gateway_workers)
    before = {w["worker"]: w["pid"] for w in gateway.fleet()}
    document = yaml.safe_load(gateway.config_path.read_text())
    document["fleet"]["flags"] = ["--rest_api_timeout_in_ms=20000"]
    with Load(gateway, certs.ca_cert) as load:
        wait_for(lambda: load.statuses[200] > 50, 30, "load to start")
        gateway.config_path.write_text(yaml.safe_dump(document))
        reload = requests.post(gateway.admin + "/admin/reload", headers=BENCH_ADMIN, timeout=30)
        assert reload.status_code == 200, reload.text
        rolled = wait_for(lambda: (w := gateway.fleet()) and all(x["state"] == "ready" and x["pid"] != before[
            x["worker"]] for x in w) and w, 180, "both workers to roll", lambda: fleet_diagnostics(gateway))
        wait_for(lambda: len(gateway.backends()[POOL]) == 2, 10, "the pool to hold just the new workers")
        done = load.statuses[200]
        wait_for(lambda: load.statuses[200] > done + 50, 30, "more load after the roll")
    assert set(load.statuses) == {200}, load.statuses
    wait_for(lambda: not [pid for pid in before.values() if alive(pid)], 30, "the old processes to stop")
    for worker in rolled:
        assert b"--rest_api_timeout_in_ms=20000" in process_cmdline(worker["pid"])
        assert worker["restarts"] == 0, fleet_diagnostics(gateway, rolled)
    assert {b["rest"] for b in gateway.backends()[POOL]} == {w["rest"] for w in rolled}


def test_a_replacement_s_ports_are_the_fleet_s_while_it_loads(start_fleet: Callable[..., GatewayProcess]) -> None:
    """A backend binds its ports only once its models are loaded, seconds after the fleet chose them: another program
    (a port-0 listener, or an outgoing connection's local end: the ports may lie in the ephemeral range) that took
    one meanwhile made the replacement exit and the worker restart. The fleet holds them from the choice on."""
    gateway = start_fleet({"replicas": 1})
    (old,) = gateway.fleet()
    document = yaml.safe_load(gateway.config_path.read_text())
    document["fleet"]["flags"] = ["--rest_api_timeout_in_ms=20000"]
    gateway.config_path.write_text(yaml.safe_dump(document))
    reload = requests.post(gateway.admin + "/admin/reload", headers=BENCH_ADMIN, timeout=30)
    assert reload.status_code == 200, reload.text
    assert gateway.process is not None
    supervisor = gateway.process.pid

    def replacement() -> list[bytes] | None:
        commands = [process_cmdline(pid) for pid in children(supervisor) if pid != old["pid"]]
        return next((c for c in commands if b"--rest_api_timeout_in_ms=20000" in c), None)

    command = wait_for(replacement, 60, "the replacement to start", lambda: fleet_diagnostics(gateway))
    ports = [int(arg.partition(b"=")[2]) for arg in command if arg.startswith((b"--port=", b"--rest_api_port="))]
    assert len(ports) == 2, command
    for port in ports:  # while it loads (a few seconds), nothing else can bind them
        with socket.socket() as intruder, pytest.raises(OSError):
            intruder.bind((HOST, port))
    rolled = wait_for(lambda: (w := gateway.fleet()) and w[0]["state"] == "ready" and w[0]["pid"] != old["pid"] and w,
                      180, "the worker to roll", lambda: fleet_diagnostics(gateway))
    assert rolled[0]["restarts"] == 0, fleet_diagnostics(gateway, rolled)
    assert rolled[0]["rest"] == f"{HOST}:{ports[1]}"


def test_tfgate_up_serves_its_printed_curl_line_and_stops_clean(tmp_path: Path) -> None:
    home = tmp_path / "home"
    command = [sys.executable, "-m", "gateway.cli", "up", "--home", str(home), "--port", "0", "--grpc-port", "0",
               "--admin-port", "0", "--base-port", str(free_port_range(8))]
    with open(tmp_path / "up.log", "wb") as log:
        up = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert up.stdout is not None
        lines: list[str] = []
        while not lines or not lines[-1].startswith("status:"):
            line = up.stdout.readline()
            assert line, f"tfgate up ended early:\n{(tmp_path / 'up.log').read_text()[-3000:]}"
            lines.append(line.rstrip("\n"))
        printed = {line.partition(": ")[0]: line.partition(": ")[2] for line in lines if ": " in line}
        assert printed["endpoint"].startswith("https://localhost:")
        assert printed["api key"].startswith("tfg_")
        curl = next(line for line in lines if line.startswith("curl "))
        answer = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=30, check=True)
        assert json.loads(answer.stdout) == {"predictions": [3.5, 4.0, 5.5]}  # the latest version: x/2 + 3
        assert grpc_predict(int(printed["grpc"].split()[0].rpartition(":")[2]), home / "certs" / "ca.pem",
                            printed["api key"].split()[0]) == [3.5, 4.0]
        status = subprocess.run([sys.executable, "-m", "gateway.cli", "status", "--home", str(home)], cwd=REPO,
                                capture_output=True, text=True, timeout=30, check=True).stdout
        header, row = status.splitlines()
        assert header.split()[:4] == ["POOL", "BACKEND", "STATE", "WORKER"]
        assert row.split()[:5] == ["demo", row.split()[1], "healthy", "0", "cpu"]
        pid = int(row.split()[5])
        assert alive(pid) and process_environ(pid)["CUDA_VISIBLE_DEVICES"] == "-1"
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
        assert not alive(pid)
        assert not (home / ".tfgate" / "up.json").exists()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        assert up.stdout is not None
        up.stdout.close()


def grpc_predict(port: int, ca: Path, key: str) -> list[float]:
    """Predict half_plus_two over TLS with TF Serving's own client, as a user of `tfgate up` would."""
    with grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(ca.read_bytes())) as channel:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = MODEL
        request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([1.0, 2.0], np.float32)))
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            request, metadata=[("authorization", f"Bearer {key}")], timeout=10)
        return list(response.outputs["y"].float_val)
