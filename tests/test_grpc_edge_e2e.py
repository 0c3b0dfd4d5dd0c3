"""TF Serving's gRPC API through the gateway, with the official `tensorflow_serving.apis` client over TLS, in front of
two real backends: versions, labels and the weighted split, per-call balancing from one channel, the gateway's
refusals as gRPC codes, server reflection, and the client's deadline reaching the backend."""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tensorflow as tf
import yaml
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from bench.backend_process import BackendProcess
from gateway.accesslog import AccessLog
from gateway.app import Gateway, StartupError
from gateway.certs import CertPaths, write_dev_certs
from gateway.grpc_descriptors import DescriptorError
from gateway.keys import digest
from tests.conftest import Backend
from tests.gateway_support import ADMIN_KEY, MODEL, config_document
from tests.test_batching_e2e import StartBackend, batching_file, metric, start_batching_backend

KEY, LIMITED_KEY, OTHER_KEY = "tfg_grpc-test-key", "tfg_grpc-limited-key", "tfg_grpc-other-model-key"


def document(certs: CertPaths, backends: list[BackendProcess], **overrides: Any) -> dict[str, Any]:
    doc = config_document(certs, [], pool={"backends": [
        {"rest": f"127.0.0.1:{b.rest_port}", "grpc": f"127.0.0.1:{b.grpc_port}"} for b in backends]})
    doc["listen"]["grpc"] = "127.0.0.1:0"
    doc["routes"] = [{"model": MODEL, "pool": "cpu", "split": [{"version": 1, "weight": 1}]}]
    doc["auth"] = {**doc["auth"], "required": True, "api_keys": [
        {"name": "client", "sha256": digest(KEY)},
        {"name": "limited", "sha256": digest(LIMITED_KEY), "rate": {"per_second": 0.1, "burst": 2}},
        {"name": "other", "sha256": digest(OTHER_KEY), "models": ["other"]}]}
    doc.update(overrides)
    return doc


@pytest.fixture
async def start(tmp_path: Path, certs: CertPaths) -> AsyncIterator[Callable[..., Any]]:
    started: list[tuple[Gateway, grpc.aio.Channel]] = []
    gateways: list[Gateway] = []

    async def run(doc: dict[str, Any], access_log: AccessLog | None = None) -> grpc.aio.Channel:
        path = tmp_path / f"gateway-{len(started)}.yaml"
        path.write_text(yaml.safe_dump(doc))
        gateway = Gateway(path, watch_file=False, access_log=access_log)
        await gateway.start()
        gateways.append(gateway)
        credentials = grpc.ssl_channel_credentials(root_certificates=certs.ca_cert.read_bytes())
        channel = grpc.aio.secure_channel(f"localhost:{gateway.grpc_port}", credentials)
        started.append((gateway, channel))
        return channel

    run.gateways = gateways  # type: ignore[attr-defined]
    yield run
    for gateway, channel in started:
        await channel.close()
        await gateway.stop(1.0)


def predict_request(model: str = MODEL, **spec: Any) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    for field, value in spec.items():
        if field == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, field, value)
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([2.0], np.float32)))
    return request


async def predict(channel: grpc.aio.Channel, key: str = KEY, timeout: float = 10,
                  **spec: Any) -> tuple[list[float], str]:
    """The prediction and the backend that made it (x-tfgate-upstream in the trailing metadata)."""
    call = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
        predict_request(**spec), metadata=[("authorization", f"Bearer {key}")], timeout=timeout)
    response = await call
    trailing = dict(await call.trailing_metadata() or ())
    return list(response.outputs["y"].float_val), trailing.get("x-tfgate-upstream", "")


async def test_versions_labels_and_the_split(start: Any, certs: CertPaths, backends: list[BackendProcess]) -> None:
    channel = await start(document(certs, backends))
    assert (await predict(channel))[0] == [3.0]  # the split: version 1 (x/2 + 2)
    assert (await predict(channel, version=2))[0] == [4.0]
    assert (await predict(channel, version_label="canary"))[0] == [4.0]
    assert (await predict(channel, version_label="stable"))[0] == [3.0]


async def test_one_channel_is_balanced_per_call(start: Any, certs: CertPaths, backends: list[BackendProcess]) -> None:
    channel = await start(document(certs, backends))
    upstreams = Counter([(await predict(channel))[1] for _ in range(30)])
    assert set(upstreams) == {f"127.0.0.1:{b.rest_port}" for b in backends}, upstreams


