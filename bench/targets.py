"""What the load generator sends, and over what: a REST request on N keep-alive connections, or a gRPC Predict as
N concurrent calls over a few channels.

A target is a description (frozen, printable into a report); `connect(n)` opens the connections inside the running
event loop and yields a Session with one `send` per concurrent caller. Leaving the context closes them all.
Predict targets send the same seeded input on both protocols: REST in the row format (`{"instances": rows}`, which
names no input, so it fits any single-input signature) and gRPC as a TensorProto for the named input.
"""

from __future__ import annotations

import asyncio
import ssl
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Protocol

import grpc
import numpy as np
import orjson

from bench.http_connection import HttpConnection, encode_request
from bench.rest_client import loopback_address

if TYPE_CHECKING:  # imports TensorFlow
    from tensorflow_serving.apis.predict_pb2 import PredictRequest

Send = Callable[[], Awaitable[None]]
REST_SCHEMES = ("http", "https")
GRPC_SCHEMES = ("grpc", "grpcs")


@dataclass(frozen=True, slots=True)
class Session:
    sends: list[Send]
    connections: Callable[[], int]  # opened so far: equal to the callers (REST) or channels (gRPC) if none broke


class Target(Protocol):
    @property
    def rows(self) -> int: ...  # rows per request, for rows/s

    def describe(self) -> dict[str, Any]: ...

    def connect(self, concurrency: int) -> AbstractAsyncContextManager[Session]: ...


@dataclass(frozen=True, slots=True)
class RestTarget:
    url: str  # http(s)://loopback:port
    path: str
    body: bytes = b""  # POSTed when given; otherwise a GET
    rows: int = 0
    cacert: Path | None = None  # for https: the CA that signed the server's certificate
    headers: tuple[tuple[str, str], ...] = ()  # sent with every request (credentials: never in describe())

    def describe(self) -> dict[str, Any]:
        return {"protocol": "REST", "url": self.url, "method": self._method, "path": self.path,
                "body_bytes": len(self.body), "rows": self.rows, "header_names": [name for name, _ in self.headers]}

    @property
    def _method(self) -> str:
        return "POST" if self.body else "GET"

    @asynccontextmanager
    async def connect(self, concurrency: int) -> AsyncIterator[Session]:
        host, port = loopback_address(self.url, REST_SCHEMES)
        tls = ssl.create_default_context(cafile=self.cacert) if self.url.startswith("https:") else None
        request = encode_request(self._method, host, port, self.path, self.body, headers=self.headers)
        connections = [HttpConnection(host, port, request, tls) for _ in range(concurrency)]
        try:
            await asyncio.gather(*(connection.connect() for connection in connections))
            yield Session([connection.send for connection in connections],
                          lambda: sum(connection.opened for connection in connections))
        finally:
            for connection in connections:
                connection.close()


@dataclass(frozen=True, slots=True)
class GrpcTarget:
    url: str  # grpc(s)://loopback:port
    request: PredictRequest
    rows: int
    channels: int = 1
    cacert: Path | None = None  # for grpcs

    def describe(self) -> dict[str, Any]:
        return {"protocol": "gRPC", "url": self.url, "method": "PredictionService/Predict",
                "request_bytes": self.request.ByteSize(), "rows": self.rows, "channels": self.channels}

    @asynccontextmanager
    async def connect(self, concurrency: int) -> AsyncIterator[Session]:
        from bench.grpc_client import AsyncPredictChannels  # TensorFlow, only when gRPC is used

        host, port = loopback_address(self.url, GRPC_SCHEMES)
        credentials = None
        if self.url.startswith("grpcs:"):  # without a CA file, gRPC's default roots
            credentials = grpc.ssl_channel_credentials(self.cacert.read_bytes() if self.cacert else None)
        count = min(self.channels, concurrency)
        channels = AsyncPredictChannels(f"{host}:{port}", self.request, count, credentials)
        try:
            await channels.connect()
            yield Session([channels.sender(index) for index in range(concurrency)], lambda: count)
        finally:
            await channels.close()


def predict_path(model: str, version: int | None) -> str:
    return f"/v1/models/{model}" + ("" if version is None else f"/versions/{version}") + ":predict"


def rest_predict(url: str, model: str, version: int | None, x: np.ndarray, signature: str = "",
                 cacert: Path | None = None, headers: tuple[tuple[str, str], ...] = ()) -> RestTarget:
    document: dict[str, Any] = {"instances": x.tolist()}
    if signature:
        document["signature_name"] = signature
    return RestTarget(url, predict_path(model, version), orjson.dumps(document), len(x), cacert, headers)


def grpc_predict(url: str, model: str, version: int | None, input_name: str, x: np.ndarray, signature: str = "",
                 channels: int = 1, cacert: Path | None = None) -> GrpcTarget:
    from bench.grpc_client import predict_request  # TensorFlow, only when gRPC is used

    return GrpcTarget(url, predict_request(model, version, {input_name: x}, signature), len(x), channels, cacert)


def seeded_rows(rows: int, row_shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """The input every predict target sends: float32 values in [0, 1), the same on every run."""
    return np.random.default_rng(seed).random((rows, *row_shape), dtype=np.float32)
