"""Snapshots: every session written on shutdown, read back at start.

One file, `sessions.snapshot` in --snapshot-dir: a safetensors document with every session's
h and c stacked, their replay buffers concatenated, and JSON metadata (format version, model
fingerprint, each session's id, next step and replay length). Written atomically: temp file,
fsync, rename, fsync of the directory, so a crash mid-write leaves the previous state intact.
A snapshot is deleted once restored: restoring it twice would roll sessions back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from server.transfer import SessionRecord

SNAPSHOT_FILE = "sessions.snapshot"
FORMAT = "lstm-stream.snapshot"
VERSION = 1


class SnapshotError(Exception):
    """A snapshot that cannot be restored; the message says why and what to do."""


def ensure_writable(directory: Path) -> None:
    """Create --snapshot-dir if need be and prove a file can be written there, so that a
    directory the server may not write is refused at start, not at shutdown with every
    session lost (a volume mounted by root over the directory, for example)."""
    probe = directory / f".write-test.{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        user = _user_name()
        raise SnapshotError(
            f"--snapshot-dir {directory}: not writable by {user} ({exc.strerror or exc}); "
            "sessions could not be saved at shutdown. Give the directory to that user or "
            "choose another"
        ) from None


def _user_name() -> str:
    import pwd

    try:
        return f"user {pwd.getpwuid(os.geteuid()).pw_name} (uid {os.geteuid()})"
    except KeyError:
        return f"uid {os.geteuid()}"


def write_snapshot(directory: Path, records: list[SessionRecord], fingerprint: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    sessions = [
        {
            "id": r.session_id,
            "next_step": r.next_step,
            "replay": len(r.replay),
            "create_time": r.create_time,
            "principal": r.principal,
        }
        for r in records
    ]
    tensors = {
        "h": torch.stack([r.h for r in records]) if records else torch.zeros(0),  # (N, L, H)
        "c": torch.stack([r.c for r in records]) if records else torch.zeros(0),  # (N, L, H)
        "replay": torch.cat([r.replay for r in records]) if records else torch.zeros(0),
    }
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "fingerprint": fingerprint,
        "sessions": json.dumps(sessions),
    }
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    target = directory / SNAPSHOT_FILE
    temp = directory / f".{SNAPSHOT_FILE}.{os.getpid()}.tmp"
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, target)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target


def read_snapshot(directory: Path, fingerprint: str) -> list[SessionRecord]:
    """The sessions of the snapshot in `directory` ([] when there is none)."""
    path = directory / SNAPSHOT_FILE
    if not path.exists():
        return []
    data = path.read_bytes()
    try:
        tensors = load(data)
        metadata = _metadata(data)
    except (SafetensorError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"{path}: corrupt or truncated snapshot ({exc})") from None
    if metadata.get("format") != FORMAT or metadata.get("version") != str(VERSION):
        raise SnapshotError(
            f"{path}: expected {FORMAT} version {VERSION}, got "
            f"{metadata.get('format')} version {metadata.get('version')}"
        )
    if metadata["fingerprint"] != fingerprint:
        raise SnapshotError(
            f"{path}: written by model {metadata['fingerprint'][:12]}, this server runs "
            f"{fingerprint[:12]}; restoring it would apply another model's state"
        )
    records, offset = [], 0
    for i, s in enumerate(json.loads(metadata["sessions"])):
        replay = tensors["replay"][offset : offset + s["replay"]]
        offset += s["replay"]
        records.append(
            SessionRecord(
                s["id"],
                s["next_step"],
                tensors["h"][i],
                tensors["c"][i],
                replay,
                fingerprint,
                s["create_time"],
                s.get("principal", ""),
            )
        )
    return records


def _metadata(data: bytes) -> dict[str, str]:
    header_size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_size])["__metadata__"]


def discard_snapshot(directory: Path, suffix: str) -> Path | None:
    """Move the snapshot aside (`restored`, `rejected`), so it is never restored twice."""
    path = directory / SNAPSHOT_FILE
    if not path.exists():
        return None
    aside = path.with_name(f"{SNAPSHOT_FILE}.{suffix}")
    os.replace(path, aside)
    return aside
