"""TF Serving's REST API on aiohttp: a thin adapter that parses URLs and JSON and calls the core.

Paths follow TF Serving's handler (case-insensitive, like its regexes):
  POST /v1/models/NAME[/versions/N|/labels/L]:(predict|classify|regress)
  GET  /v1/models/NAME[/versions/N|/labels/L][/metadata]
Any other /v1 path is TF Serving's 400 "Malformed request". Probes follow the KServe/Triton convention, so they need
no JSON parsing: GET /v2/health/live, /v2/health/ready and /v2/models/NAME[/versions/N]/ready answer 200 or 503.
Prometheus metrics are served at the monitoring config's path. Every error is `{"error": "..."}` with TF Serving's
status mapping; an unexpected exception is logged with its stack and reaches the client as a bare 500 message.
TensorFlow runs on the inference executor (directly or through the batcher); decoding and encoding run there too
when the body or the answer is big, and on the event loop when it is small enough to cost less than the hop.
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
from aiohttp import web

from backend import errors, inference
from backend.examples import serialized_examples_from_json
from backend.health import Health
from backend.inference import ModelCall
from backend.metrics import BackendMetrics
from backend.models import ModelManager
from backend.runners import INLINE_OUTPUT_ELEMENTS, INLINE_REQUEST_BYTES, CallRunner, offload_if, output_elements
from backend.servable import Servable
from backend.status import metadata_json_dict, status_response, to_json_dict
from backend.tensors import (
    decode_json_object,
    encode_json,
    error_json,
    parse_predict_inputs,
    predict_response,
)

log = logging.getLogger(__name__)

_MODEL_PATH = r"/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
_PREDICTION_PATH = re.compile(_MODEL_PATH + r":(?P<verb>classify|regress|predict)", re.IGNORECASE)
_STATUS_PATH = re.compile(_MODEL_PATH + r"(?P<metadata>/metadata)?", re.IGNORECASE)
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class RestOptions:
    timeout_s: float
    max_body_bytes: int
    metrics_path: str | None = None  # where Prometheus scrapes, when monitoring is on


@dataclass(frozen=True, slots=True)
class _Target:
    name: str
    version: int | None
    label: str | None


@dataclass(slots=True)
class _CallLabels:
    """What the metrics record of a model call, filled in as the handler learns it."""

    api: str
    model: str
    version: int | None = None


MANAGER = web.AppKey("manager", ModelManager)
EXECUTOR = web.AppKey("executor", Executor)
RUNNER = web.AppKey("runner", CallRunner)
OPTIONS = web.AppKey("options", RestOptions)
METRICS = web.AppKey("metrics", BackendMetrics)
HEALTH = web.AppKey("health", Health)
_LABELS = "tfgate.call_labels"
ENTRYPOINT = "REST"


def make_app(manager: ModelManager, executor: Executor, runner: CallRunner, options: RestOptions,
             metrics: BackendMetrics, health: Health) -> web.Application:
    app = web.Application(client_max_size=options.max_body_bytes, middlewares=[_errors_and_metrics])
    app[MANAGER] = manager
    app[EXECUTOR] = executor
    app[RUNNER] = runner
    app[OPTIONS] = options
    app[METRICS] = metrics
    app[HEALTH] = health
    app.router.add_get("/v2/health/live", _live)
    app.router.add_get("/v2/health/ready", _ready)
    app.router.add_get("/v2/models/{name}/ready", _model_ready)
    app.router.add_get("/v2/models/{name}/versions/{version:\\d+}/ready", _model_ready)
    if options.metrics_path:
        app.router.add_get(options.metrics_path, _metrics)
    app.router.add_route("*", "/{tail:.*}", _dispatch)
    return app


@web.middleware
async def _errors_and_metrics(request: web.Request,
                              handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    metrics = request.app[METRICS]
    started, code = time.perf_counter(), grpc.StatusCode.OK
    try:
        with metrics.in_flight(ENTRYPOINT):
            return await handler(request)
    except errors.ServingError as error:
        code = error.code
        return _json_error(error.http_status, error.message)
    except web.HTTPRequestEntityTooLarge:
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
        limit = request.app[OPTIONS].max_body_bytes
        return _json_error(413, f"Request body is larger than the limit of {limit} bytes")
    except web.HTTPException:
        raise
    except Exception:  # the one place an unexpected error stops: logged in full, never sent to the client
        code = grpc.StatusCode.INTERNAL
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return _json_error(500, "Internal error while serving the request; see the server log")
    finally:
        labels: _CallLabels | None = request.get(_LABELS)
        if labels is not None:
            metrics.observe_request(model=labels.model, version=labels.version, api=labels.api,
                                    entrypoint=ENTRYPOINT, code=code.name, seconds=time.perf_counter() - started)


async def _live(request: web.Request) -> web.Response:
    return _json(b'{"live":true}')


async def _ready(request: web.Request) -> web.Response:
    ready = request.app[HEALTH].ready()
    return web.Response(status=200 if ready else 503, body=encode_json({"ready": ready}),
                        content_type="application/json")


async def _model_ready(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    version = request.match_info.get("version")
    ready = request.app[HEALTH].model_ready(name, None if version is None else int(version))
    if ready is None:
        raise errors.NotFound(f"Model {name} is not configured")
    document = {"name": name, "ready": ready, **({"version": version} if version is not None else {})}
    return web.Response(status=200 if ready else 503, body=encode_json(document), content_type="application/json")


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].exposition()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


def _json_error(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=error_json(message), content_type="application/json")


def _json(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="application/json")


async def _dispatch(request: web.Request) -> web.StreamResponse:
    path = request.path
    if request.method == "POST" and (match := _PREDICTION_PATH.fullmatch(path)):
        verb = match["verb"].lower()
        return await _prediction(request, _target(request, match, verb), verb)
    if request.method == "GET" and (match := _STATUS_PATH.fullmatch(path)):
        if match["metadata"]:
            return _metadata(request, _target(request, match, "get_model_metadata"))
        return _status(request, _target(request, match, "get_model_status"))
    if request.method == "GET" and path.rstrip("/").lower() == "/v1/models":
        raise errors.InvalidArgument("Missing model name in request.")
    if path.lower().startswith("/v1/"):
        raise errors.InvalidArgument(f"Malformed request: {request.method} {path}")
    raise errors.NotFound(f"No such endpoint: {request.method} {path}")


def _target(request: web.Request, match: re.Match[str], api: str) -> _Target:
    request[_LABELS] = _CallLabels(api=api, model=match["name"])
    version = None
    if match["version"] is not None:
        version = int(match["version"])
        if version > _INT64_MAX:
            raise errors.InvalidArgument(f"Failed to convert version: {match['version']} to numeric.")
    return _Target(name=match["name"], version=version, label=match["label"])


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A decoded, validated REST call, and how its answer is written."""

    call: ModelCall
    row_format: bool = False


