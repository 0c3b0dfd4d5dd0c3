"""Dynamic batching in a real backend subprocess: REST and gRPC calls merge and each gets its own rows, a full
queue answers 429 / RESOURCE_EXHAUSTED, and a changed batching file is applied with the model config."""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path
from typing import Callable

import aiohttp
import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from tests.conftest import Backend, write_model_config

StartBackend = Callable[..., Backend]


def batching_file(path: Path, *, max_batch_size: int, timeout_micros: int, max_enqueued: int = 100,
                  threads: int = 1, allowed: tuple[int, ...] = ()) -> Path:
    path.write_text(f"max_batch_size {{ value: {max_batch_size} }}\n"
                    f"batch_timeout_micros {{ value: {timeout_micros} }}\n"
                    f"max_enqueued_batches {{ value: {max_enqueued} }}\nnum_batch_threads {{ value: {threads} }}\n"
                    + "".join(f"allowed_batch_sizes: {size}\n" for size in allowed))
    return path


def start_batching_backend(start_backend: StartBackend, demo_models: Path, tmp_path: Path, batching: Path,
                           *extra: str) -> Backend:
    config = write_model_config(tmp_path / "models.config", [
        f'name: "hpt" base_path: "{demo_models}/half_plus_two"', f'name: "mlp" base_path: "{demo_models}/mlp"'])
    monitoring = tmp_path / "monitoring.config"
    monitoring.write_text("prometheus_config { enable: true }")
    return start_backend(f"--model_config_file={config}", "--enable_batching",
                         f"--batching_parameters_file={batching}", f"--monitoring_config_file={monitoring}", *extra)