async def test_model_service_and_metadata(start: Any, certs: CertPaths, backends: list[BackendProcess]) -> None:
    channel = await start(document(certs, backends))
    auth = [("x-api-key", KEY)]
    status = await model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(model_spec={"name": MODEL}), metadata=auth, timeout=10)
    assert sorted(v.version for v in status.model_version_status) == [1, 2]  # no split applied to a status call
    metadata = await prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(
        get_model_metadata_pb2.GetModelMetadataRequest(model_spec={"name": MODEL}, metadata_field=["signature_def"]),
        metadata=auth, timeout=10)
    assert metadata.model_spec.name == MODEL and "signature_def" in metadata.metadata


@pytest.mark.parametrize(("key", "model", "code"), [
    ("", MODEL, grpc.StatusCode.UNAUTHENTICATED),
    ("tfg_wrong", MODEL, grpc.StatusCode.UNAUTHENTICATED),
    (OTHER_KEY, MODEL, grpc.StatusCode.PERMISSION_DENIED),
    (KEY, "no_such_model", grpc.StatusCode.NOT_FOUND),
])
async def test_refusals_are_grpc_codes(start: Any, certs: CertPaths, backends: list[BackendProcess], key: str,
                                       model: str, code: grpc.StatusCode) -> None:
    channel = await start(document(certs, backends))
    metadata = [("authorization", f"Bearer {key}")] if key else []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            predict_request(model), metadata=metadata, timeout=10)
    assert raised.value.code() == code


async def test_rate_limit_is_resource_exhausted_with_headers(start: Any, certs: CertPaths,
                                                             backends: list[BackendProcess]) -> None:
    channel = await start(document(certs, backends))
    for _ in range(2):
        await predict(channel, key=LIMITED_KEY)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await predict(channel, key=LIMITED_KEY)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailing = dict(raised.value.trailing_metadata() or ())
    assert trailing["ratelimit-limit"] == "2" and int(trailing["retry-after"]) >= 1
    assert (await predict(channel))[0] == [3.0]  # another principal is unaffected


