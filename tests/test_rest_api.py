"""TF Serving's REST API against a real backend subprocess serving the demo models."""

from __future__ import annotations

import base64
import gzip
import json
from pathlib import Path
from typing import Iterator

import pytest
import requests

from tests.conftest import Backend, write_model_config


@pytest.fixture(scope="module")
def backend(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    work = tmp_path_factory.mktemp("rest")
    config = write_model_config(work / "models.config", [
        f'name: "half_plus_two" base_path: "{demo_models}/half_plus_two" model_platform: "tensorflow" '
        'model_version_policy { all {} } version_labels { key: "stable" value: 1 } '
        'version_labels { key: "canary" value: 2 }',
        f'name: "half_plus_two_tf1" base_path: "{demo_models}/half_plus_two_tf1"',
        f'name: "mlp" base_path: "{demo_models}/mlp"',
        f'name: "strings" base_path: "{demo_models}/strings"',
    ])
    server = Backend([f"--model_config_file={config}", "--rest_api_max_body_bytes=1000000"],
                     work / "backend.log").start()
    yield server.wait_ready()
    assert server.stop() == 0, server.log()


def test_predict_rows_latest_version(backend: Backend) -> None:
    response = backend.post("/v1/models/half_plus_two:predict", {"instances": [1.0, 2.0, 5.0]})
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json() == {"predictions": [3.5, 4.0, 5.5]}  # latest is v2: 0.5x + 3


@pytest.mark.parametrize("path, expected", [
    ("/v1/models/half_plus_two/versions/1:predict", [2.5, 3.0]),
    ("/v1/models/half_plus_two/versions/2:predict", [3.5, 4.0]),
    ("/v1/models/half_plus_two/labels/stable:predict", [2.5, 3.0]),
    ("/v1/models/half_plus_two/labels/canary:predict", [3.5, 4.0]),
    ("/V1/Models/half_plus_two/Versions/1:PREDICT", [2.5, 3.0]),
])
def test_predict_by_version_and_label(backend: Backend, path: str, expected: list[float]) -> None:
    assert backend.post(path, {"instances": [1.0, 2.0]}).json() == {"predictions": expected}


def test_predict_matrix_and_columnar_and_signature_name(backend: Backend) -> None:
    rows = backend.post("/v1/models/half_plus_two/versions/1:predict", {"instances": [[1.0, 2.0], [3.0, 4.0]]})
    assert rows.json() == {"predictions": [[2.5, 3.0], [3.5, 4.0]]}
    columns = backend.post("/v1/models/half_plus_two/versions/1:predict",
                           {"signature_name": "serving_default", "inputs": [3.0, 4.0]})
    assert columns.json() == {"outputs": [3.5, 4.0]}
    named = backend.post("/v1/models/half_plus_two/versions/1:predict", {"inputs": {"x": 2.0}})
    assert named.json() == {"outputs": 3.0}
    named_rows = backend.post("/v1/models/half_plus_two/versions/1:predict", {"instances": [{"x": 2.0}]})
    assert named_rows.json() == {"predictions": [3.0]}


def test_predict_multiple_outputs_rows_and_columns(backend: Backend) -> None:
    image = [0.01 * (i % 7) for i in range(784)]
    rows = backend.post("/v1/models/mlp:predict", {"instances": [image, image]}).json()["predictions"]
    assert len(rows) == 2 and set(rows[0]) == {"probabilities", "class_id"}
    assert abs(sum(rows[0]["probabilities"]) - 1.0) < 1e-4
    assert rows[0]["class_id"] == max(range(10), key=lambda k: rows[0]["probabilities"][k])
    columns = backend.post("/v1/models/mlp:predict", {"inputs": {"x": [image]}}).json()["outputs"]
    assert columns["class_id"] == [rows[0]["class_id"]]


def test_float32_outputs_print_compactly(backend: Backend) -> None:
    response = backend.post("/v1/models/half_plus_two/versions/1:predict", {"instances": [0.2]})
    assert response.content == b'{"predictions":[2.1]}'


def test_nan_and_infinity_tokens_in_and_out(backend: Backend) -> None:
    response = backend.post("/v1/models/half_plus_two/versions/1:predict",
                            b'{"instances": [NaN, Infinity, -Infinity, 1.0]}')
    assert response.status_code == 200
    assert response.content == b'{"predictions":[NaN,Infinity,-Infinity,2.5]}'


def test_string_input_text_and_b64_and_bytes_output(backend: Backend) -> None:
    response = backend.post("/v1/models/strings:predict",
                            {"instances": ["abc", {"b64": base64.b64encode(b"\x00hi\xff").decode()}]})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["length"] for p in predictions] == [3, 4]
    assert base64.b64decode(predictions[0]["upper_bytes"]["b64"]) == b"ABC"
    assert base64.b64decode(predictions[1]["upper_bytes"]["b64"]) == b"\x00HI\xff"


