"""What every servicer shares (server/service.py, server/oip.py): the unary wrapper that counts,
times and turns a ServiceError into its status, requests that do not decode answered BAD_INPUT,
registration with tolerant deserializers, and the session id sent as call metadata."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from lstm_stream.v1 import inference_pb2 as pb
from server import metrics
from server.errors import BadInput, ServiceError

Response = TypeVar("Response")
SESSION_ID_METADATA = "x-session-id"


def unary(rpc: str) -> Callable[..., Callable[..., Awaitable[Any]]]:
    """Count and time a unary method; turn a ServiceError into its status and ErrorInfo."""
    latency = metrics.STEP_LATENCY.labels(rpc)

    def decorate(method: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
        @wraps(method)
        async def wrapper(self: Any, request: Any, context: Any) -> Response:
            received = time.perf_counter()
            try:
                if isinstance(request, Malformed):
                    raise request.error
                response = await method(self, request, context)
            except ServiceError as err:
                metrics.REQUESTS.labels(rpc, err.code.name).inc()
                latency.observe(time.perf_counter() - received)
                await context.abort_with_status(err.to_status())
            metrics.REQUESTS.labels(rpc, "OK").inc()
            latency.observe(time.perf_counter() - received)
            return response

        return wrapper

    return decorate


class Malformed:
    """A request body that does not decode as its message: answered BAD_INPUT by the servicer
    (gRPC's own deserializer would fail the call UNKNOWN, with no reason)."""

    def __init__(self, message: type, error: Exception) -> None:
        self.error = BadInput(
            f"request: expected a serialized {message.DESCRIPTOR.full_name}, got bytes that do "
            f"not decode ({error})"
        )


def tolerant_deserializer(message: type) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except DecodeError as exc:
            return Malformed(message, exc)

    return deserialize


def add_servicer(
    servicer: Any, server: Any, module: Any = pb, service_name: str = "InferenceService"
) -> None:
    """Register a servicer of a generated `module`'s service as the generated code would,
    with tolerant deserializers."""
    service = module.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        request_type = getattr(module, method.input_type.name)
        response_type = getattr(module, method.output_type.name)
        make = (
            grpc.stream_stream_rpc_method_handler
            if method.client_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=tolerant_deserializer(request_type),
            response_serializer=response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )


def metadata_session_id(context: Any) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == SESSION_ID_METADATA:
            return value
    return None
