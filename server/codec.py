"""Proto values <-> numpy arrays, with the input checks of the contract.

Checks are vectorised over the whole message: the `repeated float` is converted once, and
width, count and finiteness are checked on the array.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from server.errors import BadInput

SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9._~-]{1,128}")


def decode_steps(values: Sequence[float], input_size: int, max_steps: int) -> np.ndarray:
    """`num_steps * input_size` floats -> (num_steps, input_size) float32, or BadInput."""
    count = len(values)
    if count % input_size:
        raise BadInput(
            f"inputs: expected a multiple of input_size={input_size} values "
            f"(num_steps * input_size), got {count}"
        )
    num_steps = count // input_size
    if num_steps > max_steps:
        raise BadInput(
            f"inputs: expected at most max_chunk_steps={max_steps} timesteps per message, "
            f"got {num_steps}"
        )
    steps = np.asarray(values, dtype=np.float32).reshape(num_steps, input_size)
    if not np.isfinite(steps).all():
        row, col = np.argwhere(~np.isfinite(steps))[0]
        raise BadInput(
            f"inputs: expected finite numbers, got {steps[row, col]} at timestep {row}, "
            f"feature {col}"
        )
    return steps


def check_session_id(session_id: str) -> str:
    if not SESSION_ID_PATTERN.fullmatch(session_id):
        shown = session_id if len(session_id) <= 40 else session_id[:40] + "…"
        raise BadInput(
            "session_id: expected 1-128 characters from A-Z a-z 0-9 . _ ~ -, "
            f"got {shown!r} ({len(session_id)} characters)"
        )
    return session_id


def resolve_session_id(message_id: str, metadata_id: str | None) -> str:
    """The id a stream or call names, from its message and/or `x-session-id`; '' when neither."""
    if metadata_id and message_id and metadata_id != message_id:
        raise BadInput(
            f"session ids disagree: message session_id {message_id!r}, "
            f"metadata x-session-id {metadata_id!r}; expected the same id in both"
        )
    session_id = message_id or metadata_id or ""
    return check_session_id(session_id) if session_id else ""