def test_tf1_model_serves_all_signatures(backend: Backend) -> None:
    assert backend.post("/v1/models/half_plus_two_tf1:predict",
                        {"instances": [1.0, 2.0, 5.0]}).json() == {"predictions": [2.5, 3.0, 4.5]}
    assert backend.post("/v1/models/half_plus_two_tf1:regress",
                        {"signature_name": "regress_x_to_y", "examples": [{"x": 80.0}]}).json() == {"results": [42.0]}
    assert backend.post("/v1/models/half_plus_two_tf1:regress",
                        {"signature_name": "regress_x_to_y2", "examples": [{"x": 80.0}]}).json() == {"results": [43.0]}
    assert backend.post("/v1/models/half_plus_two_tf1/versions/123:classify",
                        {"signature_name": "classify_x_to_y", "examples": [{"x": 20.0}]}).json() == {
        "results": [[["", 12.0]]]}


def test_tf2_model_serves_all_signatures(backend: Backend) -> None:
    body = {"signature_name": "classify_x_to_y", "examples": [{"x": 20.0}, {"x": 10.0}]}
    assert backend.post("/v1/models/half_plus_two/labels/stable:classify", body).json() == {
        "results": [[["", 12.0]], [["", 7.0]]]}
    assert backend.post("/v1/models/half_plus_two/versions/1:regress",
                        {"signature_name": "regress_x_to_y2", "examples": [{"x": 80.0}]}).json() == {"results": [43.0]}
    context = {"signature_name": "regress_x2_to_y3", "context": {"x2": 4.0},
               "examples": [{"x": 1.0}, {"x": 1.0, "x2": 8.0}]}
    assert backend.post("/v1/models/half_plus_two/versions/1:regress", context).json() == {"results": [5.0, 7.0]}


def test_classify_with_classes_and_scores(backend: Backend) -> None:
    response = backend.post("/v1/models/mlp:classify",
                            {"signature_name": "classify", "examples": [{"x": [0.5] * 784}]})
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert [label for label, _ in result] == [str(k) for k in range(10)]
    assert abs(sum(score for _, score in result) - 1.0) < 1e-4


def test_status_json_matches_tf_serving(backend: Backend) -> None:
    response = backend.get("/v1/models/half_plus_two")
    assert response.status_code == 200
    ok = {"error_code": "OK", "error_message": ""}
    assert response.json() == {"model_version_status": [
        {"version": "2", "state": "AVAILABLE", "status": ok},
        {"version": "1", "state": "AVAILABLE", "status": ok},
    ]}
    assert backend.get("/v1/models/half_plus_two/versions/1").json() == {
        "model_version_status": [{"version": "1", "state": "AVAILABLE", "status": ok}]}
    assert len(backend.get("/v1/models/half_plus_two/labels/stable").json()["model_version_status"]) == 2


