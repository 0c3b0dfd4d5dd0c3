"""What fuzzing the backend's gRPC API found, against a real backend subprocess with the official client: each bad
request gets a TF Serving status with a clear message, quickly, and the server keeps serving."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    inference_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

from bench import grpc_client
from tests.conftest import Backend, write_model_config

CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


@pytest.fixture(scope="module")
def models_config(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_config(tmp_path_factory.mktemp("fuzz") / "models.config", [
        f'name: "{name}" base_path: "{demo_models / name}"' for name in ("half_plus_two_tf1", "strings")])


@pytest.fixture(scope="module")
def backend(models_config: Path) -> Iterator[Backend]:
    server = Backend([f"--model_config_file={models_config}"], models_config.parent / "backend.log").start()
    yield server.wait_ready()
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def channel(backend: Backend) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{backend.grpc_port}", options=CHANNEL_OPTIONS) as channel:
        yield channel


@pytest.fixture(scope="module")
def prediction(channel: grpc.Channel) -> prediction_service_pb2_grpc.PredictionServiceStub:
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


def still_serving(prediction: prediction_service_pb2_grpc.PredictionServiceStub) -> None:
    request = grpc_client.predict_request("half_plus_two_tf1", None, {"x": np.array([1.0], np.float32)}, "", None)
    assert prediction.Predict(request, timeout=30).outputs["y"].float_val == [2.5]


def error_of(call: object, request: object, **kwargs: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call(request, **kwargs)  # type: ignore[operator]
    return raised.value


@pytest.mark.parametrize("method, message", [
    ("/tensorflow.serving.PredictionService/Predict", "tensorflow.serving.PredictRequest"),
    ("/tensorflow.serving.PredictionService/Classify", "tensorflow.serving.ClassificationRequest"),
    ("/tensorflow.serving.PredictionService/MultiInference", "tensorflow.serving.MultiInferenceRequest"),
    ("/tensorflow.serving.ModelService/GetModelStatus", "tensorflow.serving.GetModelStatusRequest"),
    ("/tensorflow.serving.ModelService/HandleReloadConfigRequest", "tensorflow.serving.ReloadConfigRequest"),
])
def test_bytes_that_are_not_the_message_are_invalid_argument(
        channel: grpc.Channel, backend: Backend, prediction: prediction_service_pb2_grpc.PredictionServiceStub,
        method: str, message: str) -> None:
    """gRPC's own deserializer answered UNKNOWN "Unexpected <class 'google.protobuf.message.DecodeError'>: ..." and
    logged a traceback."""
    raw = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    error = error_of(raw, b"\x0a\x80", timeout=30)  # a length that never ends
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details() == f"The request is not a valid {message}: its protobuf wire format is corrupt"
    assert "DecodeError" not in backend.log()
    still_serving(prediction)


def strings_request(value: bytes, elements: int) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "strings"
    tensor = request.inputs["text"]
    tensor.dtype = types_pb2.DT_STRING
    tensor.tensor_shape.dim.add(size=elements)
    tensor.string_val.append(value)
    return request


@pytest.mark.parametrize("value, elements", [(b"a", 60_000_000), (b"x" * 1000, 1_000_000)])
def test_a_few_bytes_may_not_fill_a_huge_string_tensor(prediction: prediction_service_pb2_grpc.PredictionServiceStub,
                                                       value: bytes, elements: int) -> None:
    """Each string counted one byte against MAX_REPEATED_TENSOR_BYTES: 40 bytes asking for 60 million "a" took 6 GB
    and minutes of the backend (its health checks failed meanwhile); one 1000-byte string for a million elements made
    a 1 GB answer."""
    error = error_of(prediction.Predict, strings_request(value, elements), timeout=30)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"gives 1 values for {elements} elements" in error.details()
    small = prediction.Predict(strings_request(b"ab", 3), timeout=30)  # a small fill still decodes as TensorFlow's
    assert small.outputs["upper_bytes"].string_val == [b"AB"] * 3
    still_serving(prediction)


def test_a_name_echoed_in_an_error_is_cut_to_fit_the_trailers(
        prediction: prediction_service_pb2_grpc.PredictionServiceStub) -> None:
    """A 100 KB signature name echoed whole passed the client's 16 KB metadata limit: RESOURCE_EXHAUSTED "Stream
    removed" instead of INVALID_ARGUMENT."""
    request = grpc_client.predict_request("half_plus_two_tf1", None, {"x": np.array([1.0], np.float32)}, "s" * 100_000,
                                          None)
    error = error_of(prediction.Predict, request, timeout=30)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith('Serving signature name: "sss') and error.details().endswith("… (cut)")
    assert len(error.details()) < 1100


def test_many_multi_inference_tasks_are_checked_in_linear_time(
        prediction: prediction_service_pb2_grpc.PredictionServiceStub) -> None:
    """The duplicate-signature check counted each name in the list of all: quadratic, on the event loop; 50,000
    tasks (3 MB) blocked the backend, health checks included, for 24 s."""
    request = inference_pb2.MultiInferenceRequest()
    for index in range(100_000):
        task = request.tasks.add(method_name="tensorflow/serving/classify")
        task.model_spec.name, task.model_spec.signature_name = "half_plus_two_tf1", f"s{index}"
    request.input.example_list.examples.add().features.feature["x"].float_list.value.append(1.0)
    started = time.monotonic()
    error = error_of(prediction.MultiInference, request, timeout=30)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details() == 'Serving signature name: "s0" not found in signature def'
    assert time.monotonic() - started < 15
    still_serving(prediction)


@pytest.mark.parametrize("base_path, message", [
    ("/models/half\x00plus", "holds a NUL byte"),
    ("~no_such_user_tfgate/models", "Could not determine home directory"),
])
def test_a_reload_with_an_impossible_base_path_is_invalid_argument(
        channel: grpc.Channel, prediction: prediction_service_pb2_grpc.PredictionServiceStub, demo_models: Path,
        base_path: str, message: str) -> None:
    """A NUL byte made the model manager's directory scan raise ValueError mid-reload, "~nobody" made expanduser raise
    RuntimeError: both INTERNAL; the config is refused before anything changes now."""
    config = model_server_config_pb2.ModelServerConfig()
    for name, path in (("half_plus_two_tf1", str(demo_models / "half_plus_two_tf1")), ("odd", base_path)):
        config.model_config_list.config.add(name=name, base_path=path)
    error = error_of(model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest,
                     model_management_pb2.ReloadConfigRequest(config=config), timeout=30)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model 'odd'" in error.details() and message in error.details()
    still_serving(prediction)
    strings = prediction.Predict(strings_request(b"a", 1), timeout=30)  # the reload was refused whole
    assert strings.outputs["upper_bytes"].string_val == [b"A"]


def test_a_reload_of_many_models_is_checked_in_linear_time(
        channel: grpc.Channel, prediction: prediction_service_pb2_grpc.PredictionServiceStub) -> None:
    """The duplicate-name check counted each name in the list of all, on the event loop: 20,000 models took 6.5 s,
    40,000 four times that."""
    config = model_server_config_pb2.ModelServerConfig()
    for index in range(40_000):
        config.model_config_list.config.add(name=f"m{index}", base_path="/nonexistent")
    config.model_config_list.config.add(name="m0", base_path="/nonexistent")
    started = time.monotonic()
    error = error_of(model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest,
                     model_management_pb2.ReloadConfigRequest(config=config), timeout=15)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "model 'm0' is configured twice" in error.details()
    assert time.monotonic() - started < 10
    still_serving(prediction)
