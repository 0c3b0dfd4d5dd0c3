"""TF Serving's gRPC API on grpc.aio: `PredictionService` and `ModelService`, a thin adapter over the core.

Each call resolves its `ModelSpec` (name, and version or version_label) on the event loop, then decodes tensors,
runs the model and encodes the answer within the client's deadline (a call whose deadline passed while it waited is
not run): the model on the inference executor, decoding and encoding there too when they are big (runners.py).
Errors become the gRPC status TF Serving returns; an unexpected exception is logged and reaches the client as
INTERNAL without its stack. Requests arrive as bytes and are parsed here, so bytes that are not the method's message
are INVALID_ARGUMENT (gRPC's own deserializer would answer UNKNOWN, naming a Python exception, and log a traceback).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_pb2,
    predict_pb2,
    regression_pb2,
)
from tensorflow_serving.config import model_server_config_pb2

from backend import errors, inference
from backend.deadlines import cancelled_code
from backend.examples import serialized_examples_from_proto
from backend.health import Health, InFlight
from backend.inference import ModelCall
from backend.metrics import BackendMetrics
from backend.model_config import ModelConfigError, configs_from_proto
from backend.models import ModelManager, UnavailableLabelError
from backend.runners import INLINE_OUTPUT_ELEMENTS, INLINE_REQUEST_BYTES, CallRunner, offload_if, output_elements
from backend.servable import CLASSIFY_METHOD, REGRESS_METHOD, Servable
from backend.status import fill_model_spec, model_spec, signature_def_map, status_response
from backend.tensor_proto import fill_tensor_proto, to_ndarray

log = logging.getLogger(__name__)

Response = TypeVar("Response")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]

ENTRYPOINT = "GRPC"


@dataclass(frozen=True, slots=True)
class GrpcContext:
    """What both services need: the model manager, where model work runs, and how outputs are encoded."""

    manager: ModelManager
    executor: Executor
    runner: CallRunner
    metrics: BackendMetrics
    health: Health
    in_flight: InFlight
    tensor_content: bool = False
    # How HandleReloadConfigRequest applies a config when not only here: in every worker of a `--workers` backend.
    reload_group: Callable[[model_server_config_pb2.ModelServerConfig], Awaitable[None]] | None = None

    def resolve(self, spec: model_pb2.ModelSpec) -> Servable:
        return self.manager.resolve(*_named_version(spec))

    async def call(self, context: grpc.aio.ServicerContext, prepare: Callable[[], ModelCall], request_bytes: int,
                   finish: Callable[[ModelCall, dict[str, np.ndarray]], Response]) -> Response:
        """Decode and validate, run (directly or batched), encode: the heavy ends on the executor, within the
        client's deadline."""
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        call = await offload_if(request_bytes > INLINE_REQUEST_BYTES, self.executor, deadline, prepare)
        outputs = await self.runner.run(call, deadline)
        return await offload_if(output_elements(outputs) > INLINE_OUTPUT_ELEMENTS, self.executor, deadline,
                                lambda: finish(call, outputs))


def _named_version(spec: model_pb2.ModelSpec) -> tuple[str, int | None, str | None]:
    """A ModelSpec as (name, version, label); at most one of the last two is set."""
    if not spec.name:
        raise errors.InvalidArgument("Missing ModelSpec: the request names no model")
    choice = spec.WhichOneof("version_choice")
    return (spec.name, spec.version.value if choice == "version" else None,
            spec.version_label if choice == "version_label" else None)