def test_metadata_json_matches_tf_serving(backend: Backend) -> None:
    response = backend.get("/v1/models/half_plus_two_tf1/metadata")
    assert response.status_code == 200
    document = response.json()
    assert document["model_spec"] == {"name": "half_plus_two_tf1", "signature_name": "", "version": "123"}
    signatures = document["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "classify_x_to_y", "regress_x_to_y", "regress_x_to_y2"} <= set(signatures)
    assert signatures["serving_default"]["method_name"] == "tensorflow/serving/predict"
    assert signatures["serving_default"]["inputs"]["x"] == {
        "name": "x:0", "dtype": "DT_FLOAT", "tensor_shape": {"dim": [], "unknown_rank": True}}
    assert signatures["classify_x_to_y"]["method_name"] == "tensorflow/serving/classify"
    labelled = backend.get("/v1/models/half_plus_two/labels/stable/metadata").json()
    assert labelled["model_spec"]["version"] == "1"


def test_gzip_bodies_are_uncompressed_as_tf_serving_does(backend: Backend) -> None:
    """Content-Encoding: gzip bodies are read uncompressed (TF Serving's default), within the body limit (1 MB here),
    and one that is not gzip is a clear 400."""
    path, document = backend.url + "/v1/models/half_plus_two:predict", b'{"instances": [1.0, 2.0, 5.0]}'
    answer = requests.post(path, data=gzip.compress(document), headers={"Content-Encoding": "gzip"}, timeout=30)
    assert (answer.status_code, answer.json()) == (200, {"predictions": [3.5, 4.0, 5.5]})
    bomb = gzip.compress(b'{"instances": [' + b"1.0, " * 400_000 + b"1.0]}")
    too_large = requests.post(path, data=bomb, headers={"Content-Encoding": "gzip"}, timeout=30)
    assert too_large.status_code == 413 and "once uncompressed" in _error(too_large)
    not_gzip = requests.post(path, data=document, headers={"Content-Encoding": "gzip"}, timeout=30)
    assert not_gzip.status_code == 400 and "Unable to uncompress the gzip request body" in _error(not_gzip)


def _error(response: object) -> str:
    body = response.json()  # type: ignore[attr-defined]
    assert set(body) == {"error"}
    return body["error"]


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/models/half_plus_two:predict", b"", 400, "The document is empty"),
    ("/v1/models/half_plus_two:predict", b"instances = [1, 2]", 400, "JSON Parse error"),
    ("/v1/models/half_plus_two:predict", b"[1, 2]", 400, "must be a JSON object"),
    # scanned as numbers on the event loop, unreadable on the inference thread: the general path says why
    ("/v1/models/half_plus_two:predict", b'{"instances": [1.0, 1.2.3]}', 400, "JSON Parse error"),
    # what the standard parser (there for NaN and Infinity) takes but TF Serving's does not: no answer may fail on it
    ("/v1/models/half_plus_two:predict", b'{"instances": ' + b"[" * 5000 + b"1.0" + b"]" * 5000 + b"}", 400,
     "JSON Parse error: depth limit exceeded"),
    ("/v1/models/half_plus_two:predict", b'{"instances": [1.0], "signature_name": "\\ud800"}', 400,
     "JSON Parse error: no low surrogate in string"),
    ("/v1/models/half_plus_two:classify", b'{"signature_name": "classify_x_to_y", "examples": [{"x": "\\udc00"}]}', 400,
     "JSON Parse error: invalid high surrogate in string"),
    ("/v1/models/half_plus_two:predict", b'{"instances": [NaN], "signature_name": "\\ud800"}', 400,
     "JSON Parse error: str is not valid UTF-8"),
    ("/v1/models/half_plus_two:predict", {"instances": [1.0], "inputs": [1.0]}, 400, "only one of"),
    ("/v1/models/half_plus_two:predict", {"signature_name": "serving_default"}, 400,
     "Missing 'inputs' or 'instances' key"),
    ("/v1/models/half_plus_two:predict", {"instances": ["x", "y"]}, 400, "not of expected type: float"),
    # NumPy would read these as 1 and 0 among numbers; TF Serving refuses a boolean for a number
    ("/v1/models/half_plus_two:predict", {"instances": [1.0, True]}, 400, "holds true or false among its numbers"),
    ("/v1/models/half_plus_two:predict", {"inputs": {"x": [[2], [False]]}}, 400, "true or false among its numbers"),
    ("/v1/models/half_plus_two:predict", {"instances": [[1.0], [2.0, 3.0]]}, 400, "same shape"),
    ("/v1/models/half_plus_two:predict", {"instances": [1.0], "signature_name": 100}, 400,
     "'signature_name' key must be a string value."),
    ("/v1/models/half_plus_two:predict", {"instances": [1.0], "signature_name": "nope"}, 400,
     'Serving signature name: "nope" not found'),
    ("/v1/models/half_plus_two:predict", {"instances": [{"x": 1.0, "z": 2.0}]}, 400, "Sent extra: ['z']"),
    ("/v1/models/mlp:predict", {"instances": [[1.0, 2.0]]}, 400, "expects float32 [-1,784]"),
    ("/v1/models/mlp:predict", {"instances": [[None] * 784]}, 400, "not of expected type"),
    ("/v1/models/strings:predict", {"instances": [{"b64": "!!not base64!!"}]}, 400, "base64 decode"),
    ("/v1/models/strings:predict", {"instances": [1]}, 400, "not of expected type: string"),
    ("/v1/models/foo:predict", {"instances": [1.0]}, 404, "Servable not found for request: Latest(foo)"),
    ("/v1/models/half_plus_two/versions/99:predict", {"instances": [1.0]}, 404,
     "Servable not found for request: Specific(half_plus_two, 99)"),
    ("/v1/models/half_plus_two/labels/nope:predict", {"instances": [1.0]}, 400,
     "Unrecognized servable version label: nope"),
    ("/v1/models/half_plus_two:classify", {"signature_name": "serving_default", "examples": [{"x": 1.0}]}, 400,
     "Expected classification signature method_name"),
    ("/v1/models/half_plus_two:regress", {"signature_name": "regress_x_to_y"}, 400, "'examples'"),
    ("/v1/models/half_plus_two:regress", {"signature_name": "regress_x_to_y", "examples": [{"x": 1}]}, 400,
     "x"),
    ("/v1/models/half_plus_two/versions/99999999999999999999:predict", {"instances": [1.0]}, 400,
     "Failed to convert version"),
    ("/v1/models/half_plus_two/version/1:predict", {"instances": [1.0]}, 400, "Malformed request"),
    # a version is ASCII digits, as TF Serving's RE2 \d: not "١" (Arabic-Indic one), which Python's \d takes
    ("/v1/models/half_plus_two/versions/%D9%A1:predict", {"instances": [1.0]}, 400, "Malformed request"),
])
def test_bad_requests_get_tf_serving_errors(backend: Backend, path: str, body: object, status: int,
                                             message: str) -> None:
    response = backend.post(path, body)
    assert response.status_code == status, response.text
    assert message in _error(response)


