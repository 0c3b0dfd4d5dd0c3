"""TF Serving's gRPC API against a real backend subprocess, through the official tensorflow_serving.apis stubs."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow.core.example import example_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)
from tensorflow_serving.config import model_server_config_pb2

from bench import grpc_client
from tests.conftest import Backend, write_model_config

HPT_ENTRY = ('name: "half_plus_two" base_path: "{models}/half_plus_two" model_version_policy {{ all {{}} }} '
             'version_labels {{ key: "stable" value: 1 }} version_labels {{ key: "canary" value: 2 }}')


@pytest.fixture(scope="module")
def backend(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    work = tmp_path_factory.mktemp("grpc")
    config = write_model_config(work / "models.config", [
        HPT_ENTRY.format(models=demo_models),
        f'name: "half_plus_two_tf1" base_path: "{demo_models}/half_plus_two_tf1"',
        f'name: "mlp" base_path: "{demo_models}/mlp"',
    ])
    server = Backend([f"--model_config_file={config}", "--enable_grpc_healthcheck_service"],
                     work / "backend.log").start()
    yield server.wait_ready()
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def channel(backend: Backend) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{backend.grpc_port}") as channel:
        yield channel


@pytest.fixture(scope="module")
def prediction(channel: grpc.Channel) -> prediction_service_pb2_grpc.PredictionServiceStub:
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture(scope="module")
def model_service(channel: grpc.Channel) -> model_service_pb2_grpc.ModelServiceStub:
    return model_service_pb2_grpc.ModelServiceStub(channel)


def predict_request(model: str, values: list[float], *, version: int | None = None, label: str | None = None,
                    signature: str = "") -> predict_pb2.PredictRequest:
    return grpc_client.predict_request(model, version, {"x": np.array(values, np.float32)}, signature, label)


def examples(*xs: float) -> list[example_pb2.Example]:
    result = []
    for x in xs:
        example = example_pb2.Example()
        example.features.feature["x"].float_list.value.append(x)
        result.append(example)
    return result


@pytest.mark.parametrize("version, label, expected, served", [
    (None, None, [3.5, 4.0], 2),
    (1, None, [2.5, 3.0], 1),
    (None, "stable", [2.5, 3.0], 1),
    (None, "canary", [3.5, 4.0], 2),
])
def test_predict_by_version_and_label(prediction: prediction_service_pb2_grpc.PredictionServiceStub,
                                      version: int | None, label: str | None, expected: list[float],
                                      served: int) -> None:
    response = prediction.Predict(predict_request("half_plus_two", [1.0, 2.0], version=version, label=label),
                                  timeout=30)
    assert tf.make_ndarray(response.outputs["y"]).tolist() == expected
    assert response.outputs["y"].float_val == expected  # typed fields, as TF Serving by default
    assert (response.model_spec.name, response.model_spec.version.value) == ("half_plus_two", served)
    assert response.model_spec.signature_name == "serving_default"


def test_predict_accepts_typed_fields_and_tensor_content(
        prediction: prediction_service_pb2_grpc.PredictionServiceStub) -> None:
    request = predict_request("half_plus_two", [1.0], version=1)
    request.inputs["x"].Clear()
    request.inputs["x"].dtype = tf.float32.as_datatype_enum
    request.inputs["x"].tensor_shape.dim.add(size=2)
    request.inputs["x"].float_val.extend([1.0, 3.0])
    assert tf.make_ndarray(prediction.Predict(request, timeout=30).outputs["y"]).tolist() == [2.5, 3.5]
    assert predict_request("half_plus_two", [1.0, 3.0]).inputs["x"].tensor_content  # the other encoding


def test_predict_output_filter_and_multiple_outputs(
        prediction: prediction_service_pb2_grpc.PredictionServiceStub) -> None:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mlp"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.full((3, 784), 0.1, np.float32)))
    full = prediction.Predict(request, timeout=30)
    assert set(full.outputs) == {"probabilities", "class_id"}
    request.output_filter.append("class_id")
    filtered = prediction.Predict(request, timeout=30)
    assert set(filtered.outputs) == {"class_id"}
    assert tf.make_ndarray(filtered.outputs["class_id"]).shape == (3,)


def test_classify_regress_and_multi_inference_on_tf1_and_tf2(
        prediction: prediction_service_pb2_grpc.PredictionServiceStub) -> None:
    for model, version in (("half_plus_two_tf1", 123), ("half_plus_two", 1)):
        classify = classification_pb2.ClassificationRequest()
        classify.model_spec.name, classify.model_spec.signature_name = model, "classify_x_to_y"
        classify.model_spec.version.value = version
        classify.input.example_list.examples.extend(examples(20.0, 10.0))
        result = prediction.Classify(classify, timeout=30)
        assert [[c.score for c in row.classes] for row in result.result.classifications] == [[12.0], [7.0]]
        assert result.model_spec.signature_name == "classify_x_to_y"

        regress = regression_pb2.RegressionRequest()
        regress.model_spec.name, regress.model_spec.signature_name = model, "regress_x_to_y2"
        regress.model_spec.version.value = version
        regress.input.example_list_with_context.examples.extend(examples(80.0))
        assert [r.value for r in prediction.Regress(regress, timeout=30).result.regressions] == [43.0]

        multi = inference_pb2.MultiInferenceRequest()
        for signature, method in (("classify_x_to_y", "tensorflow/serving/classify"),
                                  ("regress_x_to_y2", "tensorflow/serving/regress")):
            task = multi.tasks.add(method_name=method)
            task.model_spec.name, task.model_spec.signature_name = model, signature
            task.model_spec.version.value = version
        multi.input.example_list.examples.extend(examples(2.0))
        results = prediction.MultiInference(multi, timeout=30).results
        assert results[0].classification_result.classifications[0].classes[0].score == 3.0
        assert results[1].regression_result.regressions[0].value == 4.0


def test_classify_labels_from_classes(prediction: prediction_service_pb2_grpc.PredictionServiceStub) -> None:
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name, request.model_spec.signature_name = "mlp", "classify"
    example = request.input.example_list.examples.add()
    example.features.feature["x"].float_list.value.extend([0.2] * 784)
    (row,) = prediction.Classify(request, timeout=30).result.classifications
    assert [c.label for c in row.classes] == [str(k) for k in range(10)]


def test_get_model_metadata(prediction: prediction_service_pb2_grpc.PredictionServiceStub) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "half_plus_two_tf1"
    response = prediction.GetModelMetadata(request, timeout=30)
    assert response.model_spec.version.value == 123
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    assert signatures.signature_def["serving_default"].inputs["x"].tensor_shape.unknown_rank
    assert signatures.signature_def["classify_x_to_y"].method_name == "tensorflow/serving/classify"


def test_get_model_status(model_service: model_service_pb2_grpc.ModelServiceStub) -> None:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "half_plus_two"
    statuses = model_service.GetModelStatus(request, timeout=30).model_version_status
    assert [(s.version, s.state) for s in statuses] == [(2, 30), (1, 30)]
    assert all(s.status.error_code == 0 for s in statuses)


def _error(call: object, *args: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call(*args, timeout=30)  # type: ignore[operator]
    return raised.value


def _repeated_value_request(rows: int) -> predict_pb2.PredictRequest:
    """One typed value for `rows` rows of the MLP: TensorFlow would repeat it to fill them (35 bytes asking for GBs)."""
    request = predict_request("mlp", [1.0])
    request.inputs["x"].CopyFrom(tf.make_tensor_proto([1.0], dtype=tf.float32))
    request.inputs["x"].tensor_shape.dim[0].size = rows
    request.inputs["x"].tensor_shape.dim.add(size=784)
    return request


@pytest.mark.parametrize("request_factory, code, message", [
    (lambda: predict_request("nope", [1.0]), grpc.StatusCode.NOT_FOUND, "Servable not found"),
    (lambda: predict_request("half_plus_two", [1.0], version=9), grpc.StatusCode.NOT_FOUND, "Specific"),
    (lambda: predict_request("half_plus_two", [1.0], label="nope"), grpc.StatusCode.INVALID_ARGUMENT,
     "Unrecognized servable version label"),
    (lambda: predict_request("half_plus_two", [1.0], signature="nope"), grpc.StatusCode.INVALID_ARGUMENT,
     "not found in signature def"),
    (lambda: predict_request("mlp", [1.0, 2.0]), grpc.StatusCode.INVALID_ARGUMENT, "expects float32 [-1,784]"),
    (lambda: predict_request("", [1.0]), grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec"),
    (lambda: _repeated_value_request(100_000), grpc.StatusCode.INVALID_ARGUMENT, "gives 1 values for 78400000"),
])
def test_predict_errors_have_tf_serving_codes(prediction: prediction_service_pb2_grpc.PredictionServiceStub,
                                             request_factory: object, code: grpc.StatusCode, message: str) -> None:
    error = _error(prediction.Predict, request_factory())  # type: ignore[operator]
    assert error.code() == code and message in error.details()


def test_wrong_dtype_and_unknown_input_are_invalid_argument(
        prediction: prediction_service_pb2_grpc.PredictionServiceStub) -> None:
    request = predict_request("half_plus_two", [1.0])
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([1.0], np.float64)))
    error = _error(prediction.Predict, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "DT_DOUBLE" in error.details()
    request.inputs["z"].CopyFrom(tf.make_tensor_proto(np.array([1.0], np.float32)))
    error = _error(prediction.Predict, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "Sent extra" in error.details()


def test_expired_deadline_is_not_run(prediction: prediction_service_pb2_grpc.PredictionServiceStub,
                                     backend: Backend) -> None:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mlp"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.full((2048, 784), 0.5, np.float32)))
    with pytest.raises(grpc.RpcError) as raised:
        prediction.Predict(request, timeout=0.001)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The server keeps serving afterwards.
    assert prediction.Predict(predict_request("half_plus_two", [1.0]), timeout=30).outputs["y"].float_val == [3.5]


def test_health_service(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService"):
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_a_health_request_that_does_not_parse_is_invalid_argument(channel: grpc.Channel) -> None:
    """Found fuzzing: such bytes got UNKNOWN naming a Python exception, and a traceback in the log, each time; the
    backend now registers health as the gateway does (backend/grpc_health_service.py)."""
    with pytest.raises(grpc.RpcError) as raised:
        channel.unary_unary("/grpc.health.v1.Health/Check")(b"\x0a\x80", timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert raised.value.details() == "The request is not a valid grpc.health.v1.HealthCheckRequest"  # type: ignore


def test_reload_config_adds_and_removes_models(model_service: model_service_pb2_grpc.ModelServiceStub,
                                               prediction: prediction_service_pb2_grpc.PredictionServiceStub,
                                               demo_models: Path) -> None:
    def reload(*entries: tuple[str, str], timeout: float = 60) -> model_management_pb2.ReloadConfigResponse:
        config = model_server_config_pb2.ModelServerConfig()
        for name, path in entries:
            config.model_config_list.config.add(name=name, base_path=path, model_platform="tensorflow")
        return model_service.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=config),
                                                       timeout=timeout)

    hpt1 = ("tf1", str(demo_models / "half_plus_two_tf1"))
    mlp = ("mlp", str(demo_models / "mlp"))
    assert reload(hpt1, mlp).status.error_code == 0
    # Returned only once the added model is available: it serves at once.
    response = prediction.Predict(predict_request("tf1", [1.0]), timeout=30)
    assert response.outputs["y"].float_val == [2.5]
    error = _error(prediction.Predict, predict_request("half_plus_two", [1.0]))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    empty = model_service.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(), timeout=30)
    assert empty.status.error_code == 0  # no config: no action, as TF Serving
    assert prediction.Predict(predict_request("tf1", [1.0]), timeout=30).outputs["y"].float_val == [2.5]
    ghost = _error(reload, hpt1, ("ghost", "/nonexistent/base/path"))
    assert ghost.code() == grpc.StatusCode.FAILED_PRECONDITION and "ghost" in ghost.details()
    duplicate = _error(reload, hpt1, hpt1)
    assert duplicate.code() == grpc.StatusCode.INVALID_ARGUMENT and "configured twice" in duplicate.details()
    labelled = model_server_config_pb2.ModelServerConfig()
    entry = labelled.model_config_list.config.add(name="tf1", base_path=hpt1[1], model_platform="tensorflow")
    entry.version_labels["stable"] = 999  # no such version: FAILED_PRECONDITION in TF Serving's ServerCore
    unavailable = _error(model_service.HandleReloadConfigRequest,
                         model_management_pb2.ReloadConfigRequest(config=labelled))
    assert unavailable.code() == grpc.StatusCode.FAILED_PRECONDITION, unavailable.details()
    assert "which is not currently available for inference" in unavailable.details()
