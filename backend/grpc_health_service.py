"""`grpc.health.v1` registered with bytes in, for the backend and the gateway alike.

With the generated servicer registration, bytes that are not a HealthCheckRequest got UNKNOWN naming a Python
exception, and a logged traceback, for any client (the service is open, like /healthz). Here they get
INVALID_ARGUMENT; well-formed calls go to grpc_health's own asyncio servicer.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE
from grpc_health.v1.health import aio as health_aio  # grpc_health's public name for its asyncio servicer


def add_health(server: grpc.aio.Server) -> health_aio.HealthServicer:
    """A health servicer on `server`, returned so its owner sets what is serving."""
    health = health_aio.HealthServicer()

    async def check(request: bytes, context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        return await health.Check(await _health_request(request, context), context)

    async def watch(request: bytes, context: grpc.aio.ServicerContext) -> None:
        await health.Watch(await _health_request(request, context), context)

    serialize = health_pb2.HealthCheckResponse.SerializeToString
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(HEALTH_SERVICE, {
        "Check": grpc.unary_unary_rpc_method_handler(check, response_serializer=serialize),
        "Watch": grpc.unary_stream_rpc_method_handler(watch, response_serializer=serialize),
    }),))
    return health


async def _health_request(data: bytes, context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckRequest:
    try:
        return health_pb2.HealthCheckRequest.FromString(data)
    except DecodeError:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "The request is not a valid "
                                                              "grpc.health.v1.HealthCheckRequest")
        raise  # not reached: abort raises
