"""Snapshots: every session written on shutdown, read back at start.

One file, `sessions.snapshot` in --snapshot-dir: a safetensors document with, per model version,
its sessions' state tensors stacked (h and c for an LSTM, h for a GRU) and their replay buffers
concatenated, and JSON metadata (format version; per group the model, version, fingerprint and
state names, and each session's id, next step and replay length). Written atomically: temp file,
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
VERSION = 3  # 3: each group names its state; 2 (grouped, LSTMs) and 1 (one model) are still read
READABLE = ("1", "2", "3")
LSTM_STATE = ["h", "c"]  # what versions 1 and 2 held


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


def write_snapshot(directory: Path, records: list[SessionRecord]) -> Path:
    """Every session, grouped by the model version it lives on (their shapes differ)."""
    directory.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[str, int, str], list[SessionRecord]] = {}
    for r in records:
        groups.setdefault((r.model, r.model_version, r.fingerprint), []).append(r)
    tensors: dict[str, torch.Tensor] = {}
    described = []
    for g, ((model, version, fingerprint), members) in enumerate(groups.items()):
        names = list(members[0].state)  # one model version: one declared state
        for name in names:
            tensors[f"{g}.{name}"] = torch.stack([r.state[name] for r in members])  # (N, L, H)
        tensors[f"{g}.replay"] = torch.cat([r.replay for r in members])  # (sum R, O)
        described.append(
            {
                "model": model,
                "model_version": version,
                "fingerprint": fingerprint,
                "state": names,
                "sessions": [
                    {
                        "id": r.session_id,
                        "next_step": r.next_step,
                        "replay": len(r.replay),
                        "create_time": r.create_time,
                        "principal": r.principal,
                    }
                    for r in members
                ],
            }
        )
    metadata = {"format": FORMAT, "version": str(VERSION), "groups": json.dumps(described)}
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


def read_snapshot(directory: Path) -> list[SessionRecord]:
    """The sessions of the snapshot in `directory` ([] when there is none), each naming the
    model version (and fingerprint) it lives on; the caller checks it holds those."""
    path = directory / SNAPSHOT_FILE
    if not path.exists():
        return []
    data = path.read_bytes()
    try:
        tensors = load(data)
        metadata = _metadata(data)
        if metadata.get("format") != FORMAT or metadata.get("version") not in READABLE:
            raise SnapshotError(
                f"{path}: expected {FORMAT} version {VERSION}, got "
                f"{metadata.get('format')} version {metadata.get('version')}"
            )
        if metadata["version"] == "1":  # one model, named by its fingerprint only
            sessions = json.loads(metadata["sessions"])
            groups = [{"fingerprint": metadata["fingerprint"], "sessions": sessions}]
            prefix = ""
        else:
            groups = json.loads(metadata["groups"])
            prefix = "{}."
        return [
            record
            for g, group in enumerate(groups)
            for record in _group_records(group, tensors, prefix.format(g))
        ]
    except (SafetensorError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"{path}: corrupt or truncated snapshot ({exc})") from None


def _group_records(
    group: dict, tensors: dict[str, torch.Tensor], prefix: str
) -> list[SessionRecord]:
    records, offset = [], 0
    names = group.get("state", LSTM_STATE)
    for i, s in enumerate(group["sessions"]):
        replay = tensors[f"{prefix}replay"][offset : offset + s["replay"]]
        offset += s["replay"]
        records.append(
            SessionRecord(
                s["id"],
                s["next_step"],
                {name: tensors[f"{prefix}{name}"][i] for name in names},
                replay,
                group["fingerprint"],
                s["create_time"],
                s.get("principal", ""),
                group.get("model", ""),
                int(group.get("model_version", 0)),
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