@pytest.mark.parametrize("path, status, message", [
    ("/v1/models/foo", 404, "Could not find any versions of model foo"),
    ("/v1/models/half_plus_two/versions/7", 404, "Could not find version 7 of model half_plus_two"),
    ("/v1/models/half_plus_two/labels/nope", 400, "Unrecognized servable version label"),
    ("/v1/models/foo/metadata", 404, "Servable not found"),
    ("/v1/models", 400, "Missing model name"),
    ("/v1/foo", 400, "Malformed request"),
    ("/v1/models/foo:predict", 400, "Malformed request"),
    ("/nowhere", 404, "No such endpoint"),
])
def test_bad_gets_get_tf_serving_errors(backend: Backend, path: str, status: int, message: str) -> None:
    response = backend.get(path)
    assert response.status_code == status, response.text
    assert message in _error(response)


def test_oversized_body_is_413_and_server_keeps_serving(backend: Backend) -> None:
    huge = json.dumps({"instances": [1.0] * 300_000}).encode()
    response = backend.post("/v1/models/half_plus_two:predict", huge)
    assert response.status_code == 413
    assert "larger than the limit" in _error(response)
    assert backend.post("/v1/models/half_plus_two:predict", {"instances": [1.0]}).status_code == 200


def test_failed_requests_do_not_disturb_the_server(backend: Backend) -> None:
    for _ in range(3):
        assert backend.post("/v1/models/half_plus_two:predict", b"{").status_code == 400
    assert backend.post("/v1/models/half_plus_two/versions/1:predict", {"instances": [1.0]}).json() == {
        "predictions": [2.5]}
    assert "Traceback" not in backend.log()
