"""A session's whole state as bytes: what ExportSession returns, ImportSession and snapshots read.

The bytes are a safetensors document (tensors h, c and the replay buffer's outputs; JSON
metadata with the format version, id, step index and model fingerprint), so any later release
can read a version it knows, and nothing is ever unpickled.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from server.errors import BadInput

FORMAT = "lstm-stream.session"
VERSION = 1


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    next_step: int
    h: torch.Tensor  # (L, H) float32
    c: torch.Tensor  # (L, H) float32
    replay: torch.Tensor  # (R, O) float32: outputs of steps next_step - R .. next_step - 1
    fingerprint: str
    create_time: float
    principal: str = ""


def encode(record: SessionRecord) -> bytes:
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "session_id": record.session_id,
        "next_step": str(record.next_step),
        "fingerprint": record.fingerprint,
        "create_time": repr(record.create_time),
        "principal": record.principal,
    }
    tensors = {"h": record.h, "c": record.c, "replay": record.replay}
    return save_tensors({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


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
    if metadata.get("version") != str(VERSION):
        raise BadInput(
            f"state: expected version {VERSION}, got {metadata.get('version')!r} "
            "(exported by a newer release?)"
        )
    try:
        tensors = load_tensors(data)
        return SessionRecord(
            session_id=metadata["session_id"],
            next_step=int(metadata["next_step"]),
            h=tensors["h"],
            c=tensors["c"],
            replay=tensors["replay"],
            fingerprint=metadata["fingerprint"],
            create_time=float(metadata["create_time"]),
            principal=metadata.get("principal", ""),
        )
    except (KeyError, ValueError, RuntimeError, SafetensorError) as exc:
        raise BadInput(f"state: corrupt exported session ({exc})") from None