async def _prediction(request: web.Request, target: _Target, verb: str) -> web.Response:
    servable = request.app[MANAGER].resolve(target.name, target.version, target.label)
    request[_LABELS].version = servable.version
    options, executor = request.app[OPTIONS], request.app[EXECUTOR]
    deadline = time.monotonic() + options.timeout_s
    prepare, finish = _VERBS[verb]
    try:
        body = await request.read()
        prepared = await offload_if(len(body) > INLINE_REQUEST_BYTES, executor, deadline,
                                    lambda: prepare(servable, body))
        outputs = await request.app[RUNNER].run(prepared.call, deadline)
        answer = await offload_if(output_elements(outputs) > INLINE_OUTPUT_ELEMENTS, executor, deadline,
                                  lambda: finish(prepared, outputs))
    except errors.DeadlineExceeded:
        raise errors.DeadlineExceeded(f"Request timed out after {options.timeout_s * 1000:.0f} ms "
                                      "(--rest_api_timeout_in_ms)") from None
    return _json(answer)


def _signature_name(request: dict[str, Any]) -> str:
    name = request.get("signature_name", "")
    if not isinstance(name, str):
        raise errors.InvalidArgument("'signature_name' key must be a string value.")
    return name


def _prepare_predict(servable: Servable, body: bytes) -> _Prepared:
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


def _status(request: web.Request, target: _Target) -> web.Response:
    manager = request.app[MANAGER]
    if target.label is not None:
        manager.label_version(target.name, target.label)  # an unknown label is an error; a known one lists all
    statuses = manager.status(target.name, target.version)
    return _json(_pretty(to_json_dict(status_response(statuses))))


def _metadata(request: web.Request, target: _Target) -> web.Response:
    servable = request.app[MANAGER].resolve(target.name, target.version, target.label)
    request[_LABELS].version = servable.version
    return _json(_pretty(metadata_json_dict(servable)))


def _pretty(document: dict[str, Any]) -> bytes:
    return orjson.dumps(document, option=orjson.OPT_INDENT_2)
