"""TF Serving's REST API on aiohttp: a thin adapter that parses URLs and JSON and calls the core.

Paths follow TF Serving's handler (case-insensitive, like its regexes):
  POST /v1/models/NAME[/versions/N|/labels/L]:(predict|classify|regress)
  GET  /v1/models/NAME[/versions/N|/labels/L][/metadata]
Any other /v1 path is TF Serving's 400 "Malformed request". Every error is `{"error": "..."}` with TF Serving's
status mapping; an unexpected exception is logged with its stack and reaches the client as a bare 500 message.
JSON work and TensorFlow run on the inference executor, so the event loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import logging
import re
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import orjson
from aiohttp import web

from backend import errors, inference
from backend.examples import serialized_examples_from_json
from backend.models import ModelManager
from backend.servable import Servable
from backend.status import metadata_json_dict, status_response, to_json_dict
from backend.tensors import decode_json_object, encode_json, error_json, parse_predict_inputs, predict_response

log = logging.getLogger(__name__)

_MODEL_PATH = r"/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
_PREDICTION_PATH = re.compile(_MODEL_PATH + r":(?P<verb>classify|regress|predict)", re.IGNORECASE)
_STATUS_PATH = re.compile(_MODEL_PATH + r"(?P<metadata>/metadata)?", re.IGNORECASE)
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class RestOptions:
    timeout_s: float
    max_body_bytes: int


@dataclass(frozen=True, slots=True)
class _Target:
    name: str
    version: int | None
    label: str | None


MANAGER = web.AppKey("manager", ModelManager)
EXECUTOR = web.AppKey("executor", Executor)
OPTIONS = web.AppKey("options", RestOptions)


def make_app(manager: ModelManager, executor: Executor, options: RestOptions) -> web.Application:
    app = web.Application(client_max_size=options.max_body_bytes, middlewares=[_errors_as_json])
    app[MANAGER] = manager
    app[EXECUTOR] = executor
    app[OPTIONS] = options
    app.router.add_route("*", "/{tail:.*}", _dispatch)
    return app


@web.middleware
async def _errors_as_json(request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    try:
        return await handler(request)
    except errors.ServingError as error:
        return _json_error(error.http_status, error.message)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[OPTIONS].max_body_bytes
        return _json_error(413, f"Request body is larger than the limit of {limit} bytes")
    except web.HTTPException:
        raise
    except Exception:  # the one place an unexpected error stops: logged in full, never sent to the client
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return _json_error(500, "Internal error while serving the request; see the server log")


def _json_error(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=error_json(message), content_type="application/json")


def _json(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="application/json")


async def _dispatch(request: web.Request) -> web.StreamResponse:
    path = request.path
    if request.method == "POST" and (match := _PREDICTION_PATH.fullmatch(path)):
        return await _prediction(request, _target(match), match["verb"].lower())
    if request.method == "GET" and (match := _STATUS_PATH.fullmatch(path)):
        if match["metadata"]:
            return _metadata(request, _target(match))
        return _status(request, _target(match))
    if request.method == "GET" and path.rstrip("/").lower() == "/v1/models":
        raise errors.InvalidArgument("Missing model name in request.")
    if path.lower().startswith("/v1/"):
        raise errors.InvalidArgument(f"Malformed request: {request.method} {path}")
    raise errors.NotFound(f"No such endpoint: {request.method} {path}")


def _target(match: re.Match[str]) -> _Target:
    version = None
    if match["version"] is not None:
        version = int(match["version"])
        if version > _INT64_MAX:
            raise errors.InvalidArgument(f"Failed to convert version: {match['version']} to numeric.")
    return _Target(name=match["name"], version=version, label=match["label"])


async def _prediction(request: web.Request, target: _Target, verb: str) -> web.Response:
    servable = request.app[MANAGER].resolve(target.name, target.version, target.label)
    body = await request.read()
    options = request.app[OPTIONS]
    loop = asyncio.get_running_loop()
    work = loop.run_in_executor(request.app[EXECUTOR], _VERBS[verb], servable, body)
    try:
        return _json(await asyncio.wait_for(work, options.timeout_s))
    except TimeoutError:
        raise errors.DeadlineExceeded(f"Request timed out after {options.timeout_s * 1000:.0f} ms "
                                      "(--rest_api_timeout_in_ms)") from None


def _signature_name(request: dict[str, Any]) -> str:
    name = request.get("signature_name", "")
    if not isinstance(name, str):
        raise errors.InvalidArgument("'signature_name' key must be a string value.")
    return name


def _predict(servable: Servable, body: bytes) -> bytes:
    request = decode_json_object(body)
    signature_name = _signature_name(request)
    signature = servable.signature(signature_name)
    inputs, row_format = parse_predict_inputs(request, signature.inputs)
    return predict_response(inference.predict(servable, signature_name, inputs), row_format)


def _classify(servable: Servable, body: bytes) -> bytes:
    request = decode_json_object(body)
    results = inference.classify(servable, _signature_name(request), serialized_examples_from_json(request))
    return encode_json({"results": [[[label.decode(errors="replace"), score] for label, score in classes]
                                    for classes in results]})


def _regress(servable: Servable, body: bytes) -> bytes:
    request = decode_json_object(body)
    return encode_json({"results": inference.regress(servable, _signature_name(request),
                                                     serialized_examples_from_json(request))})


_VERBS: dict[str, Callable[[Servable, bytes], bytes]] = {
    "predict": _predict, "classify": _classify, "regress": _regress,
}


def _status(request: web.Request, target: _Target) -> web.Response:
    manager = request.app[MANAGER]
    if target.label is not None:
        manager.label_version(target.name, target.label)  # an unknown label is an error; a known one lists all
    statuses = manager.status(target.name, target.version)
    return _json(_pretty(to_json_dict(status_response(statuses))))


def _metadata(request: web.Request, target: _Target) -> web.Response:
    servable = request.app[MANAGER].resolve(target.name, target.version, target.label)
    return _json(_pretty(metadata_json_dict(servable)))


def _pretty(document: dict[str, Any]) -> bytes:
    return orjson.dumps(document, option=orjson.OPT_INDENT_2)
