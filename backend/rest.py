"""TF Serving's REST API: a thin adapter that parses URLs and JSON and calls the core.

Paths follow TF Serving's handler (case-insensitive, like its regexes):
  POST /v1/models/NAME[/versions/N|/labels/L]:(predict|classify|regress)
  GET  /v1/models/NAME[/versions/N|/labels/L][/metadata]
Any other /v1 path is TF Serving's 400 "Malformed request". Probes follow the KServe/Triton convention, so they need
no JSON parsing: GET /v2/health/live, /v2/health/ready and /v2/models/NAME[/versions/N]/ready answer 200 or 503.
Prometheus metrics are served at the monitoring config's path. Every error is `{"error": "..."}` with TF Serving's
status mapping; an unexpected exception is logged with its stack and reaches the client as a bare 500 message.

It runs on `http_server.py`, a lean HTTP/1.1 server: per request the event loop does little more than parse,
route and write. TensorFlow runs on the inference executor (directly or through the batcher); decoding and encoding
run there too when the body or the answer is big, and on the event loop when they cost less than the hop.
"""

from __future__ import annotations

import logging
import re
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import grpc
import numpy as np
import orjson

from backend import errors, inference
from backend.body_encoding import gunzip_body, is_gzip
from backend.examples import serialized_examples_from_json
from backend.health import Health
from backend.http_server import HttpRequest, HttpResponse, json_error_body
from backend.inference import ModelCall
from backend.metrics import BackendMetrics
from backend.models import ModelManager
from backend.numeric_json import parse_numeric_request
from backend.runners import INLINE_OUTPUT_ELEMENTS, INLINE_REQUEST_BYTES, CallRunner, offload_if, output_elements
from backend.servable import Servable
from backend.status import metadata_json_dict, status_response, to_json_dict
from backend.tensors import (
    decode_json_object,
    encode_json,
    parse_predict_inputs,
    predict_response,
    single_numeric_input,
)
from backend.version_policy import MAX_VERSION

log = logging.getLogger(__name__)

_MODEL_PATH = r"/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[0-9]+)|/labels/(?P<label>[^/:]+))?"
_PREDICTION_PATH = re.compile(_MODEL_PATH + r":(?P<verb>classify|regress|predict)", re.IGNORECASE)
_STATUS_PATH = re.compile(_MODEL_PATH + r"(?P<metadata>/metadata)?", re.IGNORECASE)
_MODEL_READY_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[0-9]+))?/ready")
ENTRYPOINT = "REST"


@dataclass(frozen=True, slots=True)
class RestOptions:
    timeout_s: float
    max_body_bytes: int
    metrics_path: str | None = None  # where Prometheus scrapes, when monitoring is on


# Made per request (see backend/inference.py's ModelCall).
@dataclass(slots=True, init=False)
class _Target:
    name: str
    version: int | None
    label: str | None

    def __init__(self, name: str, version: int | None, label: str | None) -> None:
        self.name, self.version, self.label = name, version, label


@dataclass(slots=True, init=False)
class _CallLabels:
    """What the metrics record of a model call, filled in as the handler learns it."""

    api: str
    model: str
    version: int | None

    def __init__(self) -> None:
        self.api, self.model, self.version = "", "", None


@dataclass(slots=True, init=False)
class _Prepared:
    """A decoded, validated REST call, and how its answer is written."""

    call: ModelCall
    row_format: bool

    def __init__(self, call: ModelCall, row_format: bool = False) -> None:
        self.call, self.row_format = call, row_format


Exposition = Callable[[], Awaitable[tuple[bytes, str]]]  # Prometheus text, and its content type


def json_response(status: int, body: bytes) -> HttpResponse:
    return HttpResponse(status=status, body=body)


