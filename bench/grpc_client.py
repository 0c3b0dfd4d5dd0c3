"""One gRPC channel and TF Serving's official PredictionService stub, sending the same prebuilt PredictRequest.

The request (with `tf.make_tensor_proto`) is built once, so a timed call is the stub's serialize → send → wait →
parse and nothing else. The channel only ever reaches this machine: the target is always 127.0.0.1, and proxies
from the environment (`grpc_proxy`, `http_proxy`) are ignored. Importing this module imports TensorFlow.
"""

from __future__ import annotations

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from bench.backend_process import HOST
from bench.closed_loop import RequestFailed


def predict_request(model: str, version: int, inputs: dict[str, np.ndarray]) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.version.value = version
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return request


class PredictClient:
    def __init__(self, port: int, request: predict_pb2.PredictRequest, timeout_s: float = 10.0) -> None:
        self._channel = grpc.insecure_channel(f"{HOST}:{port}", options=[("grpc.enable_http_proxy", 0)])
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._request = request
        self._timeout_s = timeout_s

    def predict(self) -> predict_pb2.PredictResponse:
        """The response of an OK call; RequestFailed naming the status code otherwise."""
        try:
            return self._stub.Predict(self._request, timeout=self._timeout_s)
        except grpc.RpcError as error:  # raised by the stub as a grpc.Call, which has code() and details()
            raise RequestFailed(f"gRPC {error.code().name}", str(error.details())) from None

    def close(self) -> None:
        self._channel.close()
