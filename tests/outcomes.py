"""How tests name the result of a call: (status code name, ErrorInfo reason, expected_step)."""

from __future__ import annotations

import grpc

Outcome = tuple[str, str, str | None]  # (status code name, ErrorInfo reason, expected_step)
OK: Outcome = ("OK", "", None)
BAD: Outcome = ("INVALID_ARGUMENT", "BAD_INPUT", None)
NOT_FOUND: Outcome = ("NOT_FOUND", "SESSION_NOT_FOUND", None)
EXISTS: Outcome = ("ALREADY_EXISTS", "SESSION_EXISTS", None)
CAPACITY: Outcome = ("RESOURCE_EXHAUSTED", "SESSION_CAPACITY", None)
TAKEN_OVER: Outcome = ("ABORTED", "SESSION_TAKEN_OVER", None)
MODEL_MISMATCH: Outcome = ("FAILED_PRECONDITION", "MODEL_MISMATCH", None)
MODEL_NOT_FOUND: Outcome = ("NOT_FOUND", "MODEL_NOT_FOUND", None)
SERVED_MODEL = ("basic-motions", 1)  # the bundled model, as a server with no repository names it


def names_another_model(request) -> bool:
    """Whether a request's model / model_version (empty / 0: the default) are other than the
    bundled model's: a server serving only it answers MODEL_NOT_FOUND before anything else."""
    name, version = SERVED_MODEL
    return request.model not in ("", name) or request.model_version not in (0, version)


TOO_LARGE: Outcome = ("RESOURCE_EXHAUSTED", "", None)  # gRPC's own size limit, no ErrorInfo


def out_of_order(expected_step: int) -> Outcome:
    return ("FAILED_PRECONDITION", "STEP_OUT_OF_ORDER", str(expected_step))


def outcome_and_details(err: grpc.RpcError) -> tuple[Outcome, str]:
    """The outcome of a failed call, and its error text."""
    from lstm_stream.client.errors import from_rpc_error

    error = from_rpc_error(err)
    return (error.code.name, error.reason, error.metadata.get("expected_step")), error.details


def outcome_of(err: grpc.RpcError) -> Outcome:
    return outcome_and_details(err)[0]
