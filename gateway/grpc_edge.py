"""The public gRPC endpoint: TF Serving's PredictionService and ModelService over the gateway's TLS, each call
authenticated, routed by its model spec and balanced to a backend's gRPC port on its own, so one client channel is
spread over the pool (an L4 balancer would pin it to one server).

How a call flows, as a REST request does (gateway/http_edge.py): read the snapshot once → read the model spec from
the request bytes (gateway/grpc_wire.py; tensors are not decoded) → authenticate from the metadata
(`authorization: Bearer …` or `x-api-key`) or the client certificate, authorize the model and method, rate-limit →
route (a spec naming neither version nor label follows the route's split: the chosen one is written into the
forwarded request) → forward the bytes over a pooled channel to a backend with a gRPC address, with the remaining
deadline (the client's, capped by `limits.request_timeout_s`); UNAVAILABLE (including a connection failure) is
retried on another backend within the pool's attempts and retry budget → the backend's answer or status goes back
unchanged. The gateway's own refusals carry TF Serving's gRPC codes: UNAUTHENTICATED, PERMISSION_DENIED,
RESOURCE_EXHAUSTED (with the rate-limit headers as trailing metadata), NOT_FOUND, INVALID_ARGUMENT, UNAVAILABLE,
DEADLINE_EXCEEDED. A caller whose metadata alone fails authentication is refused before gRPC reads its message
(`service`). Credentials in the metadata are never forwarded; the request id is. Beside the proxied services,
grpc.health.v1 and server reflection are answered by the gateway itself, without credentials.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE
from grpc_health.v1.health import aio as health_aio  # grpc_health's public name for its asyncio servicer
from grpc_reflection.v1alpha import reflection
from tensorflow_serving.apis.model_pb2 import ModelSpec

from backend.deadlines import cancelled_code
from backend.errors import status_details
from gateway import errors
from gateway.access_record import AccessRecord
from gateway.accesslog import AccessLog
from gateway.auth import AuthError
from gateway.grpc_wire import WireError, read_model_spec, read_tasks, with_model_spec, with_task_versions
from gateway.guard import Guard
from gateway.http_edge import RequestIds, SnapshotSource, milliseconds
from gateway.metrics import GatewayMetrics
from gateway.snapshot import Snapshot
from gateway.upstream import Attempts, BackendRuntime, Upstreams

log = logging.getLogger("tfgate.gateway")

# The calls served, with the method name auth grants use.
METHODS = {
    "/tensorflow.serving.PredictionService/Predict": "predict",
    "/tensorflow.serving.PredictionService/Classify": "classify",
    "/tensorflow.serving.PredictionService/Regress": "regress",
    "/tensorflow.serving.PredictionService/GetModelMetadata": "metadata",
    "/tensorflow.serving.PredictionService/MultiInference": "multi_inference",  # authorized per task method
    "/tensorflow.serving.ModelService/GetModelStatus": "status",
}
# By name: importing TF Serving's service modules would import TensorFlow itself into the gateway.
SERVICES = ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")
RELOAD_CONFIG = "/tensorflow.serving.ModelService/HandleReloadConfigRequest"
_INFERENCE = frozenset({"predict", "classify", "regress", "multi_inference"})  # a split picks their version; status and metadata ask
_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
          403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
          413: grpc.StatusCode.RESOURCE_EXHAUSTED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
          502: grpc.StatusCode.UNAVAILABLE, 503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
_NOT_FORWARDED = frozenset({"authorization", "x-api-key", "cookie", "x-request-id", "user-agent"})
_CHANNEL_OPTIONS = (("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1))


@dataclass(slots=True)  # not frozen: made per call (see backend/inference.py's ModelCall)
class _Answer:
    code: grpc.StatusCode
    details: str
    body: bytes
    trailing: tuple[tuple[str, str | bytes], ...]


class GrpcEdge(grpc.GenericRpcHandler):
    def __init__(self, source: SnapshotSource, upstreams: Upstreams, guard: Guard, metrics: GatewayMetrics,
                 access_log: AccessLog, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._source = source
        self._upstreams = upstreams
        self._guard = guard
        self._metrics = metrics
        self._access_log = access_log
        self._rng = rng or random.Random()
        self._clock = clock
        self._ids = RequestIds()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._handlers = {method: grpc.unary_unary_rpc_method_handler(functools.partial(self._call, method, kind))
                          for method, kind in METHODS.items()}
        self._handlers[RELOAD_CONFIG] = grpc.unary_unary_rpc_method_handler(self._reload_backends)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        """Bytes in, bytes out: no (de)serializer, so only the model spec is ever parsed. Others: UNIMPLEMENTED.
        gRPC asks on every call, with the call's metadata but before it reads the message: a caller whose metadata
        alone fails authentication gets a handler that refuses it without reading its message (up to
        limits.max_body_bytes), as the REST edge's screen does for an upload. The handlers are made once."""
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if method in METHODS:
            metadata = _text(handler_call_details.invocation_metadata)  # type: ignore[attr-defined]
            try:
                self._guard.screen(self._source.snapshot.authenticator, metadata)
            except errors.GatewayError as error:
                # A stream of requests to gRPC, which reads one only when the handler asks for it: this one never does.
                return grpc.stream_unary_rpc_method_handler(functools.partial(self._refuse_unread, method, error))
        return self._handlers.get(method)

    async def _refuse_unread(self, method: str, error: errors.GatewayError, requests: Any,
                             context: grpc.aio.ServicerContext) -> None:
        """The refusal `service` chose; `requests` are left unread. abort() raises: nothing is returned."""
        record = self._record(method, _metadata(context), context, 0)
        record.error = error.message
        code = _CODES[error.status]
        self._observe(record, Attempts(), 0.0, code, 0)
        context.set_trailing_metadata((("x-request-id", record.request_id),))
        await context.abort(code, status_details(error.message))

    async def _reload_backends(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """HandleReloadConfigRequest is an admin operation: only with a key from `auth.admin_keys`, then sent to
        every backend with a gRPC address, in every pool; the first failure is the answer, else the first reply."""
        snapshot = self._source.snapshot
        metadata = _metadata(context)
        try:
            admin = snapshot.authenticator.authenticate_admin(metadata)
        except AuthError as error:
            self._metrics.auth_failed(status=error.status)
            await context.abort(_CODES[error.status], error.message)
        backends = {str(backend.address.grpc): backend for pool in snapshot.pools.values()
                    for backend in pool.backends if backend.address.grpc is not None}
        if not backends:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "No backend has a gRPC address to reload")
        timeout_s = snapshot.config.limits.request_timeout_s
        answers = await asyncio.gather(*(self._send(backend, RELOAD_CONFIG, request, timeout_s, [])
                                         for backend in backends.values()))
        failed = [answer for answer in answers if answer.code is not grpc.StatusCode.OK]
        log.warning("HandleReloadConfigRequest by admin key %r sent to %d backend(s): %d failed", admin,
                    len(answers), len(failed))
        if failed:
            summary = f"{len(failed)} of {len(answers)} backends failed: {failed[0].details}"
            await context.abort(failed[0].code, status_details(summary))
        return answers[0].body

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()

    async def _call(self, method: str, kind: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        snapshot = self._source.snapshot
        started = self._clock()
        metadata = _metadata(context)
        record = self._record(method, metadata, context, len(request))
        attempts = Attempts()
        with self._metrics.in_flight:
            try:
                answer = await self._forward(snapshot, method, kind, request, context, metadata, record, attempts)
            except errors.GatewayError as error:
                record.error = attempts.detail or error.message
                answer = _Answer(_CODES.get(error.status, grpc.StatusCode.INTERNAL), error.message, b"",
                                 tuple((key, value) for key, value in error.headers if key != "www-authenticate"))
            except asyncio.CancelledError:  # the client left or its deadline passed: gRPC cancels us; still counted
                self._observe(record, attempts, self._clock() - started, cancelled_code(context), 0)
                raise
            self._observe(record, attempts, self._clock() - started, answer.code, len(answer.body))
        trailing = (("x-request-id", record.request_id), *answer.trailing)
        if snapshot.config.expose_upstream_header and attempts.upstream:
            trailing += (("x-tfgate-upstream", attempts.upstream),)
        context.set_trailing_metadata(trailing)
        if answer.code is not grpc.StatusCode.OK:
            await context.abort(answer.code, status_details(answer.details))
        return answer.body

    def _record(self, method: str, metadata: dict[str, str], context: grpc.aio.ServicerContext, bytes_in: int
                ) -> AccessRecord:
        return AccessRecord(request_id=metadata.get("x-request-id") or self._ids.next(), method="POST", path=method,
                            peer=context.peer(), bytes_in=bytes_in, protocol="grpc")

    def _observe(self, record: AccessRecord, attempts: Attempts, elapsed: float, code: grpc.StatusCode,
                 bytes_out: int) -> None:
        """One call's metrics and access line."""
        record.grpc_status, record.attempts = code.name, attempts.count
        record.upstream, record.upstream_ms = attempts.upstream, milliseconds(attempts.upstream_s)
        record.duration_ms, record.bytes_out = milliseconds(elapsed), bytes_out
        served = bool(attempts.upstream) and code is grpc.StatusCode.OK
        self._metrics.observe_request(model=record.model if served else "", route=record.route, status=code.name,
                                      upstream=attempts.upstream, seconds=elapsed, protocol="grpc")
        self._access_log.write(record)

    async def _forward(self, snapshot: Snapshot, method: str, kind: str, request: bytes,
                       context: grpc.aio.ServicerContext, metadata: dict[str, str], record: AccessRecord,
                       attempts: Attempts) -> _Answer:
        limit = snapshot.config.limits.max_body_bytes  # gRPC's own cap is the value at start (gateway/app.py)
        if len(request) > limit:
            raise errors.PayloadTooLarge(f"The request is {len(request)} bytes, larger than limits.max_body_bytes "
                                         f"({limit})")
        try:
            spec, found = read_model_spec(request) if kind != "multi_inference" else (ModelSpec(), [])
            tasks = read_tasks(request) if kind == "multi_inference" else []
        except WireError as error:
            raise errors.BadRequest(f"The request is not a valid message: {error}") from None
        granted = [kind]
        if tasks:
            spec, granted = tasks[0][0], sorted({_task_method(task_method) for _spec, task_method, _field in tasks})
            if len({task_spec.name for task_spec, _method, _field in tasks}) > 1:
                raise errors.BadRequest("every MultiInference task must name the same model")
        elif kind == "multi_inference":
            raise errors.BadRequest("MultiInference needs at least one task")
        if not spec.name:
            raise errors.BadRequest("model_spec.name is required")
        name = record.model = spec.name
        certificate = _client_certificate(context)
        for needed in granted:  # a MultiInference call needs each method its tasks use
            principal = self._guard.identify(snapshot.authenticator, metadata, certificate, name, needed)
        record.principal = principal.name
        version = spec.version.value if spec.HasField("version") else None
        decision = snapshot.routes.route(name, version, spec.version_label or None, self._rng)
        if decision is None:
            raise errors.NotFound(f"Servable not found for request: Latest({name})")
        record.route, record.pool = decision.route, decision.pool
        limit_headers = self._guard.limit(principal, name, decision.route)
        record.version, record.label = decision.version, decision.label
        if kind in _INFERENCE and version is None and not spec.version_label and (
                decision.version is not None or decision.label is not None):
            if tasks:
                request = with_task_versions(request, tasks, decision.version, decision.label)
            else:
                if decision.version is not None:
                    spec.version.value = decision.version
                else:
                    spec.version_label = decision.label
                request = with_model_spec(request, found, spec)
        forwarded = [(key, value) for key, value in metadata.items()
                     if key not in _NOT_FORWARDED and not key.startswith(("grpc-", ":"))]
        forwarded.append(("x-request-id", record.request_id))
        client_remaining = context.time_remaining()
        budget_s = snapshot.config.limits.request_timeout_s
        deadline = self._clock() + (budget_s if client_remaining is None else min(budget_s, client_remaining))

        async def send(backend: BackendRuntime, remaining_s: float) -> _Answer:
            return await self._send(backend, method, request, remaining_s, forwarded)

        answer = await self._upstreams.forward_with(
            snapshot.pools[decision.pool], send, lambda answer: answer.code is grpc.StatusCode.UNAVAILABLE,
            deadline, attempts)
        if answer.code is not grpc.StatusCode.OK:
            attempts.detail = attempts.detail or f"backend {attempts.upstream}: {answer.code.name} {answer.details}"
        return _Answer(answer.code, answer.details, answer.body, limit_headers)

    async def _send(self, backend: BackendRuntime, method: str, request: bytes, timeout_s: float,
                    metadata: list[tuple[str, str]]) -> _Answer:
        """One call to one backend: its answer or status (never raises for the backend's failure)."""
        channel = self._channel(backend)
        if channel is None:
            return _Answer(grpc.StatusCode.UNAVAILABLE, f"backend {backend.name} has no gRPC address", b"", ())
        try:
            body = await channel.unary_unary(method)(request, timeout=timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as error:
            return _Answer(error.code(), error.details() or "", b"", ())
        return _Answer(grpc.StatusCode.OK, "", body, ())

    def _channel(self, backend: BackendRuntime) -> grpc.aio.Channel | None:
        address = backend.address.grpc
        if address is None:
            return None
        key = str(address)
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = grpc.aio.insecure_channel(key, options=_CHANNEL_OPTIONS)
        return channel


@functools.lru_cache(maxsize=1024)
def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def _client_certificate(context: grpc.aio.ServicerContext) -> bytes | None:
    """The client's verified certificate (DER) when it sent one: gRPC's auth context holds it as PEM."""
    pems: Any = context.auth_context().get("x509_pem_cert")
    return _der(pems[0]) if pems else None


def add_reflection(server: grpc.aio.Server, pool: DescriptorPool) -> None:
    """Server reflection, open like health: it describes TF Serving's public API, not the models. `pool` is
    gateway/grpc_descriptors.py's (the default pool lacks TF Serving's services: they are proxied as bytes).
    grpcio-reflection serves v1alpha only; grpcurl falls back to it when v1 is UNIMPLEMENTED."""
    reflection.enable_server_reflection((*SERVICES, HEALTH_SERVICE, reflection.SERVICE_NAME), server, pool=pool)


async def set_serving(health: health_aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for service in ("", *SERVICES):
        await health.set(service, status)


def _task_method(method_name: str) -> str:
    """A MultiInference task's method as auth grants name it (TF Serving allows classify and regress there)."""
    kind = method_name.rpartition("/")[2]
    if kind not in ("classify", "regress"):
        raise errors.BadRequest(f"MultiInference tasks classify or regress, not {method_name!r}")
    return kind


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return _text(context.invocation_metadata())


def _text(metadata: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    """A call's text metadata (keys arrive lower-case); binary (-bin) values are never credentials."""
    return {key: value for key, value in metadata or () if isinstance(value, str)}
