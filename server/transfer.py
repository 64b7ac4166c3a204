"""A session's whole state as bytes: what ExportSession returns, ImportSession and snapshots read.

The bytes are a safetensors document (the state tensors the model declares, h and c for an LSTM
or h for a GRU, and the replay buffer's outputs; JSON metadata with the format version, the
state's names, id, step index and model fingerprint), so any later release can read a version it
knows, and nothing is ever unpickled. Version 2 names the state; version 1, from before GRUs,
held an LSTM's h and c and is still read.

The state store keeps the same record as separate fields (to_fields/from_fields: raw float32
bytes and one JSON field), which costs a tenth of a safetensors document to write, and it writes
one after every batch for every session that stepped.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import save as save_arrays
from safetensors.torch import load as load_tensors

from server.errors import BadInput

FORMAT = "lstm-stream.session"
VERSION = 2  # 2: the state's names recorded; 1 (an LSTM's h and c) is still read
READABLE = (1, 2)
VERSION_1_STATE = ("h", "c")
RAW_FLOAT32 = np.dtype("<f4")  # the store's state field: raw little-endian float32


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    next_step: int
    state: dict[str, torch.Tensor]  # by name, in the model's order (h, c or h): (L, H) float32
    replay: torch.Tensor  # (R, O) float32: outputs of steps next_step - R .. next_step - 1
    fingerprint: str
    create_time: float
    principal: str = ""
    model: str = ""  # the version it lives on; empty in records from before versions
    model_version: int = 0

    @property
    def h(self) -> torch.Tensor:
        return self.state["h"]


def encode(record: SessionRecord) -> bytes:
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "session_id": record.session_id,
        "next_step": str(record.next_step),
        "fingerprint": record.fingerprint,
        "create_time": repr(record.create_time),
        "principal": record.principal,
        "model": record.model,
        "model_version": str(record.model_version),
        "state": ",".join(record.state),
    }
    tensors = {**record.state, "replay": record.replay}
    # numpy's writer: a fifth of torch's time, and the state store encodes after every batch
    # (it passes numpy arrays; np.asarray takes CPU tensors and arrays alike).
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    return save_arrays(arrays, metadata=metadata)


def _metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise BadInput(f"state: expected an exported session, got {len(data)} bytes")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > len(data) - 8:
        raise BadInput("state: truncated (header runs past the end of the bytes)")
    try:
        header = json.loads(data[8 : 8 + header_size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadInput("state: expected an exported session, header is not JSON") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise BadInput(f"state: expected format {FORMAT!r}, got something else")
    return metadata


def decode(data: bytes) -> SessionRecord:
    metadata = _metadata(data)
    if metadata.get("version") not in {str(v) for v in READABLE}:
        raise BadInput(
            f"state: expected version {VERSION} (or 1), got {metadata.get('version')!r} "
            "(exported by a newer release?)"
        )
    try:
        tensors = load_tensors(data)
        names = metadata["state"].split(",") if "state" in metadata else VERSION_1_STATE
        return SessionRecord(
            session_id=metadata["session_id"],
            next_step=int(metadata["next_step"]),
            state={name: tensors[name] for name in names},
            replay=tensors["replay"],
            fingerprint=metadata["fingerprint"],
            create_time=float(metadata["create_time"]),
            principal=metadata.get("principal", ""),
            model=metadata.get("model", ""),
            model_version=int(metadata.get("model_version", "0")),
        )
    except (KeyError, ValueError, RuntimeError, SafetensorError) as exc:
        raise BadInput(f"state: corrupt exported session ({exc})") from None


def validate(
    record: SessionRecord,
    num_layers: int,
    hidden_size: int,
    output_size: int,
    state_names: tuple[str, ...] = VERSION_1_STATE,
) -> None:
    """Refuse a record that would make a broken session; run before anything is created."""
    from server.codec import check_session_id

    check_session_id(record.session_id)
    if not 0 <= record.next_step < 2**63:
        raise BadInput(f"state: expected next_step in [0, 2**63), got {record.next_step}")
    if tuple(record.state) != tuple(state_names):
        raise BadInput(
            f"state: expected the tensors {', '.join(state_names)} (the model's recurrent "
            f"state), got {', '.join(record.state) or 'none'}"
        )
    expected = (num_layers, hidden_size)
    for name, tensor in record.state.items():
        if tuple(tensor.shape) != expected:
            raise BadInput(
                f"state: expected {name} of shape {list(expected)}, got {list(tensor.shape)}"
            )
    replay = record.replay
    if replay.ndim != 2 or replay.shape[1] != output_size or len(replay) > record.next_step:
        raise BadInput(
            f"state: expected replay of shape [R, {output_size}] with R <= next_step "
            f"({record.next_step}), got {list(replay.shape)}"
        )
    for name, tensor in (*record.state.items(), ("replay", replay)):
        if tensor.dtype != torch.float32 or not torch.isfinite(tensor).all():
            raise BadInput(
                f"state: expected finite float32 {name}, got {tensor.dtype} "
                "with NaN, infinite or other values"
            )
    if not (0 <= record.create_time < 1e11):  # NaN fails this too
        raise BadInput(
            f"state: expected create_time in seconds since 1970, got {record.create_time}"
        )


def state_bytes(state, replay) -> bytes:
    """The state store's `state` field: the state tensors in order, then the replay rows, as
    raw little-endian float32, one after another (arrays or CPU tensors)."""
    return b"".join(map(_raw_float32, (*state, replay)))


def _raw_float32(array) -> bytes:
    if isinstance(array, np.ndarray) and array.dtype == RAW_FLOAT32:
        return array.tobytes()  # C order; the usual case, the pool's read (a third the time)
    return np.ascontiguousarray(array, dtype=RAW_FLOAT32).tobytes()


def to_fields(record: SessionRecord) -> dict[str, bytes | str | int]:
    """The record as hash fields for the state store: step, meta (JSON) and state
    (state_bytes)."""
    state = state_bytes(record.state.values(), record.replay)
    layers, hidden = record.h.shape
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "session_id": record.session_id,
        "principal": record.principal,
        "fingerprint": record.fingerprint,
        "create_time": record.create_time,
        "model": record.model,
        "model_version": record.model_version,
        "shape": [layers, hidden, record.replay.shape[1]],  # L, H, output size
        "state": list(record.state),
    }
    return {"step": record.next_step, "meta": json.dumps(meta), "state": state}


def from_fields(fields: dict[bytes, bytes]) -> SessionRecord:
    """A record from the state store's hash fields; BadInput names what is wrong."""
    try:
        meta = json.loads(fields[b"meta"])
        if meta.get("format") != FORMAT or meta.get("version") not in READABLE:
            raise BadInput(
                f"stored state: expected {FORMAT!r} version {VERSION} (or 1), got "
                f"{meta.get('format')!r} version {meta.get('version')!r}"
            )
        layers, hidden, outputs = (int(n) for n in meta["shape"])
        names = meta.get("state", VERSION_1_STATE)
        values = torch.from_numpy(np.frombuffer(fields[b"state"], dtype="<f4").copy())
        size = layers * hidden
        state = {name: values[i * size : (i + 1) * size].reshape(layers, hidden)
                 for i, name in enumerate(names)}  # fmt: skip
        return SessionRecord(
            session_id=meta["session_id"],
            next_step=int(fields[b"step"]),
            state=state,
            replay=values[len(names) * size :].reshape(-1, outputs),
            fingerprint=meta["fingerprint"],
            create_time=float(meta["create_time"]),
            principal=meta["principal"],
            model=meta.get("model", ""),
            model_version=int(meta.get("model_version", 0)),
        )
    except (KeyError, ValueError, TypeError, RuntimeError, json.JSONDecodeError) as exc:
        raise BadInput(f"stored state: corrupt record ({type(exc).__name__}: {exc})") from None