def metric(backend: Backend, name: str, model: str) -> float:
    text = backend.get("/monitoring/prometheus/metrics").text
    found = re.search(rf'^{name}{{model="{model}"}} ([0-9.e+]+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def grpc_request(model: str, values: np.ndarray) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(values))
    return request


def test_rest_and_grpc_calls_merge_and_each_gets_exactly_its_rows(start_backend: StartBackend, demo_models: Path,
                                                                  tmp_path: Path) -> None:
    batching = batching_file(tmp_path / "batching.config", max_batch_size=32, timeout_micros=200_000,
                             allowed=(8, 16, 32))
    backend = start_batching_backend(start_backend, demo_models, tmp_path, batching)
    sizes = [1, 3, 2, 5, 1, 4, 2, 6]

    async def scenario() -> tuple[list[list[float]], list[list[float]], tuple[int, dict]]:
        async with aiohttp.ClientSession() as session, \
                grpc.aio.insecure_channel(f"127.0.0.1:{backend.grpc_port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

            async def rest(i: int, rows: int) -> list[float]:
                values = [[100.0 * i + r] for r in range(rows)]
                async with session.post(f"{backend.url}/v1/models/hpt:predict", json={"instances": values}) as reply:
                    assert reply.status == 200, await reply.text()
                    return [row[0] for row in (await reply.json())["predictions"]]

            async def malformed() -> tuple[int, dict]:
                """A number simdjson cannot read (`1.2.3`) among batched calls: this call gets the general path's
                error, and the others their rows."""
                async with session.post(f"{backend.url}/v1/models/hpt:predict", data=b'{"instances": [[1.2.3]]}',
                                        headers={"Content-Type": "application/json"}) as reply:
                    return reply.status, await reply.json()

            async def over_grpc(i: int, rows: int) -> list[float]:
                values = np.array([[1000.0 + 100.0 * i + r] for r in range(rows)], np.float32)
                reply = await stub.Predict(grpc_request("hpt", values), timeout=30)
                return tf.make_ndarray(reply.outputs["y"]).reshape(-1).tolist()

            rest_rows, refused = await asyncio.gather(asyncio.gather(*(rest(i, n) for i, n in enumerate(sizes))),
                                                      malformed())
            return rest_rows, await asyncio.gather(*(over_grpc(i, n) for i, n in enumerate(sizes))), refused

    rest_rows, grpc_rows, (status, error) = asyncio.run(scenario())
    assert status == 400 and list(error) == ["error"] and "JSON" in error["error"], error
    for i, rows in enumerate(sizes):
        assert rest_rows[i] == [0.5 * (100.0 * i + r) + 3 for r in range(rows)]
        assert grpc_rows[i] == [0.5 * (1000.0 + 100.0 * i + r) + 3 for r in range(rows)]
    batches = metric(backend, "tfgate_backend_batch_size_rows_count", "hpt")
    assert 0 < batches < 2 * len(sizes), "calls were merged into fewer runs than calls"
    assert metric(backend, "tfgate_backend_batch_padding_rows_total", "hpt") > 0  # padded to allowed sizes
    cpus = len(os.sched_getaffinity(0))  # the backend inherits this process's CPUs; one batch thread gets them all
    assert f"TensorFlow intra-op threads: {cpus} per op ({cpus} CPUs, num_batch_threads 1)" in backend.log()
    assert "TensorFlow inter-op: each step runs its ops in the calling thread" in backend.log()  # the flag is 0


def test_a_full_queue_answers_429_and_resource_exhausted(start_backend: StartBackend, demo_models: Path,
                                                         tmp_path: Path) -> None:
    batching = batching_file(tmp_path / "batching.config", max_batch_size=64, timeout_micros=0, max_enqueued=1)
    backend = start_batching_backend(start_backend, demo_models, tmp_path, batching)
    image_rows = np.full((64, 784), 0.5, np.float32)

    async def scenario() -> tuple[list[int], list[grpc.StatusCode], str]:
        async with aiohttp.ClientSession() as session, \
                grpc.aio.insecure_channel(f"127.0.0.1:{backend.grpc_port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            body = {"instances": image_rows.tolist()}
            message = ""

            async def rest() -> int:
                nonlocal message
                async with session.post(f"{backend.url}/v1/models/mlp:predict", json=body) as reply:
                    if reply.status == 429:
                        message = (await reply.json())["error"]
                    return reply.status

            async def over_grpc() -> grpc.StatusCode:
                try:
                    await stub.Predict(grpc_request("mlp", image_rows), timeout=60)
                    return grpc.StatusCode.OK
                except grpc.aio.AioRpcError as error:
                    return error.code()

            grpc_codes = await asyncio.gather(*(over_grpc() for _ in range(48)))
            return await asyncio.gather(*(rest() for _ in range(24))), grpc_codes, message

    rest_codes, grpc_codes, message = asyncio.run(scenario())
    assert set(rest_codes) <= {200, 429} and set(grpc_codes) <= {grpc.StatusCode.OK,
                                                                  grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in grpc_codes and grpc.StatusCode.OK in grpc_codes
    assert 200 in rest_codes
    if 429 in rest_codes:
        assert "queue" in message and "full" in message
    assert backend.post("/v1/models/hpt:predict", {"instances": [1.0]}).status_code == 200


def test_changed_batching_parameters_apply_with_the_config(start_backend: StartBackend, demo_models: Path,
                                                           tmp_path: Path) -> None:
    batching = batching_file(tmp_path / "batching.config", max_batch_size=8, timeout_micros=0)
    backend = start_batching_backend(start_backend, demo_models, tmp_path, batching,
                                     "--model_config_file_poll_wait_seconds=1")
    assert backend.post("/v1/models/hpt:predict", {"instances": [1.0]}).status_code == 200
    assert metric(backend, "tfgate_backend_batch_padding_rows_total", "hpt") == 0
    batching_file(batching, max_batch_size=8, timeout_micros=0, allowed=(4, 8))
    deadline = time.monotonic() + 30
    while "batching parameters changed" not in backend.log():
        assert time.monotonic() < deadline, backend.log()
        time.sleep(0.1)
    assert backend.post("/v1/models/hpt:predict", {"instances": [1.0]}).json() == {"predictions": [3.5]}
    assert metric(backend, "tfgate_backend_batch_padding_rows_total", "hpt") == 3  # 1 row padded to 4
