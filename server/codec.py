"""Proto values <-> numpy arrays, with the input checks of the contract.

Checks are vectorised over the whole message: the `repeated float` (or the packed bytes,
DESIGN 1.6) is converted once, and width, count and finiteness are checked on the array. A batch
message's chunks are checked together: one array for all of them, one finiteness pass.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from server.errors import BadInput

SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9._~-]{1,128}")


PACKED_DTYPE = np.dtype("<f4")  # DESIGN 1.6: little-endian float32


def decode_steps(
    values: Sequence[float], input_size: int, max_steps: int, packed: bytes = b""
) -> np.ndarray:
    """`num_steps * input_size` floats, or as many packed float32 -> (num_steps, input_size)
    float32, or BadInput."""
    steps = _shaped(values, packed, input_size, max_steps)
    _refuse_non_finite(steps)
    return steps


def _refuse_non_finite(steps: np.ndarray) -> None:
    if not np.isfinite(steps).all():
        row, col = np.argwhere(~np.isfinite(steps))[0]
        raise BadInput(
            f"inputs: expected finite numbers, got {steps[row, col]} at timestep {row}, "
            f"feature {col}"
        )


def _shaped(values: Sequence[float], packed: bytes, input_size: int, max_steps: int) -> np.ndarray:
    if packed:
        if len(values):
            raise BadInput(
                f"inputs: expected either inputs or packed_inputs, got both ({len(values)} "
                f"values and {len(packed)} bytes)"
            )
        if len(packed) % (4 * input_size):
            raise BadInput(
                f"packed_inputs: expected a multiple of 4 * input_size = {4 * input_size} bytes "
                f"(little-endian float32, num_steps * input_size), got {len(packed)}"
            )
        num_steps = len(packed) // (4 * input_size)
    else:
        if len(values) % input_size:
            raise BadInput(
                f"inputs: expected a multiple of input_size={input_size} values "
                f"(num_steps * input_size), got {len(values)}"
            )
        num_steps = len(values) // input_size
    if num_steps > max_steps:
        raise BadInput(
            f"inputs: expected at most max_chunk_steps={max_steps} timesteps per message, "
            f"got {num_steps}"
        )
    if packed:
        return np.frombuffer(packed, dtype=PACKED_DTYPE).reshape(num_steps, input_size)
    return np.asarray(values, dtype=np.float32).reshape(num_steps, input_size)


def decode_chunks(chunks: Sequence, input_size: int, max_steps: int) -> list[np.ndarray | BadInput]:
    """Each chunk's (num_steps, input_size) inputs, or the BadInput that refuses that chunk
    alone. The finiteness check runs once over every chunk's rows together."""
    fast = _decode_all_packed(chunks, input_size, max_steps)
    if fast is not None:
        return fast
    decoded: list[np.ndarray | BadInput] = []
    for chunk in chunks:
        try:
            decoded.append(_shaped(chunk.inputs, chunk.packed_inputs, input_size, max_steps))
        except BadInput as err:
            decoded.append(err)
    arrays = [d for d in decoded if isinstance(d, np.ndarray) and len(d)]
    if arrays and not np.isfinite(np.concatenate(arrays)).all():
        decoded = [_finite_or_refused(d) if isinstance(d, np.ndarray) else d for d in decoded]
    return decoded


def _decode_all_packed(
    chunks: Sequence, input_size: int, max_steps: int
) -> list[np.ndarray | BadInput] | None:
    """The common case at the cost of one array: every chunk packed, whole rows, within the
    step limit, all finite. None when any chunk needs looking at alone."""
    packed = [chunk.packed_inputs for chunk in chunks]
    if not packed or not all(packed) or any(len(chunk.inputs) for chunk in chunks):
        return None
    sizes = np.fromiter(map(len, packed), dtype=np.int64, count=len(packed))
    row_bytes = 4 * input_size
    if (sizes % row_bytes).any() or sizes.max() > max_steps * row_bytes:
        return None
    steps = np.frombuffer(b"".join(packed), dtype=PACKED_DTYPE).reshape(-1, input_size)
    if not np.isfinite(steps).all():
        return None
    lengths = sizes // row_bytes
    if (lengths == lengths[0]).all():  # chunks of one length: views of one (N, T, I) array
        return list(steps.reshape(len(packed), int(lengths[0]), input_size))
    ends = np.cumsum(lengths).tolist()
    return [steps[end - n : end] for end, n in zip(ends, lengths.tolist(), strict=True)]


def _finite_or_refused(steps: np.ndarray) -> np.ndarray | BadInput:
    try:
        _refuse_non_finite(steps)
    except BadInput as err:
        return err
    return steps


def put_outputs(message, outputs: np.ndarray, packed: bool) -> None:
    """Set a response's outputs, mirroring its request (DESIGN 1.6): packed bytes for packed
    inputs, repeated floats otherwise."""
    if packed:
        message.packed_outputs = outputs.astype(PACKED_DTYPE, copy=False).tobytes()
    else:
        message.outputs.extend(outputs.ravel().tolist())


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