async def test_a_malformed_request_is_invalid_argument(start: Any, certs: CertPaths,
                                                       backends: list[BackendProcess]) -> None:
    channel = await start(document(certs, backends))
    raw = channel.unary_unary("/tensorflow.serving.PredictionService/Predict")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await raw(b"\x0a\x05abc", metadata=[("x-api-key", KEY)], timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_request_malformed_inside_the_model_spec_check_is_invalid_argument_from_the_backend(
        start: Any, certs: CertPaths, backends: list[BackendProcess]) -> None:
    """The gateway reads only the model spec: bytes past it that do not parse reach the backend, which answered
    UNKNOWN naming a Python exception (DecodeError) before it parsed requests itself."""
    channel = await start(document(certs, backends))
    raw = channel.unary_unary("/tensorflow.serving.PredictionService/Predict")
    request = predict_request().SerializeToString() + b"\x12\x03\x0a\x01\xff"  # an inputs entry that does not parse
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await raw(request, metadata=[("x-api-key", KEY)], timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid tensorflow.serving.PredictRequest" in raised.value.details()
    assert (await predict(channel))[0] == [3.0]


async def test_a_request_of_millions_of_tiny_fields_is_refused_before_it_holds_the_gateway(
        start: Any, certs: CertPaths, backends: list[BackendProcess]) -> None:
    """Reading 2 million two-byte fields for the model spec held the gateway's event loop for seconds (found without
    credentials, which are now refused before the message is read: see below; the model spec is read before a
    caller is authorized for its model). The 4 MB message is within this gateway's limits.max_body_bytes: the field
    count refuses it."""
    doc = document(certs, backends)
    doc["limits"] = {**doc.get("limits", {}), "max_body_bytes": 16 * 1024 * 1024}
    channel = await start(doc)
    raw = channel.unary_unary("/tensorflow.serving.PredictionService/Predict")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await raw(b"\x78\x00" * 2_000_000 + predict_request().SerializeToString(), metadata=[("x-api-key", KEY)],
                  timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than 10000 fields in one message" in raised.value.details()
    assert (await predict(channel))[0] == [3.0]


@pytest.mark.parametrize("limit, padding, code", [
    (16 * 1024 * 1024, 5_000_000, grpc.StatusCode.OK),  # past gRPC's default 4 MB, within the gateway's limit
    (1_000_000, 2_000_000, grpc.StatusCode.RESOURCE_EXHAUSTED),
])
async def test_a_grpc_message_is_bounded_by_max_body_bytes(start: Any, certs: CertPaths, backends: list[BackendProcess],
                                                           limit: int, padding: int, code: grpc.StatusCode) -> None:
    """Found fuzzing: gRPC's default 4 MB cap refused a 5 MB Predict that TF Serving and the gateway's REST edge
    take. Messages are bounded by limits.max_body_bytes, as REST bodies are."""
    doc = document(certs, backends)
    doc["limits"] = {**doc.get("limits", {}), "max_body_bytes": limit}
    channel = await start(doc)
    unknown_field = b"\x7a" + _varint(padding) + bytes(padding)  # field 15, bytes: carried, not read
    call = channel.unary_unary("/tensorflow.serving.PredictionService/Predict",
                               response_deserializer=predict_pb2.PredictResponse.FromString)
    message = predict_request().SerializeToString() + unknown_field
    if code is grpc.StatusCode.OK:
        answer = await call(message, metadata=[("x-api-key", KEY)], timeout=30)
        assert list(answer.outputs["y"].float_val) == [3.0]
        return
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(message, metadata=[("x-api-key", KEY)], timeout=30)
    assert raised.value.code() == code


@pytest.mark.parametrize("metadata", [[], [("x-api-key", "tfg_wrong")], [("authorization", "Bearer tfg_wrong")]])
async def test_a_caller_failing_authentication_is_refused_before_its_message_is_read(
        start: Any, certs: CertPaths, backends: list[BackendProcess], metadata: list[tuple[str, str]]) -> None:
    """A message over the gRPC cap is refused as RESOURCE_EXHAUSTED as soon as gRPC reads it (the test above): a
    caller the metadata already refuses gets UNAUTHENTICATED instead, so its message was never read."""
    doc = document(certs, backends)
    doc["limits"] = {**doc.get("limits", {}), "max_body_bytes": 1_000_000}
    channel = await start(doc)
    call = channel.unary_unary("/tensorflow.serving.PredictionService/Predict",
                               response_deserializer=predict_pb2.PredictResponse.FromString)
    message = predict_request().SerializeToString() + b"\x7a" + _varint(2_000_000) + bytes(2_000_000)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(message, metadata=metadata, timeout=30)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert dict(raised.value.trailing_metadata() or ())["x-request-id"]
    assert (await predict(channel))[0] == [3.0]  # the channel goes on serving


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


async def test_a_refusal_echoing_a_huge_name_is_cut_to_fit_the_trailers(start: Any, certs: CertPaths,
                                                                         backends: list[BackendProcess]) -> None:
    """A 100 KB model name, echoed whole in NOT_FOUND's details, passed the client's 16 KB metadata limit: the client
    saw RESOURCE_EXHAUSTED "Stream removed" instead."""
    channel = await start(document(certs, backends))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            predict_request("m" * 100_000), metadata=[("x-api-key", KEY)], timeout=10)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    details = raised.value.details()
    assert details.startswith("Servable not found for request: Latest(mmm") and len(details) < 1100


async def test_health_service_is_open_and_follows_readiness(start: Any, certs: CertPaths,
                                                            backends: list[BackendProcess]) -> None:
    channel = await start(document(certs, backends))
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService"):
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)  # no credentials
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_health_request_that_does_not_parse_is_invalid_argument(start: Any, certs: CertPaths,
                                                                       backends: list[BackendProcess]) -> None:
    """Health is open to any client: such bytes got UNKNOWN "Unexpected <class '...DecodeError'>" and logged a
    traceback each time. Watch still streams the gateway's status."""
    channel = await start(document(certs, backends))
    for method in ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"):
        call = (channel.unary_unary if method.endswith("Check") else channel.unary_stream)(method)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            answer = call(b"\x0a\x80", timeout=10)
            await answer if method.endswith("Check") else await answer.read()
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details() == "The request is not a valid grpc.health.v1.HealthCheckRequest"
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


async def test_a_backend_killed_under_load_fails_no_call(start: Any, certs: CertPaths, demo_models: Path,
                                                         tmp_path: Path) -> None:
    config = tmp_path / "models.config"
    config.write_text(f"model_config_list {{ config {{ name: '{MODEL}' base_path: '{demo_models / MODEL}' "
                      "model_platform: 'tensorflow' model_version_policy { all {} } } }\n")
    own = [BackendProcess([f"--model_config_file={config}"], tmp_path / f"backend-{i}.log").start() for i in range(2)]
    try:
        for backend in own:
            backend.wait_ready()
        channel = await start(document(certs, own))
        codes: Counter[str] = Counter()
        stop = asyncio.Event()

        async def client() -> None:
            while not stop.is_set():
                try:
                    await predict(channel)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    codes[f"{error.code().name}: {error.details()}"] += 1

        clients = [asyncio.create_task(client()) for _ in range(4)]
        while codes["OK"] < 30:
            await asyncio.sleep(0.05)
        assert own[0].process is not None
        own[0].process.kill()
        done = codes["OK"]
        while codes["OK"] < done + 100:
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*clients)
        assert set(codes) == {"OK"}, codes
    finally:
        for backend in own:
            backend.stop()