def _rpc(api: str, request_type: Any) -> Callable[[Handler], Handler]:
    """Parsing, error translation and metrics for one RPC, in one place for every method: the method gets a
    `request_type` message, the call the request's bytes."""

    def decorate(method: Handler) -> Handler:
        @functools.wraps(method)
        async def call(self: Any, request_bytes: bytes, context: grpc.aio.ServicerContext) -> Any:
            grpc_context: GrpcContext = self.context
            started, code, request, response = time.perf_counter(), grpc.StatusCode.OK, None, None
            with grpc_context.metrics.in_flight(ENTRYPOINT), grpc_context.in_flight:
                try:
                    if grpc_context.health.draining:
                        raise errors.Unavailable("The server is shutting down; retry on another server")
                    request = _parse(request_type, request_bytes)
                    response = await method(self, request, context)
                    return response
                except errors.ServingError as error:
                    code = error.code
                    await context.abort(error.code, errors.status_details(error.message))
                except asyncio.CancelledError:  # the client left or its deadline passed: counted as such, not OK
                    code = cancelled_code(context)
                    raise
                except Exception:  # the one place an unexpected error stops: logged in full, not sent
                    code = grpc.StatusCode.INTERNAL
                    log.exception("unexpected error in %s", api)
                    await context.abort(code, errors.INTERNAL_MESSAGE)
                finally:
                    spec = getattr(response, "model_spec", None) or getattr(request, "model_spec", None)
                    grpc_context.metrics.observe_request(
                        model=spec.name if spec is not None else "",
                        version=spec.version.value if spec is not None and spec.HasField("version") else None,
                        api=api, entrypoint=ENTRYPOINT, code=code.name, seconds=time.perf_counter() - started)
        return call
    return decorate


def _parse(request_type: Any, data: bytes) -> Any:
    try:
        return request_type.FromString(data)
    except DecodeError:  # its message only names the type
        raise errors.InvalidArgument(f"The request is not a valid {request_type.DESCRIPTOR.full_name}: its "
                                     "protobuf wire format is corrupt") from None


def _response_spec(target: model_pb2.ModelSpec, servable: Servable, signature_key: str) -> None:
    fill_model_spec(target, servable)
    target.signature_name = signature_key


