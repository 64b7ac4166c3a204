"""The errors of the contract (DESIGN Part 1.2): a status code and a google.rpc.ErrorInfo reason.

Domain code raises these; the servicer turns them into a gRPC status with the ErrorInfo detail.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "lstm-stream.v1"


class ServiceError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, **metadata: object) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = {k: str(v) for k, v in metadata.items()}

    def status_message(self) -> status_pb2.Status:
        """The google.rpc.Status of this error, its ErrorInfo packed in `details`."""
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
        )
        detail = any_pb2.Any()
        detail.Pack(info)
        return status_pb2.Status(
            code=getattr(code_pb2, self.code.name), message=self.message, details=[detail]
        )

    def to_status(self) -> grpc.Status:
        return rpc_status.to_status(self.status_message())


class BadInput(ServiceError):
    code, reason = grpc.StatusCode.INVALID_ARGUMENT, "BAD_INPUT"


class SessionNotFound(ServiceError):
    code, reason = grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND"

    def __init__(self, session_id: str, message: str = "") -> None:
        super().__init__(
            message or f"session {session_id!r} not found (unknown, deleted or expired)"
        )


class SessionExists(ServiceError):
    code, reason = grpc.StatusCode.ALREADY_EXISTS, "SESSION_EXISTS"

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} already exists")


class StepOutOfOrder(ServiceError):
    code, reason = grpc.StatusCode.FAILED_PRECONDITION, "STEP_OUT_OF_ORDER"

    def __init__(self, message: str, expected_step: int, **metadata: object) -> None:
        super().__init__(message, expected_step=expected_step, **metadata)


class SessionCapacity(ServiceError):
    code, reason = grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_CAPACITY"

    def __init__(self, capacity: int) -> None:
        super().__init__(
            f"session capacity reached: {capacity} sessions are live; end or delete one first"
        )


class SessionQuota(ServiceError):
    code, reason = grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_QUOTA"

    def __init__(self, quota: int) -> None:
        super().__init__(
            f"session quota reached: this principal already has {quota} live sessions "
            "(--max-sessions-per-principal); end or delete one first"
        )


class SessionTakenOver(ServiceError):
    code, reason = grpc.StatusCode.ABORTED, "SESSION_TAKEN_OVER"

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} was taken over by a newer stream")


class ShuttingDown(ServiceError):
    code, reason = grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN"

    def __init__(self) -> None:
        super().__init__("server is draining for shutdown; reconnect and resume with start_step")


class ModelMismatch(ServiceError):
    code, reason = grpc.StatusCode.FAILED_PRECONDITION, "MODEL_MISMATCH"


class ModelNotFound(ServiceError):
    """An unknown model or version, or one that no longer takes new work (DESIGN 1.8)."""

    code, reason = grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"


class StoreUnavailable(ServiceError):
    """A session this replica does not hold may be in the state store, which cannot be read."""

    code, reason = grpc.StatusCode.UNAVAILABLE, "STATE_STORE_UNAVAILABLE"

    def __init__(self, detail: str) -> None:
        super().__init__(
            f"session not held by this replica and the state store is unreachable ({detail}); "
            "retry shortly"
        )