class RestApi:
    def __init__(self, manager: ModelManager, executor: Executor, runner: CallRunner, options: RestOptions,
                 metrics: BackendMetrics, health: Health, exposition: Exposition | None = None) -> None:
        self._manager = manager
        self._executor = executor
        self._runner = runner
        self._options = options
        self._metrics = metrics
        self._health = health
        self._exposition = exposition  # the whole backend's metrics, when not this process's alone (--workers)

    async def handle(self, request: HttpRequest) -> HttpResponse:
        """Route one request; errors become TF Serving's JSON errors; model calls are counted in the metrics."""
        started, code, labels = time.perf_counter(), grpc.StatusCode.OK, _CallLabels()
        with self._metrics.in_flight(ENTRYPOINT):
            try:
                return await self._route(request, labels)
            except errors.ServingError as error:
                code = error.code
                return json_response(error.http_status, json_error_body(error.http_status, error.message))
            except Exception:  # the one place an unexpected error stops: logged in full, never sent to the client
                code = grpc.StatusCode.INTERNAL
                log.exception("unexpected error serving %s %s", request.method, request.path)
                return json_response(500, json_error_body(500, errors.INTERNAL_MESSAGE))
            finally:
                if labels.api:
                    self._metrics.observe_request(model=labels.model, version=labels.version, api=labels.api,
                                                  entrypoint=ENTRYPOINT, code=code.name,
                                                  seconds=time.perf_counter() - started)

    async def _route(self, request: HttpRequest, labels: _CallLabels) -> HttpResponse:
        path, method = request.path, request.method
        if method == "POST" and (match := _PREDICTION_PATH.fullmatch(path)):
            verb = match["verb"].lower()
            return await self._prediction(request, _target(match, labels, verb), verb, labels)
        if method in ("GET", "HEAD"):
            if match := _STATUS_PATH.fullmatch(path):
                if match["metadata"]:
                    return self._metadata(_target(match, labels, "get_model_metadata"), labels)
                return self._status(_target(match, labels, "get_model_status"))
            if path.startswith("/v2/"):
                return self._probe(path)
            if path == self._options.metrics_path:
                body, content_type = (self._metrics.exposition() if self._exposition is None
                                      else await self._exposition())
                return HttpResponse(status=200, body=body, content_type=content_type)
            if path.rstrip("/").lower() == "/v1/models":
                raise errors.InvalidArgument("Missing model name in request.")
        if path.lower().startswith("/v1/"):
            raise errors.InvalidArgument(f"Malformed request: {method} {path}")
        raise errors.NotFound(f"No such endpoint: {method} {path}")

    def _probe(self, path: str) -> HttpResponse:
        if path == "/v2/health/live":
            return json_response(200, b'{"live":true}')
        if path == "/v2/health/ready":
            ready = self._health.ready()
            return json_response(200 if ready else 503, encode_json({"ready": ready}))
        if match := _MODEL_READY_PATH.fullmatch(path):
            name, version = match["name"], match["version"]
            model_ready = self._health.model_ready(name, None if version is None else int(version))
            if model_ready is None:
                raise errors.NotFound(f"Model {name} is not configured")
            document = {"name": name, "ready": model_ready, **({"version": version} if version is not None else {})}
            return json_response(200 if model_ready else 503, encode_json(document))
        raise errors.NotFound(f"No such endpoint: GET {path}")

    async def _prediction(self, request: HttpRequest, target: _Target, verb: str,
                          labels: _CallLabels) -> HttpResponse:
        servable = self._manager.resolve(target.name, target.version, target.label)
        labels.version = servable.version
        timeout_s, executor, body = self._options.timeout_s, self._executor, request.body
        deadline = time.monotonic() + timeout_s
        prepare, finish = _VERBS[verb]
        gzipped, max_body_bytes = is_gzip(request.headers.get("content-encoding", "")), self._options.max_body_bytes
        try:
            # A gzipped body's size says little of its work once uncompressed, and zlib runs without the GIL.
            prepared = await offload_if(gzipped or len(body) > INLINE_REQUEST_BYTES, executor, deadline,
                                        lambda: prepare(servable, gunzip_body(body, max_body_bytes) if gzipped
                                                        else body))
            outputs = await self._runner.run(prepared.call, deadline)
            answer = await offload_if(output_elements(outputs) > INLINE_OUTPUT_ELEMENTS, executor, deadline,
                                      lambda: finish(prepared, outputs))
        except errors.DeadlineExceeded:
            raise errors.DeadlineExceeded(f"Request timed out after {timeout_s * 1000:.0f} ms "
                                          "(--rest_api_timeout_in_ms)") from None
        return json_response(200, answer)

    def _status(self, target: _Target) -> HttpResponse:
        statuses = self._manager.status(target.name, target.version, target.label)
        return json_response(200, _pretty(to_json_dict(status_response(statuses))))

    def _metadata(self, target: _Target, labels: _CallLabels) -> HttpResponse:
        servable = self._manager.resolve(target.name, target.version, target.label)
        labels.version = servable.version
        return json_response(200, _pretty(metadata_json_dict(servable)))