class PredictionService:
    """TF Serving's PredictionService. Not a subclass of the generated servicer, which gRPC never requires (it looks the
    methods up by name): this module is compiled (mypyc), and a compiled class cannot extend an interpreted one."""

    def __init__(self, context: GrpcContext) -> None:
        self.context = context

    @_rpc("predict", predict_pb2.PredictRequest)
    async def Predict(self, request: predict_pb2.PredictRequest,
                      context: grpc.aio.ServicerContext) -> predict_pb2.PredictResponse:
        servable = self.context.resolve(request.model_spec)
        return await self.context.call(context, lambda: _predict_call(servable, request), request.ByteSize(),
                                       self._predict_response)

    def _predict_response(self, call: ModelCall, outputs: dict[str, np.ndarray]) -> predict_pb2.PredictResponse:
        response = predict_pb2.PredictResponse()
        _response_spec(response.model_spec, call.servable, call.signature.key)
        for name, value in outputs.items():
            fill_tensor_proto(response.outputs[name], value, self.context.tensor_content)
        return response

    @_rpc("classify", classification_pb2.ClassificationRequest)
    async def Classify(self, request: classification_pb2.ClassificationRequest,
                       context: grpc.aio.ServicerContext) -> classification_pb2.ClassificationResponse:
        return await self._on_examples(request, context, classification_pb2.ClassificationResponse(),
                                       _EXAMPLE_KINDS[CLASSIFY_METHOD])

    @_rpc("regress", regression_pb2.RegressionRequest)
    async def Regress(self, request: regression_pb2.RegressionRequest,
                      context: grpc.aio.ServicerContext) -> regression_pb2.RegressionResponse:
        return await self._on_examples(request, context, regression_pb2.RegressionResponse(),
                                       _EXAMPLE_KINDS[REGRESS_METHOD])

    async def _on_examples(self, request: Any, context: grpc.aio.ServicerContext, response: Any,
                           kind: _ExampleKind) -> Any:
        """Classify and Regress alike: run the signature on the request's examples, fill the response's result."""
        servable = self.context.resolve(request.model_spec)

        def finish(call: ModelCall, outputs: dict[str, np.ndarray]) -> Any:
            kind.fill(response.result, call, outputs)
            _response_spec(response.model_spec, servable, call.signature.key)
            return response
        return await self.context.call(context, lambda: kind.make_call(
            servable, request.model_spec.signature_name, serialized_examples_from_proto(request.input)),
            request.ByteSize(), finish)

    @_rpc("multi_inference", inference_pb2.MultiInferenceRequest)
    async def MultiInference(self, request: inference_pb2.MultiInferenceRequest,
                             context: grpc.aio.ServicerContext) -> inference_pb2.MultiInferenceResponse:
        if not request.tasks:
            raise errors.InvalidArgument("MultiInferenceRequest must contain at least one task")
        first = request.tasks[0].model_spec
        for task in request.tasks:
            if task.model_spec.name != first.name:
                raise errors.InvalidArgument("All ModelSpecs in a MultiInferenceRequest must access the same model "
                                             "name")
            if task.model_spec.WhichOneof("version_choice") != first.WhichOneof("version_choice") or (
                    task.model_spec.version != first.version or task.model_spec.version_label != first.version_label):
                raise errors.InvalidArgument("ModelSpec version in a MultiInferenceRequest must be the same")
        seen: set[str] = set()  # a set, as TF Serving's: counting in a list took 24 s of the event loop at 50k tasks
        for task in request.tasks:
            if task.model_spec.signature_name in seen:
                raise errors.InvalidArgument(f"Duplicate evaluation of signature: {task.model_spec.signature_name}")
            seen.add(task.model_spec.signature_name)
        servable = self.context.resolve(first)
        examples = serialized_examples_from_proto(request.input)
        response = inference_pb2.MultiInferenceResponse()
        for task in request.tasks:
            result = response.results.add()
            kind = _EXAMPLE_KINDS.get(task.method_name)
            if kind is None:
                raise errors.InvalidArgument(f"Unsupported signature method_name: {task.method_name}")
            key, target = task.model_spec.signature_name, getattr(result, kind.inference_result_field)
            await self.context.call(context, lambda: kind.make_call(servable, key, examples), request.ByteSize(),
                                    lambda call, outputs: kind.fill(target, call, outputs))
            _response_spec(result.model_spec, servable, servable.signature(key).key)
        return response

    @_rpc("get_model_metadata", get_model_metadata_pb2.GetModelMetadataRequest)
    async def GetModelMetadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest,
                               context: grpc.aio.ServicerContext) -> get_model_metadata_pb2.GetModelMetadataResponse:
        if not request.metadata_field:
            raise errors.InvalidArgument("GetModelMetadataRequest must specify at least one metadata_field")
        for field in request.metadata_field:
            if field != "signature_def":
                raise errors.InvalidArgument(f"Metadata field {field} is not supported")
        servable = self.context.resolve(request.model_spec)
        response = get_model_metadata_pb2.GetModelMetadataResponse(model_spec=model_spec(servable))
        response.metadata["signature_def"].Pack(signature_def_map(servable))
        return response


def _predict_call(servable: Servable, request: predict_pb2.PredictRequest) -> ModelCall:
    signature = servable.signature(request.model_spec.signature_name)
    inference.check_input_names(request.inputs.keys(), signature.inputs.keys())
    inputs = {name: to_ndarray(name, proto, signature.inputs[name]) for name, proto in request.inputs.items()}
    return inference.predict_call(servable, signature.key, inputs, list(request.output_filter))


@dataclass(frozen=True, slots=True)
class _ExampleKind:
    """A tf.Example method: how to validate a call, and how to write its outputs into a result message."""

    make_call: Callable[[Servable, str, list[bytes]], ModelCall]
    fill: Callable[[Any, ModelCall, dict[str, np.ndarray]], None]
    inference_result_field: str  # where MultiInference puts this kind's result


