"""The model spec read and replaced in serialized TF Serving requests, checked against the protobuf runtime itself."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_pb2,
    predict_pb2,
    regression_pb2,
)

from gateway.grpc_wire import (
    MAX_FIELDS,
    WireError,
    fields,
    read_model_spec,
    read_tasks,
    with_model_spec,
    with_task_versions,
)


def predict_request(**spec: object) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(**spec))
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.arange(1000, dtype=np.float32)))
    request.output_filter.append("y")
    return request


REQUESTS = [
    predict_request(name="half_plus_two"),
    predict_request(name="mlp", signature_name="serving_default", version_label="canary"),
    predict_request(name="m", version={"value": 3}),
    classification_pb2.ClassificationRequest(model_spec=model_pb2.ModelSpec(name="c", signature_name="classify")),
    regression_pb2.RegressionRequest(model_spec=model_pb2.ModelSpec(name="r")),
    get_model_metadata_pb2.GetModelMetadataRequest(model_spec=model_pb2.ModelSpec(name="m"),
                                                   metadata_field=["signature_def"]),
    get_model_status_pb2.GetModelStatusRequest(model_spec=model_pb2.ModelSpec(name="s", version={"value": 1})),
]


@pytest.mark.parametrize("request_message", REQUESTS, ids=lambda r: type(r).__name__)
def test_read_matches_the_parser(request_message: object) -> None:
    data = request_message.SerializeToString()  # type: ignore[attr-defined]
    spec, found = read_model_spec(data)
    assert spec == request_message.model_spec  # type: ignore[attr-defined]
    assert len(found) == 1


@pytest.mark.parametrize("request_message", REQUESTS, ids=lambda r: type(r).__name__)
def test_replace_keeps_every_other_field(request_message: object) -> None:
    data = request_message.SerializeToString()  # type: ignore[attr-defined]
    _, found = read_model_spec(data)
    new_spec = model_pb2.ModelSpec(name="other", version_label="stable", signature_name="sig")
    rewritten = with_model_spec(data, found, new_spec)
    parsed = type(request_message)()
    parsed.ParseFromString(rewritten)
    expected = type(request_message)()
    expected.CopyFrom(request_message)  # type: ignore[arg-type]
    expected.model_spec.CopyFrom(new_spec)
    assert parsed == expected


def test_a_missing_spec_reads_empty_and_is_added() -> None:
    request = predict_pb2.PredictRequest()
    request.inputs["x"].CopyFrom(tf.make_tensor_proto([1.0]))
    data = request.SerializeToString()
    spec, found = read_model_spec(data)
    assert spec == model_pb2.ModelSpec() and found == []
    parsed = predict_pb2.PredictRequest.FromString(with_model_spec(data, found, model_pb2.ModelSpec(name="m")))
    assert parsed.model_spec.name == "m" and parsed.inputs["x"] == request.inputs["x"]


def test_repeated_spec_fields_merge_as_the_parser_merges_them() -> None:
    first = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="a", signature_name="s")).SerializeToString()
    second = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(version_label="canary")).SerializeToString()
    data = first + second
    spec, found = read_model_spec(data)
    assert spec == predict_pb2.PredictRequest.FromString(data).model_spec
    assert (spec.name, spec.signature_name, spec.version_label) == ("a", "s", "canary") and len(found) == 2
    rewritten = predict_pb2.PredictRequest.FromString(with_model_spec(data, found, model_pb2.ModelSpec(name="b")))
    assert rewritten.model_spec == model_pb2.ModelSpec(name="b")


def test_fields_walks_every_wire_type() -> None:
    # field 1 varint 150, field 2 fixed64, field 3 bytes "ab", field 4 fixed32
    data = bytes([0x08, 0x96, 0x01, 0x11, *range(8), 0x1A, 0x02, 0x61, 0x62, 0x25, 1, 2, 3, 4])
    assert [(f.number, f.wire_type, data[f.value_start:f.end]) for f in fields(data)] == [
        (1, 0, bytes([0x96, 0x01])), (2, 1, bytes(range(8))), (3, 2, b"ab"), (4, 5, bytes([1, 2, 3, 4]))]


@pytest.mark.parametrize(("data", "message"), [
    (b"\x0a\x05abc", "runs past the end"),
    (b"\x0a", "varint is truncated"),
    (b"\x08" + b"\xff" * 11, "varint is truncated or longer than 10 bytes"),
    (b"\x0b", "wire type 3"),
    (b"\x00\x01", "field number 0"),
    (b"\x08\x01", "model_spec has wire type 0"),
    (b"\x0a\x02\xff\xff", "model_spec does not parse"),
])
def test_bad_bytes_raise_wire_error(data: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        read_model_spec(data)


def test_a_message_of_too_many_fields_is_refused_early() -> None:
    """Each field costs about a microsecond: 4 MB of two-byte fields held the gateway's event loop 2.3 s (5 s as
    MultiInference tasks), before authentication. Big fields are not the issue, their number is."""
    spec = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="m")).SerializeToString()
    assert read_model_spec(b"\x78\x00" * (MAX_FIELDS - 1) + spec)[0].name == "m"
    for data in (b"\x78\x00" * MAX_FIELDS + spec, b"\x78\x00" * 2_000_000 + spec):
        with pytest.raises(WireError, match=f"more than {MAX_FIELDS} fields in one message"):
            read_model_spec(data)
    with pytest.raises(WireError, match="more than"):
        read_tasks(b"\x0a\x00" * 1_000_000)


def test_multi_inference_tasks_are_read_and_every_one_rewritten() -> None:
    request = inference_pb2.MultiInferenceRequest()
    for signature, method in (("a", "tensorflow/serving/classify"), ("b", "tensorflow/serving/regress")):
        task = request.tasks.add(method_name=method)
        task.model_spec.name, task.model_spec.signature_name = "m", signature
    request.input.example_list.examples.add().features.feature["x"].float_list.value.append(2.0)
    data = request.SerializeToString()
    tasks = read_tasks(data)
    assert [(spec.name, spec.signature_name, method) for spec, method, _ in tasks] == [
        ("m", "a", "tensorflow/serving/classify"), ("m", "b", "tensorflow/serving/regress")]
    for version, label in ((7, None), (None, "canary")):
        parsed = inference_pb2.MultiInferenceRequest.FromString(with_task_versions(data, tasks, version, label))
        expected = inference_pb2.MultiInferenceRequest()
        expected.CopyFrom(request)
        for task in expected.tasks:
            if version is not None:
                task.model_spec.version.value = version
            else:
                task.model_spec.version_label = label
        assert parsed == expected