def test_the_gateway_does_not_import_tensorflow(tmp_path: Path, certs: CertPaths,
                                                backends: list[BackendProcess]) -> None:
    """TF Serving's service modules import TensorFlow; the gateway's gRPC edge must not (seconds and hundreds of
    MB per gateway process), not even to describe them for server reflection: a gateway with listen.grpc starts and
    stops in a fresh process."""
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(document(certs, backends)))
    program = textwrap.dedent(f"""
        import asyncio, sys
        from pathlib import Path
        import gateway.__main__, gateway.primary
        from gateway.app import Gateway

        async def start_and_stop() -> None:
            gateway = Gateway(Path({str(config)!r}), watch_file=False)
            await gateway.start()
            await gateway.stop(0)

        asyncio.run(start_and_stop())
        names = sorted(name for name in sys.modules if name.split(".")[0] == "tensorflow")
        sys.exit(f"imported {{len(names)}} TensorFlow modules: {{names[:5]}}" if names else None)
    """)
    check = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stderr[-2000:]


def reflect_and_predict(port: int, ca: bytes) -> tuple[list[str], list[float]]:
    """What grpcurl does, with grpc_reflection's client: list the services, fetch their descriptors from the server,
    and call Predict with messages made from those alone, from JSON (no generated code, no .proto files)."""
    with grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(ca)) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)  # no credentials: reflection is open
        services = list(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        for service in services:
            pool.FindServiceByName(service)
        predict_method = pool.FindMethodByName("tensorflow.serving.PredictionService.Predict")
        assert (predict_method.input_type.full_name, predict_method.output_type.full_name) == (
            "tensorflow.serving.PredictRequest", "tensorflow.serving.PredictResponse")
        request_class = message_factory.GetMessageClass(predict_method.input_type)
        response_class = message_factory.GetMessageClass(predict_method.output_type)
        request = json_format.ParseDict({"model_spec": {"name": MODEL}, "inputs": {"x": {
            "dtype": "DT_FLOAT", "tensor_shape": {"dim": [{"size": 1}]}, "float_val": [2.0]}}}, request_class())
        call = channel.unary_unary("/tensorflow.serving.PredictionService/Predict",
                                   request_serializer=request_class.SerializeToString,
                                   response_deserializer=response_class.FromString)
        response = call(request, metadata=[("x-api-key", KEY)], timeout=10)
        return services, list(response.outputs["y"].float_val)


async def test_server_reflection_describes_the_api(start: Any, certs: CertPaths,
                                                   backends: list[BackendProcess]) -> None:
    await start(document(certs, backends))
    services, prediction = await asyncio.to_thread(  # a blocking client: the gateway runs on this loop
        reflect_and_predict, start.gateways[-1].grpc_port, certs.ca_cert.read_bytes())
    assert sorted(services) == ["grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                                "tensorflow.serving.ModelService", "tensorflow.serving.PredictionService"]
    assert prediction == [3.0]  # the split's version 1


async def test_missing_descriptors_stop_the_start(start: Any, certs: CertPaths, backends: list[BackendProcess],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken install (a generated module missing) fails the start, naming the module."""
    def missing() -> None:
        raise DescriptorError("cannot find module tensorflow_serving.apis.predict_pb2 (for the gateway)")

    monkeypatch.setattr("gateway.app.served_pool", missing)
    with pytest.raises(StartupError, match=r"gRPC reflection: cannot find module tensorflow_serving\.apis"):
        await start(document(certs, backends))


def multi_inference_request(label: str = "") -> inference_pb2.MultiInferenceRequest:
    request = inference_pb2.MultiInferenceRequest()
    for signature in ("regress_x_to_y", "regress_x_to_y2"):
        task = request.tasks.add(method_name="tensorflow/serving/regress")
        task.model_spec.name, task.model_spec.signature_name = MODEL, signature
        if label:
            task.model_spec.version_label = label
    request.input.example_list.examples.add().features.feature["x"].float_list.value.append(2.0)
    return request


async def test_multi_inference_follows_the_split_in_every_task(start: Any, certs: CertPaths,
                                                                backends: list[BackendProcess]) -> None:
    channel = await start(document(certs, backends))
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    auth = [("x-api-key", KEY)]
    split = await stub.MultiInference(multi_inference_request(), metadata=auth, timeout=10)
    canary = await stub.MultiInference(multi_inference_request("canary"), metadata=auth, timeout=10)
    assert [r.model_spec.version.value for r in split.results] == [1, 1]  # the split's version 1, in both tasks
    assert [r.model_spec.version.value for r in canary.results] == [2, 2]
    assert [r.model_spec.signature_name for r in split.results] == ["regress_x_to_y", "regress_x_to_y2"]
    assert split.results[0].regression_result.regressions[0].value == 3.0  # x/2 + 2 at version 1
    mixed = multi_inference_request()
    mixed.tasks[1].model_spec.name = "other"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.MultiInference(mixed, metadata=auth, timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_reload_config_is_an_admin_operation_sent_to_every_backend(
        start: Any, certs: CertPaths, backends: list[BackendProcess]) -> None:
    channel = await start(document(certs, backends))
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    request = model_management_pb2.ReloadConfigRequest()  # no config: each backend answers OK and changes nothing
    for metadata, code in (([], grpc.StatusCode.UNAUTHENTICATED),
                           ([("authorization", f"Bearer {KEY}")], grpc.StatusCode.UNAUTHENTICATED)):
        with pytest.raises(grpc.aio.AioRpcError) as raised:  # a data-plane key is not an admin key
            await stub.HandleReloadConfigRequest(request, metadata=metadata, timeout=10)
        assert raised.value.code() == code
    answer = await stub.HandleReloadConfigRequest(request, metadata=[("authorization", f"Bearer {ADMIN_KEY}")],
                                                  timeout=10)
    assert answer.status.error_code == 0


async def test_grpc_calls_are_in_the_metrics_and_the_access_log(start: Any, certs: CertPaths,
                                                                 backends: list[BackendProcess]) -> None:
    lines = io.BytesIO()
    channel = await start(document(certs, backends), access_log=AccessLog(lines, flush_s=0))
    await predict(channel)
    with pytest.raises(grpc.aio.AioRpcError):
        await predict(channel, model="no_such_model")
    gateway = start.gateways[-1]
    await gateway.access_log.drain()
    records = [json.loads(line) for line in lines.getvalue().splitlines()]
    assert [(r["protocol"], r["grpc_status"], r["model"]) for r in records] == [
        ("grpc", "OK", MODEL), ("grpc", "NOT_FOUND", "no_such_model")]
    assert records[0]["path"] == "/tensorflow.serving.PredictionService/Predict" and records[0]["upstream"]
    exposition = gateway.metrics.exposition()[0].decode()
    assert f'code="OK",model="{MODEL}",protocol="grpc"' in exposition
    assert 'code="NOT_FOUND",model="",protocol="grpc"' in exposition


async def test_a_reload_rotates_the_grpc_certificates(start: Any, certs: CertPaths, tmp_path: Path,
                                                      backends: list[BackendProcess]) -> None:
    doc = document(certs, backends)
    channel = await start(doc)
    gateway = start.gateways[-1]
    assert (await predict(channel))[0] == [3.0]
    rotated = write_dev_certs(tmp_path / "rotated", hosts=["localhost", "127.0.0.1"])
    doc["tls"] = {**doc["tls"], "cert": str(rotated.server_cert), "key": str(rotated.server_key)}
    gateway.config_path.write_text(yaml.safe_dump(doc))
    assert (await gateway.reload("test"))[0]
    for ca, works in ((rotated.ca_cert, True), (certs.ca_cert, False)):
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{gateway.grpc_port}", credentials) as fresh:
            if works:
                assert (await predict(fresh))[0] == [3.0]
            else:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await predict(fresh)
                assert raised.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails: not trusted
    assert (await predict(channel))[0] == [3.0]  # the connection open before keeps its handshake


async def test_the_client_deadline_is_forwarded_to_the_backend(start: Any, certs: CertPaths,
                                                               backends: list[BackendProcess]) -> None:
    """The gateway calls the backend with the client's remaining deadline (grpc-timeout), not only its own limit,
    so the backend can drop work nobody will read. Seen by a stand-in for a backend's gRPC port that records the
    deadline each call arrives with and never answers (the REST address, for health checks, is a real backend's)."""
    arrived: list[float | None] = []

    async def hold(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        arrived.append(context.time_remaining())
        await asyncio.sleep(60)  # a deadline ends the call first
        return b""

    stand_in = grpc.aio.server(handlers=[grpc.method_handlers_generic_handler(
        "tensorflow.serving.PredictionService", {"Predict": grpc.unary_unary_rpc_method_handler(hold)})])
    port = stand_in.add_insecure_port("127.0.0.1:0")
    await stand_in.start()
    try:
        doc = document(certs, backends)
        doc["limits"]["request_timeout_s"] = 30
        doc["pools"]["cpu"]["backends"] = [{"rest": f"127.0.0.1:{backends[0].rest_port}", "grpc": f"127.0.0.1:{port}"}]
        channel = await start(doc)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await predict(channel, timeout=3)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert len(arrived) == 1 and arrived[0] is not None and 0 < arrived[0] <= 3, arrived  # the client's, not 30 s
    finally:
        await stand_in.stop(0)


def grpc_predictions_received(backend: Backend, model: str) -> Counter[str]:
    """Predict calls the backend counted over gRPC, by their status code."""
    counts: Counter[str] = Counter()
    for line in backend.get("/monitoring/prometheus/metrics").text.splitlines():
        if (line.startswith("tfgate_backend_requests_total{") and f'model="{model}"' in line
                and 'api="predict"' in line and 'entrypoint="GRPC"' in line):
            counts[re.search(r'code="(\w+)"', line).group(1)] += int(float(line.rpartition(" ")[2]))
    return counts


async def test_a_call_past_its_deadline_never_runs_in_the_backend(start: Any, certs: CertPaths,
                                                                  start_backend: StartBackend, demo_models: Path,
                                                                  tmp_path: Path) -> None:
    """DEADLINE_EXCEEDED end to end: a call still waiting in a batching backend's queue when the client's deadline
    passes is dropped there, never run. Its batch cannot be due before the deadline (batch timeout 4 s > deadline
    2 s), so no timing is assumed. (The backend's cancellation when the gateway gives up would stop it too: the test
    above shows the deadline itself reaches the backend.)"""
    backend = start_batching_backend(start_backend, demo_models, tmp_path,
                                     batching_file(tmp_path / "batching.config", max_batch_size=8,
                                                   timeout_micros=4_000_000))
    lines = io.BytesIO()
    channel = await start(document(certs, [backend], routes=[{"model": "hpt", "pool": "cpu"}]),
                          access_log=AccessLog(lines, flush_s=0))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await predict(channel, model="hpt", timeout=2)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert (await predict(channel, model="hpt", timeout=30))[0] == [4.0]  # latest version, 2: x/2 + 3
    received = grpc_predictions_received(backend, "hpt")
    assert received["OK"] == 1 and sum(received.values()) == 2, received  # both calls reached the backend...
    # ...the expired one counted as such (its own timer or the gateway's cancel, whichever came first), never OK
    assert set(received) - {"OK"} <= {"DEADLINE_EXCEEDED", "CANCELLED"}, received
    assert metric(backend, "tfgate_backend_batch_size_rows_count", "hpt") == 1  # ...one batch ran...
    assert metric(backend, "tfgate_backend_batch_size_rows_sum", "hpt") == 1  # ...with the second call's row only
    gateway = start.gateways[-1]
    await gateway.access_log.drain()  # the call gRPC cancelled at its deadline is logged and counted too...
    first, second = [json.loads(line)["grpc_status"] for line in lines.getvalue().splitlines()]
    # ...as DEADLINE_EXCEEDED, or as CANCELLED when the client's cancel came before the gateway's own deadline did
    assert (first, second) in {("DEADLINE_EXCEEDED", "OK"), ("CANCELLED", "OK")}
    assert f'code="{first}",model="",protocol="grpc"' in gateway.metrics.exposition()[0].decode()