_EXAMPLE_KINDS: dict[str, _ExampleKind] = {
    CLASSIFY_METHOD: _ExampleKind(inference.classify_call, lambda target, call, outputs: _fill_classifications(
        target, inference.classify_results(call, outputs)), "classification_result"),
    REGRESS_METHOD: _ExampleKind(inference.regress_call, lambda target, call, outputs: _fill_regressions(
        target, inference.regress_results(call, outputs)), "regression_result"),
}


def _fill_classifications(result: classification_pb2.ClassificationResult,
                          classifications: list[inference.Classification]) -> None:
    for classes in classifications:
        entry = result.classifications.add()
        for label, score in classes:
            entry.classes.add(label=label.decode(errors="replace"), score=score)


def _fill_regressions(result: regression_pb2.RegressionResult, values: list[float]) -> None:
    for value in values:
        result.regressions.add(value=value)


class ModelService:
    """TF Serving's ModelService; no generated base class, as PredictionService."""

    def __init__(self, context: GrpcContext) -> None:
        self.context = context

    @_rpc("get_model_status", get_model_status_pb2.GetModelStatusRequest)
    async def GetModelStatus(self, request: get_model_status_pb2.GetModelStatusRequest,
                             context: grpc.aio.ServicerContext) -> get_model_status_pb2.GetModelStatusResponse:
        return status_response(self.context.manager.status(*_named_version(request.model_spec)))

    @_rpc("handle_reload_config", model_management_pb2.ReloadConfigRequest)
    async def HandleReloadConfigRequest(
            self, request: model_management_pb2.ReloadConfigRequest,
            context: grpc.aio.ServicerContext) -> model_management_pb2.ReloadConfigResponse:
        """Replace the model config; return once added models are loaded, or say which cannot serve.

        As in TF Serving, a request without a config takes no action.
        """
        if request.config.WhichOneof("config") is None:
            log.info("HandleReloadConfigRequest without a config: taking no action")
        else:
            await self._reload(request.config)
        response = model_management_pb2.ReloadConfigResponse()
        response.status.SetInParent()
        return response


    async def _reload(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        if self.context.reload_group is not None:
            await self.context.reload_group(config)
        else:
            await apply_config(self.context.manager, config)


async def apply_config(manager: ModelManager, config: model_server_config_pb2.ModelServerConfig) -> None:
    """Make `config` the model config; raise a ServingError saying why a model cannot serve from it."""
    try:
        configs = configs_from_proto(config, "ReloadConfigRequest")
        await manager.apply(configs, strict_labels=True)
    except UnavailableLabelError as error:
        raise errors.FailedPrecondition(str(error)) from None
    except ModelConfigError as error:
        raise errors.InvalidArgument(str(error)) from None
    names = [model.name for model in configs]
    failures = manager.load_failures(names, only_unserved=True)
    if failures:
        raise errors.Unknown(f"Failed to load models from the new config: {failures}")
    unserved = [name for name in names if not manager.version_ready(name)]
    if unserved:
        raise errors.FailedPrecondition(f"The config is applied, but these models serve no version yet (none "
                                        f"found under their base paths): {', '.join(unserved)}")


def add_services(server: grpc.aio.Server, context: GrpcContext) -> None:
    """Both services with their methods taking bytes (parsed by `_rpc`), as the generated `add_*_to_server` would
    register them otherwise."""
    prediction, models = PredictionService(context), ModelService(context)
    services = {
        "tensorflow.serving.PredictionService": {name: getattr(prediction, name) for name in (
            "Classify", "Regress", "Predict", "MultiInference", "GetModelMetadata")},
        "tensorflow.serving.ModelService": {name: getattr(models, name) for name in (
            "GetModelStatus", "HandleReloadConfigRequest")},
    }
    for service, methods in services.items():
        handlers = {name: grpc.unary_unary_rpc_method_handler(behavior, response_serializer=_serialize)
                    for name, behavior in methods.items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()