def _target(match: re.Match[str], labels: _CallLabels, api: str) -> _Target:
    labels.api, labels.model = api, match["name"]
    version = None
    if match["version"] is not None:
        version = int(match["version"])
        if version > MAX_VERSION:
            raise errors.InvalidArgument(f"Failed to convert version: {match['version']} to numeric.")
    return _Target(name=match["name"], version=version, label=match["label"])


def _signature_name(request: dict[str, Any]) -> str:
    name = request.get("signature_name", "")
    if not isinstance(name, str):
        raise errors.InvalidArgument("'signature_name' key must be a string value.")
    return name


def _prepare_predict(servable: Servable, body: bytes) -> _Prepared:
    numeric = parse_numeric_request(body, lambda name: single_numeric_input(servable.signature(name).inputs))
    if numeric is not None:  # the common body, without a Python object per number
        return _Prepared(inference.predict_call(servable, numeric.signature_name, numeric.inputs), numeric.row_format)
    request = decode_json_object(body)
    signature_name = _signature_name(request)
    inputs, row_format = parse_predict_inputs(request, servable.signature(signature_name).inputs)
    return _Prepared(inference.predict_call(servable, signature_name, inputs), row_format)


def _finish_predict(prepared: _Prepared, outputs: dict[str, np.ndarray]) -> bytes:
    return predict_response(outputs, prepared.row_format)


def _prepare_classify(servable: Servable, body: bytes) -> _Prepared:
    request = decode_json_object(body)
    return _Prepared(inference.classify_call(servable, _signature_name(request),
                                             serialized_examples_from_json(request)))


def _finish_classify(prepared: _Prepared, outputs: dict[str, np.ndarray]) -> bytes:
    results = inference.classify_results(prepared.call, outputs)
    return encode_json({"results": [[[label.decode(errors="replace"), score] for label, score in classes]
                                    for classes in results]})


def _prepare_regress(servable: Servable, body: bytes) -> _Prepared:
    request = decode_json_object(body)
    return _Prepared(inference.regress_call(servable, _signature_name(request),
                                            serialized_examples_from_json(request)))


def _finish_regress(prepared: _Prepared, outputs: dict[str, np.ndarray]) -> bytes:
    return encode_json({"results": inference.regress_results(prepared.call, outputs)})


_Prepare = Callable[[Servable, bytes], _Prepared]
_Finish = Callable[[_Prepared, dict[str, np.ndarray]], bytes]
_VERBS: dict[str, tuple[_Prepare, _Finish]] = {
    "predict": (_prepare_predict, _finish_predict),
    "classify": (_prepare_classify, _finish_classify),
    "regress": (_prepare_regress, _finish_regress),
}


def _pretty(document: dict[str, Any]) -> bytes:
    return orjson.dumps(document, option=orjson.OPT_INDENT_2)
