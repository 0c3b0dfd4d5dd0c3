"""`python -m backend --workers=N`: N real backend processes on the same ports, answering as one backend.

Each worker is found the way an operator would: as a child of the backend's process, whose private API (metrics,
reload) is on the port it wrote into the group's directory, with the group's token (backend/siblings.py).
"""

from __future__ import annotations

import os
import re
import signal
import socket
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from tensorflow_serving.apis import (
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from backend.siblings import ENV_DIR, ENV_INDEX, ENV_TOKEN
from bench.backend_process import HOST
from tests.conftest import Backend, write_model_config
from tests.process_support import alive, children, process_environ, wait_for

StartBackend = Callable[..., Backend]
WORKERS = 2
HALF_PLUS_TWO_OF_4 = 5.0  # the latest demo half_plus_two, v2: 0.5 x + 3


class Worker:
    """One worker process of a group, and its private API."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        env = process_environ(pid)
        self.index = int(env[ENV_INDEX])
        self._token = env[ENV_TOKEN]
        self._port_file = Path(env[ENV_DIR]) / f"worker-{self.index}.port"

    def serving(self) -> bool:
        return self._port_file.exists()

    def metrics(self) -> str:
        port = int(self._port_file.read_text())
        answer = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30,
                              headers={"authorization": f"Bearer {self._token}"})
        assert answer.status_code == 200, answer.text
        return answer.text


def workers(backend: Backend) -> list[Worker]:
    """The backend's workers once all of them serve (in index order)."""
    assert backend.process is not None
    parent = backend.process.pid

    def all_serving() -> list[Worker] | None:
        # A child counts once it runs as a worker: not a zombie, and past its exec (its environment says which).
        pids = [pid for pid in children(parent) if alive(pid) and ENV_INDEX in process_environ(pid)]
        found = sorted((Worker(pid) for pid in pids), key=lambda worker: worker.index)
        return found if len(found) == WORKERS and all(worker.serving() for worker in found) else None
    return wait_for(all_serving, 120, f"{WORKERS} serving workers", backend.log)


def sample(metrics: str, name: str, labels: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", metrics, re.MULTILINE)
    return float(match[1]) if match else 0.0


def monitoring(tmp_path: Path) -> str:
    path = tmp_path / "monitoring.config"
    path.write_text("prometheus_config { enable: true }")
    return f"--monitoring_config_file={path}"


def grpc_predict(port: int) -> list[float]:
    """One predict on a connection of its own (a channel of its own, not sharing the process's subchannels)."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "hpt"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([4.0], np.float32)))
    with grpc.insecure_channel(f"{HOST}:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    return list(response.outputs["y"].float_val)


def test_workers_share_both_ports_and_a_scrape_counts_them_all(start_backend: StartBackend, demo_models: Path,
                                                               tmp_path: Path) -> None:
    backend = start_backend("--model_name=hpt", f"--model_base_path={demo_models}/half_plus_two",
                            f"--workers={WORKERS}", monitoring(tmp_path))
    rest_calls, grpc_calls = 40, 20  # made as soon as the port accepts: every worker listens by then
    for _ in range(rest_calls):  # each on a new connection, which the kernel hands to any worker
        answer = requests.post(f"{backend.url}/v1/models/hpt:predict", json={"instances": [4.0]},
                               headers={"connection": "close"}, timeout=30)
        assert answer.json() == {"predictions": [HALF_PLUS_TWO_OF_4]}
    for _ in range(grpc_calls):
        assert grpc_predict(backend.grpc_port) == [HALF_PLUS_TWO_OF_4]

    count = ("tensorflow_serving_request_count_total", 'model_name="hpt",status="OK"')
    per_worker = [sample(worker.metrics(), *count) for worker in workers(backend)]
    assert all(served > 0 for served in per_worker), per_worker  # 60 connections, not all to one worker
    assert sum(per_worker) == rest_calls + grpc_calls
    for _ in range(4):  # whichever worker takes the scrape, it answers for all of them
        merged = backend.get("/monitoring/prometheus/metrics").text
        assert sample(merged, *count) == rest_calls + grpc_calls
        assert sample(merged, "tfgate_backend_model_versions_available", 'model="hpt"') == 1.0


def test_a_reload_reaches_every_worker_and_a_restarted_one_starts_from_it(
        start_backend: StartBackend, demo_models: Path, tmp_path: Path) -> None:
    config = write_model_config(tmp_path / "models.config", [
        f'name: "hpt" base_path: "{demo_models}/half_plus_two" model_platform: "tensorflow"'])
    backend = start_backend(f"--model_config_file={config}", f"--workers={WORKERS}", monitoring(tmp_path))
    workers(backend)
    request = model_management_pb2.ReloadConfigRequest()
    for name, model in (("hpt", "half_plus_two"), ("tf1", "half_plus_two_tf1")):
        entry = request.config.model_config_list.config.add()
        entry.name, entry.base_path, entry.model_platform = name, f"{demo_models}/{model}", "tensorflow"
    with grpc.insecure_channel(f"{HOST}:{backend.grpc_port}") as channel:
        response = model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(request, timeout=120)
    assert response.status.error_code == 0

    available = ("tfgate_backend_model_versions_available", 'model="tf1"')
    group = workers(backend)
    assert [sample(worker.metrics(), *available) for worker in group] == [1.0] * WORKERS

    os.kill(group[0].pid, signal.SIGKILL)
    wait_for(lambda: not alive(group[0].pid), 30, "the killed worker to be gone")
    restarted = workers(backend)
    assert restarted[0].pid != group[0].pid and restarted[1].pid == group[1].pid
    assert sample(restarted[0].metrics(), *available) == 1.0  # not the command line's config: the reloaded one
    assert "backend worker 0 (pid" in backend.log() and "exited with signal SIGKILL" in backend.log()


def test_sigterm_stops_every_worker_and_exits_0(start_backend: StartBackend, demo_models: Path) -> None:
    backend = start_backend("--model_name=hpt", f"--model_base_path={demo_models}/half_plus_two",
                            f"--workers={WORKERS}")
    group = workers(backend)
    assert backend.process is not None
    backend.process.send_signal(signal.SIGTERM)
    assert backend.process.wait(timeout=60) == 0
    assert not any(alive(worker.pid) for worker in group)


@pytest.mark.parametrize("problem", ["bad config", "taken port"])
def test_a_start_that_fails_in_a_worker_or_the_parent_exits_1(demo_models: Path, tmp_path: Path,
                                                              problem: str) -> None:
    bad_monitoring = tmp_path / "monitoring.config"
    bad_monitoring.write_text("prometheus_config { no_such_field: 1 }")
    flags = ["--model_name=hpt", f"--model_base_path={demo_models}/half_plus_two", f"--workers={WORKERS}"]
    if problem == "bad config":
        flags.append(f"--monitoring_config_file={bad_monitoring}")
    backend = Backend(flags, tmp_path / "backend.log")
    with socket.create_server((HOST, backend.rest_port)) if problem == "taken port" else nullcontext():
        backend.start()
        try:
            assert backend.process is not None and backend.process.wait(timeout=120) == 1
        finally:
            backend.stop()
    log = backend.log()
    if problem == "bad config":
        assert "no_such_field" in log and "exited with status 1 before serving" in log
    else:
        assert f"cannot serve on {backend.rest_port} (--rest_api_port): Address already in use" in log
    assert "Traceback" not in log


