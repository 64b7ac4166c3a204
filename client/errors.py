"""Typed client errors carrying the server's google.rpc.ErrorInfo reason."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class UsageError(Exception):
    """Bad input from the user of a command: one line on stderr, exit 2."""


class LstmStreamError(Exception):
    """A call failed: `code` (grpc.StatusCode), `reason` (ErrorInfo), `metadata`, `details`."""

    def __init__(
        self, code: grpc.StatusCode, details: str, reason: str = "", metadata: dict | None = None
    ) -> None:
        super().__init__(
            f"{code.name} {reason}: {details}" if reason else f"{code.name}: {details}"
        )
        self.code = code
        self.details = details
        self.reason = reason
        self.metadata = dict(metadata or {})


class BadInputError(LstmStreamError, ValueError):
    """Inputs the SDK refuses before sending them: INVALID_ARGUMENT `BAD_INPUT`, as the server
    would answer. Also a ValueError, what the SDK raised for them before."""

    def __init__(self, details: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, details, "BAD_INPUT")


def not_ended(session_id: str, error: BaseException) -> str:
    """The note a `with` block's exception gets when the session could not be ended."""
    return (
        f"lstm-stream: session {session_id!r} was not ended ({error}); the server keeps it "
        f"until its idle timeout (attach to it, or delete it, to end it sooner)"
    )


def from_rpc_error(error: grpc.RpcError) -> LstmStreamError:
    """Decode a grpc.RpcError (sync or asyncio) into an LstmStreamError."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    reason, metadata = "", {}
    try:
        status = rpc_status.from_call(error)
    except (ValueError, AttributeError, TypeError):
        status = None
    if status is None:
        status = _status_from_trailers(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
    return LstmStreamError(code, details or "", reason, metadata)


def _status_from_trailers(error: grpc.RpcError):
    from google.rpc import status_pb2

    trailers = (
        error.trailing_metadata() if callable(getattr(error, "trailing_metadata", None)) else ()
    )
    for key, value in trailers or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    return None
