"""TF Serving's official PredictionService stub sending the same prebuilt PredictRequest: one blocking channel for
the concurrency-1 benchmarks, or a few grpc.aio channels shared by many concurrent calls for the load generator.

The request (with `tf.make_tensor_proto`) is built once, so a timed call is the stub's serialize → send → wait →
parse and nothing else. Channels only ever reach this machine (callers pass loopback addresses), and proxies from
the environment (`grpc_proxy`, `http_proxy`) are ignored. Importing this module imports TensorFlow.
"""

from __future__ import annotations

from typing import Awaitable, Callable

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from bench.backend_process import HOST
from bench.latency import RequestFailed

_NO_PROXY = ("grpc.enable_http_proxy", 0)


def predict_request(model: str, version: int | None, inputs: dict[str, np.ndarray], signature: str = "",
                    label: str | None = None) -> predict_pb2.PredictRequest:
    """A request for `version` or `label`, or for the latest version when neither is given."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return request


def _failed(error: grpc.RpcError) -> RequestFailed:
    """A stub's error (a grpc.Call, which has code() and details()) as the failure a report counts."""
    return RequestFailed(f"gRPC {error.code().name}", str(error.details()))  # type: ignore[attr-defined]


class PredictClient:
    def __init__(self, port: int, request: predict_pb2.PredictRequest, timeout_s: float = 10.0) -> None:
        self._channel = grpc.insecure_channel(f"{HOST}:{port}", options=[_NO_PROXY])
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._request = request
        self._timeout_s = timeout_s

    def predict(self) -> predict_pb2.PredictResponse:
        """The response of an OK call; RequestFailed naming the status code otherwise."""
        try:
            return self._stub.Predict(self._request, timeout=self._timeout_s)
        except grpc.RpcError as error:
            raise _failed(error) from None

    def close(self) -> None:
        self._channel.close()


class AsyncPredictChannels:
    """`count` grpc.aio channels to one address, each on its own TCP connection (a local subchannel pool, so gRPC
    does not quietly share one); concurrent calls are spread over them. Create it inside the running event loop."""

    def __init__(self, address: str, request: predict_pb2.PredictRequest, count: int,
                 credentials: grpc.ChannelCredentials | None = None, timeout_s: float = 10.0) -> None:
        options = [_NO_PROXY, ("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", -1)]
        if credentials is None:
            self._channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(count)]
        else:
            self._channels = [grpc.aio.secure_channel(address, credentials, options=options) for _ in range(count)]
        self._stubs = [prediction_service_pb2_grpc.PredictionServiceStub(channel) for channel in self._channels]
        self._request = request
        self._timeout_s = timeout_s

    async def connect(self) -> None:
        for channel in self._channels:
            await channel.channel_ready()

    def sender(self, index: int) -> Callable[[], Awaitable[None]]:
        stub = self._stubs[index % len(self._stubs)]
        request, timeout_s = self._request, self._timeout_s

        async def send() -> None:
            try:
                await stub.Predict(request, timeout=timeout_s)
            except grpc.RpcError as error:
                raise _failed(error) from None

        return send

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
