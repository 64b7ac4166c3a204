"""Crafted ImportSession states: a real export with one thing made hostile. Each must be refused,
create no session, and leave the server serving."""

from __future__ import annotations

import json
import random
import struct

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from lstm_stream.v1 import inference_pb2 as pb
from tests.outcomes import BAD, MODEL_MISMATCH, NOT_FOUND, OK, Outcome
from tests.server.fuzz.common import (
    INPUT_SIZE,
    OUTPUT_SIZE,
    TIMEOUT_S,
    Ledger,
    one_stream,
    random_valid_id,
    unary,
)

CRAFTED: dict[str, tuple[dict, dict, Outcome]] = {
    # variant: (metadata changes, tensor changes, expected)
    "negative next_step": ({"next_step": "-5"}, {}, BAD),
    "next_step past uint64": ({"next_step": str(2**64)}, {}, BAD),
    "next_step not a number": ({"next_step": "forty"}, {}, BAD),
    "replay longer than next_step": ({"next_step": "2"}, {}, BAD),
    "malformed session id": ({"session_id": "bad id!"}, {}, BAD),
    "session id too long": ({"session_id": "x" * 500}, {}, BAD),
    "replay of the wrong width": ({}, {"replay": torch.zeros(5, OUTPUT_SIZE + 3)}, BAD),
    "replay not a matrix": ({}, {"replay": torch.zeros(5)}, BAD),
    "NaN in h": ({}, {"h": "nan"}, BAD),
    "Inf in c": ({}, {"c": "inf"}, BAD),
    "h of the wrong shape": ({}, {"h": torch.zeros(2, 47)}, BAD),
    "create_time NaN": ({"create_time": "nan"}, {}, BAD),
    "create_time out of range": ({"create_time": "1e300"}, {}, BAD),
    "another version": ({"version": "3"}, {}, BAD),
    "a GRU's state for an LSTM": ({"state": "h"}, {}, BAD),
    "a state tensor named but missing": ({"state": "h,c,x"}, {}, BAD),
    "no next_step": ({"next_step": None}, {}, BAD),
    "another model's fingerprint": ({"fingerprint": "0" * 64}, {}, MODEL_MISMATCH),
}


def crafted_kind(variant: str) -> str:
    return f"ImportSession: crafted {variant}"


CRAFTED_KINDS = [crafted_kind(variant) for variant in CRAFTED]


def craft_state(export: bytes, variant: str, session_id: str) -> tuple[bytes, Outcome]:
    (header_size,) = struct.unpack("<Q", export[:8])
    metadata = dict(json.loads(export[8 : 8 + header_size])["__metadata__"])
    tensors = dict(load_tensors(export))
    metadata_changes, tensor_changes, expected = CRAFTED[variant]
    metadata["session_id"] = session_id
    for key, value in metadata_changes.items():
        if value is None:
            del metadata[key]
        else:
            metadata[key] = value
    for key, value in tensor_changes.items():
        if isinstance(value, str):  # "nan" or "inf": one element of the real tensor
            tensors[key] = tensors[key].clone()
            tensors[key][0, 0] = float(value)
        else:
            tensors[key] = value
    return save_tensors(tensors, metadata=metadata), expected


async def import_crafted(
    stub, export: bytes, rng: random.Random, ledger: Ledger, variant: str | None = None
) -> tuple[str, Outcome]:
    """One crafted import; (the id it names, its outcome)."""
    variant = variant or rng.choice(list(CRAFTED))
    session_id = random_valid_id(rng, "imported-")
    state, expected = craft_state(export, variant, session_id)
    call = stub.ImportSession(pb.ImportSessionRequest(state=state), timeout=TIMEOUT_S)
    outcome, _, details = await unary(call)
    ledger.check(crafted_kind(variant), expected, outcome, details)
    return session_id, outcome


async def crafted_imports_one_by_one(
    stub, export: bytes, rng: random.Random, ledger: Ledger, live_sessions
) -> str:
    """Every crafted import once more, one at a time, with the live-session count (an async
    callable) around each; a wrongly accepted one is fed a message, and the server must still
    serve a new stream. What broke ('' when the server still serves)."""
    for variant in CRAFTED:
        kind = crafted_kind(variant)
        before = await live_sessions()
        session_id, accepted = await import_crafted(stub, export, rng, ledger, variant)
        after = await live_sessions()
        if after != before:
            ledger.fail(
                kind, f"the import (to be refused) left a session behind: {before} -> {after}"
            )
        outcome, _, details = await unary(
            stub.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=TIMEOUT_S)
        )
        if outcome != NOT_FOUND:
            ledger.fail(kind, f"GetSession after the import (to be refused): {outcome} {details!r}")
        if accepted != OK:
            continue
        feed = pb.StreamStepsRequest(session_id=session_id, inputs=[0.5] * INPUT_SIZE)
        fed, _, fed_details = await one_stream(stub.StreamSteps(iter([feed]), timeout=5))
        fresh = pb.StreamStepsRequest(inputs=[0.5] * INPUT_SIZE, end_session=True)
        outcome, _, details = await one_stream(stub.StreamSteps(iter([fresh]), timeout=5))
        if outcome != OK:
            return (
                f"the server stopped serving streams after ImportSession accepted a state with "
                f"{variant} and that session was fed one message ({fed} {fed_details!r}): a new "
                f"session's first message then got {outcome} {details!r}"
            )
    return ""
