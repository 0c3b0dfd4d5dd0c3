"""What operators rely on: gRPC over TLS and mTLS, health probes, Prometheus metrics, and a SIGTERM that drains."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from bench.backend_process import HOST
from gateway.certs import CertPaths, write_client_cert, write_dev_certs
from tests.conftest import Backend

StartBackend = Callable[..., Backend]


def ssl_config(tmp_path: Path, certs: CertPaths, client_verify: bool) -> Path:
    def pem(path: Path) -> str:
        return path.read_text().replace("\n", "\\n")
    path = tmp_path / "ssl.config"
    path.write_text(f'server_key: "{pem(certs.server_key)}"\nserver_cert: "{pem(certs.server_cert)}"\n'
                    f'custom_ca: "{pem(certs.ca_cert)}"\nclient_verify: {str(client_verify).lower()}\n')
    return path


def predict(channel: grpc.Channel, value: float = 1.0) -> list[float]:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "hpt"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([value], np.float32)))
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    return list(response.outputs["y"].float_val)


def hpt_flags(demo_models: Path) -> tuple[str, ...]:
    return ("--model_name=hpt", f"--model_base_path={demo_models}/half_plus_two")


def test_grpc_over_tls(start_backend: StartBackend, demo_models: Path, tmp_path: Path) -> None:
    certs = write_dev_certs(tmp_path / "certs")
    backend = start_backend(*hpt_flags(demo_models), f"--ssl_config_file={ssl_config(tmp_path, certs, False)}")
    credentials = grpc.ssl_channel_credentials(root_certificates=certs.ca_cert.read_bytes())
    with grpc.secure_channel(f"localhost:{backend.grpc_port}", credentials) as channel:
        assert predict(channel) == [3.5]
    with grpc.insecure_channel(f"127.0.0.1:{backend.grpc_port}") as plain, pytest.raises(grpc.RpcError):
        predict(plain)


def test_grpc_mtls_requires_a_client_certificate_from_the_ca(start_backend: StartBackend, demo_models: Path,
                                                            tmp_path: Path) -> None:
    certs = write_dev_certs(tmp_path / "certs")
    backend = start_backend(*hpt_flags(demo_models), f"--ssl_config_file={ssl_config(tmp_path, certs, True)}")
    ca = certs.ca_cert.read_bytes()
    mutual = grpc.ssl_channel_credentials(ca, certs.client_key.read_bytes(), certs.client_cert.read_bytes())
    with grpc.secure_channel(f"localhost:{backend.grpc_port}", mutual) as channel:
        assert predict(channel) == [3.5]
    with grpc.secure_channel(f"localhost:{backend.grpc_port}", grpc.ssl_channel_credentials(ca)) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            predict(channel)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    stranger = write_dev_certs(tmp_path / "other-ca")
    cert, key = write_client_cert(stranger, "stranger", tmp_path / "other-ca")
    foreign = grpc.ssl_channel_credentials(ca, key.read_bytes(), cert.read_bytes())
    with grpc.secure_channel(f"localhost:{backend.grpc_port}", foreign) as channel, pytest.raises(grpc.RpcError):
        predict(channel)


def test_bad_ssl_or_monitoring_config_fails_the_start(start_backend: StartBackend, demo_models: Path,
                                                      tmp_path: Path) -> None:
    bad = tmp_path / "bad.config"
    bad.write_text('server_key: "x"')
    for flag, message in (("--ssl_config_file", "server_key and server_cert are both required"),
                          ("--monitoring_config_file", "bad.config")):
        backend = start_backend(*hpt_flags(demo_models), f"{flag}={bad}", wait=False)
        assert backend.process.wait(timeout=60) == 1  # type: ignore[union-attr]
        assert message in backend.log()


@pytest.mark.parametrize("taken, message", [
    ("rest", "cannot serve REST (--rest_api_port): "), ("grpc", "cannot serve gRPC (--port): Failed to bind"),
])
def test_a_taken_port_fails_the_start_with_one_clear_line(demo_models: Path, tmp_path: Path, taken: str,
                                                          message: str) -> None:
    backend = Backend(list(hpt_flags(demo_models)), tmp_path / "backend.log")
    with socket.create_server((HOST, backend.rest_port if taken == "rest" else backend.grpc_port)):
        backend.start()
        try:
            assert backend.process.wait(timeout=60) == 1  # type: ignore[union-attr]
        finally:
            backend.stop()
    assert message in backend.log() and "Traceback" not in backend.log()


def test_health_probes(start_backend: StartBackend, demo_models: Path) -> None:
    backend = start_backend(*hpt_flags(demo_models))
    assert backend.get("/v2/health/live").status_code == 200
    assert backend.get("/v2/health/ready").json() == {"ready": True}
    assert backend.get("/v2/models/hpt/ready").status_code == 200
    assert backend.get("/v2/models/hpt/versions/2/ready").status_code == 200
    assert backend.get("/v2/models/hpt/versions/1/ready").status_code == 503
    assert backend.get("/v2/models/nope/ready").status_code == 404


def test_prometheus_metrics_move_and_pass_promtool(start_backend: StartBackend, demo_models: Path,
                                                   tmp_path: Path) -> None:
    monitoring = tmp_path / "monitoring.config"
    monitoring.write_text("prometheus_config { enable: true }")
    backend = start_backend(*hpt_flags(demo_models), f"--monitoring_config_file={monitoring}")
    assert backend.post("/v1/models/hpt:predict", {"instances": [1.0]}).status_code == 200
    assert backend.post("/v1/models/hpt:predict", {"instances": ["bad"]}).status_code == 400
    with grpc.insecure_channel(f"127.0.0.1:{backend.grpc_port}") as channel:
        predict(channel)
    scrape = backend.get("/monitoring/prometheus/metrics")
    assert scrape.status_code == 200
    text = scrape.text
    assert 'tfgate_backend_requests_total{api="predict",code="OK",entrypoint="REST",model="hpt",version="2"} 1.0' \
        in text
    assert 'code="INVALID_ARGUMENT",entrypoint="REST",model="hpt"' in text
    assert 'api="predict",code="OK",entrypoint="GRPC",model="hpt",version="2"} 1.0' in text
    assert "tensorflow_serving_request_count_total{model_name=\"hpt\",status=\"OK\"} 2.0" in text
    assert 'tfgate_backend_model_versions_available{model="hpt"} 1.0' in text
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (.ci/run installs it)")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def in_flight(backend: Backend) -> dict[str, float]:
    """Requests the backend is serving now, by entrypoint (the scrape itself counts as one REST request)."""
    found = re.findall(r'tfgate_backend_in_flight_requests\{entrypoint="(\w+)"\} ([0-9.]+)',
                       backend.get("/monitoring/prometheus/metrics").text)
    return {entrypoint: float(value) for entrypoint, value in found}


def test_sigterm_drains_accepted_requests_and_exits_0(start_backend: StartBackend, demo_models: Path,
                                                      tmp_path: Path) -> None:
    monitoring = tmp_path / "monitoring.config"
    monitoring.write_text("prometheus_config { enable: true }")
    backend = start_backend("--model_name=mlp", f"--model_base_path={demo_models}/mlp", "--grace_period_s=60",
                            f"--monitoring_config_file={monitoring}")
    body = json.dumps({"instances": [[0.3] * 784] * 512})
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mlp"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.full((4096, 784), 0.3, np.float32)))

    def rest_call() -> str:
        try:
            return str(requests.post(f"{backend.url}/v1/models/mlp:predict", data=body, timeout=120).status_code)
        except requests.ConnectionError:
            return "not accepted"

    def grpc_call() -> str:
        with grpc.insecure_channel(f"127.0.0.1:{backend.grpc_port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            try:
                return str(stub.Predict(request, timeout=120).outputs["class_id"].tensor_shape.dim[0].size)
            except grpc.RpcError as error:
                return "not accepted" if error.code() == grpc.StatusCode.UNAVAILABLE else error.code().name

    rest_calls: list[Future[str]] = []
    grpc_calls: list[Future[str]] = []
    with ThreadPoolExecutor(16) as pool:
        deadline = time.monotonic() + 60
        while True:
            # A wave of calls; another if a whole wave came and went between two looks (seen on a loaded machine).
            if all(call.done() for call in rest_calls + grpc_calls):
                rest_calls += [pool.submit(rest_call) for _ in range(8)]
                grpc_calls += [pool.submit(grpc_call) for _ in range(8)]
            busy = in_flight(backend)
            if busy.get("REST", 0) >= 3 and busy.get("GRPC", 0) >= 2:  # a burst in flight
                break
            assert time.monotonic() < deadline, busy
            time.sleep(0.01)
        backend.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        rest = [call.result(timeout=120) for call in rest_calls]
        grpc_results = [call.result(timeout=120) for call in grpc_calls]
        results = rest + grpc_results
    # Every call was either answered in full or never accepted; none was cut off or failed.
    assert set(rest) <= {"200", "not accepted"} and set(grpc_results) <= {"4096", "not accepted"}, results
    assert rest.count("200") >= busy["REST"] - 1 and grpc_results.count("4096") >= busy["GRPC"]
    assert backend.process.wait(timeout=60) == 0  # type: ignore[union-attr]
    assert "drained; exiting" in backend.log()


def test_grpc_outputs_in_tensor_content_and_messages_over_4_mb(start_backend: StartBackend, demo_models: Path) -> None:
    backend = start_backend("--model_name=mlp", f"--model_base_path={demo_models}/mlp",
                            "--enable_serialization_as_tensor_content")
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mlp"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.full((2000, 784), 0.25, np.float32)))
    assert request.ByteSize() > 4 * 1024 * 1024  # past gRPC's default limit
    with grpc.insecure_channel(f"127.0.0.1:{backend.grpc_port}",
                               options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=60)
    probabilities = response.outputs["probabilities"]
    assert probabilities.tensor_content and not probabilities.float_val
    assert tf.make_ndarray(probabilities).shape == (2000, 10)
