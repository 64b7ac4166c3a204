"""Hostile unary calls: Predict, Get/Delete/Export by id, CreateSession, ImportSession, and raw or
truncated bytes as request bodies. Each case sends one call and checks its outcome."""

from __future__ import annotations

import os

from google.protobuf.message import DecodeError

from lstm_stream.v1 import inference_pb2 as pb
from tests.outcomes import (
    BAD,
    EXISTS,
    MODEL_NOT_FOUND,
    NOT_FOUND,
    OK,
    Outcome,
    names_another_model,
)
from tests.server.fuzz.common import (
    INPUT_SIZE,
    LIMITS,
    METHOD,
    TIMEOUT_S,
    Context,
    bad_input_values,
    random_inputs,
    random_invalid_id,
    random_valid_id,
    unary,
)
from tests.server.fuzz.crafted import CRAFTED_KINDS, import_crafted
from tests.step_rule import inputs_outcome, resolve_id

PREDICT_EMPTY = "Predict: no inputs, num_steps 0"
NAMED = "Get/Delete/Export"
CREATE_KINDS = ["existing", "malformed", "disagreeing"]
IMPORT_KINDS = ["random", "truncated", "bad id"]
RAW_UNARY = ["Predict", "GetSession", "DeleteSession"]
TRUNCATED_UNARY = ["Predict", "GetSession"]
UNARY_KINDS = [
    "Predict: bad inputs",
    "Predict: num_steps disagrees",
    PREDICT_EMPTY,
    "Predict: no inputs, num_steps 3",
    f"{NAMED}: unknown session",
    f"{NAMED}: malformed id",
    f"{NAMED}: no id",
    f"{NAMED}: ids disagree",
    *(f"CreateSession: {kind} id" for kind in CREATE_KINDS),
    *(f"ImportSession: {kind} state" for kind in IMPORT_KINDS),
    *(f"{name}: random bytes" for name in RAW_UNARY),
    *(f"{name}: truncated" for name in TRUNCATED_UNARY),
    "StepBatch: hostile chunks",
]
BATCH_CHUNK_KINDS = ["bad inputs", "both encodings", "malformed id", "no id", "unknown", "twice"]
IMPORT_CRAFTED_KINDS = CRAFTED_KINDS


def expect_predict(request: pb.PredictRequest) -> Outcome:
    """Predict runs one whole sequence: good inputs, and num_steps their count or 0 (inferred).
    An empty sequence is answered with no outputs, as streaming nothing is; the model it names
    is looked up first."""
    if names_another_model(request):
        return MODEL_NOT_FOUND
    if inputs_outcome(request.inputs, LIMITS) != OK:
        return BAD
    return OK if request.num_steps in (0, len(request.inputs) // INPUT_SIZE) else BAD


def expect_named(session_id: str, metadata_id: str | None, live) -> Outcome:
    """A unary call that names a session (Get, Delete, Export): it needs an id."""
    outcome, session_id = resolve_id(session_id, metadata_id)
    if outcome != OK or not session_id:
        return BAD
    return OK if session_id in live else NOT_FOUND


async def predict_bad_inputs(ctx: Context) -> None:
    values = bad_input_values(ctx.rng)
    request = pb.PredictRequest(inputs=values, num_steps=len(values) // INPUT_SIZE)
    outcome, _, details = await unary(ctx.stub.Predict(request, timeout=TIMEOUT_S))
    ctx.ledger.check("Predict: bad inputs", BAD, outcome, details)


async def predict_num_steps(ctx: Context) -> None:
    steps = ctx.rng.randint(1, 10)
    wrong = ctx.rng.choice([steps + 1, steps - 1 or 7, 2**32 - 1])
    request = pb.PredictRequest(inputs=random_inputs(ctx.rng, steps), num_steps=wrong)
    outcome, _, details = await unary(ctx.stub.Predict(request, timeout=TIMEOUT_S))
    ctx.ledger.check("Predict: num_steps disagrees", BAD, outcome, details)


async def predict_empty(ctx: Context) -> None:
    num_steps = ctx.rng.choice([0, 0, 3])
    request = pb.PredictRequest(num_steps=num_steps)
    outcome, response, details = await unary(ctx.stub.Predict(request, timeout=TIMEOUT_S))
    kind = PREDICT_EMPTY if num_steps == 0 else f"Predict: no inputs, num_steps {num_steps}"
    checked = ctx.ledger.check(kind, expect_predict(request), outcome, details)
    if checked and response and response.outputs:
        ctx.ledger.fail(kind, f"{len(response.outputs)} outputs for no inputs")


def named_call(ctx: Context, session_id: str, metadata_id: str | None):
    rpc, request_type = ctx.rng.choice(
        [
            (ctx.stub.GetSession, pb.GetSessionRequest),
            (ctx.stub.DeleteSession, pb.DeleteSessionRequest),
            (ctx.stub.ExportSession, pb.ExportSessionRequest),
        ]
    )
    metadata = (("x-session-id", metadata_id),) if metadata_id else None
    return rpc(request_type(session_id=session_id), metadata=metadata, timeout=TIMEOUT_S)


async def check_named(ctx: Context, kind: str, session_id: str, metadata_id: str | None) -> None:
    """Never a target's id alone: a Delete of a target would be right, and ruin the run."""
    expected = expect_named(session_id, metadata_id, ctx.targets)
    assert expected != OK, f"{kind}: the case would touch a target"
    outcome, _, details = await unary(named_call(ctx, session_id, metadata_id))
    ctx.ledger.check(kind, expected, outcome, details)


def named_ids(session_id: str, via_metadata: bool) -> tuple[str, str | None]:
    """(message id, metadata id) for a call naming `session_id` one way."""
    return ("", session_id) if via_metadata else (session_id, None)


async def named_unknown(ctx: Context) -> None:
    session_id = random_valid_id(ctx.rng, "unknown-")
    ids = named_ids(session_id, ctx.rng.random() < 0.3)
    await check_named(ctx, f"{NAMED}: unknown session", *ids)


async def named_invalid(ctx: Context) -> None:
    via_metadata = ctx.rng.random() < 0.3
    session_id = random_invalid_id(ctx.rng, ascii_only=via_metadata)
    await check_named(ctx, f"{NAMED}: malformed id", *named_ids(session_id, via_metadata))


async def named_empty(ctx: Context) -> None:
    await check_named(ctx, f"{NAMED}: no id", "", None)


async def named_disagreeing(ctx: Context) -> None:
    session_id, other = ctx.target(), random_valid_id(ctx.rng, "other-")
    ids = (session_id, other) if ctx.rng.random() < 0.5 else (other, session_id)
    await check_named(ctx, f"{NAMED}: ids disagree", *ids)


async def create_bad(ctx: Context) -> None:
    kind = ctx.rng.choice(CREATE_KINDS)
    metadata, expected = None, BAD
    if kind == "existing":
        request, expected = pb.CreateSessionRequest(session_id=ctx.target()), EXISTS
    elif kind == "malformed":
        request = pb.CreateSessionRequest(session_id=random_invalid_id(ctx.rng))
    else:
        request = pb.CreateSessionRequest(session_id=random_valid_id(ctx.rng, "mine-"))
        metadata = (("x-session-id", random_valid_id(ctx.rng, "theirs-")),)
    call = ctx.stub.CreateSession(request, metadata=metadata, timeout=TIMEOUT_S)
    outcome, _, details = await unary(call)
    ctx.ledger.check(f"CreateSession: {kind} id", expected, outcome, details)


async def import_garbage(ctx: Context) -> None:
    kind = ctx.rng.choice(IMPORT_KINDS)
    request = pb.ImportSessionRequest(state=os.urandom(ctx.rng.randint(0, 300)))
    if kind == "truncated":
        request.state = ctx.export[: ctx.rng.randint(0, len(ctx.export) - 1)]
    elif kind == "bad id":
        request = pb.ImportSessionRequest(state=ctx.export, session_id=random_invalid_id(ctx.rng))
    outcome, _, details = await unary(ctx.stub.ImportSession(request, timeout=TIMEOUT_S))
    ctx.ledger.check(f"ImportSession: {kind} state", BAD, outcome, details)


async def import_one_crafted(ctx: Context) -> None:
    await import_crafted(ctx.stub, ctx.export, ctx.rng, ctx.ledger)


async def raw_unary_bytes(ctx: Context) -> None:
    name = ctx.rng.choice(RAW_UNARY)
    await send_raw_unary(ctx, f"{name}: random bytes", name, os.urandom(ctx.rng.randint(1, 64)))


async def truncated_unary(ctx: Context) -> None:
    name = ctx.rng.choice(TRUNCATED_UNARY)
    if name == "Predict":
        steps = ctx.rng.randint(1, 8)
        full = pb.PredictRequest(inputs=random_inputs(ctx.rng, steps), num_steps=steps)
    else:
        full = pb.GetSessionRequest(session_id=random_valid_id(ctx.rng, "unknown-"))
    data = full.SerializeToString()
    await send_raw_unary(ctx, f"{name}: truncated", name, data[: ctx.rng.randrange(1, len(data))])


async def send_raw_unary(ctx: Context, kind: str, name: str, data: bytes) -> None:
    try:
        decoded = getattr(pb, name + "Request").FromString(data)
    except DecodeError:
        expected = BAD  # undecodable: a bad message like any other
    else:
        if name == "Predict":
            expected = expect_predict(decoded)
        else:
            expected = expect_named(decoded.session_id, None, {})
    call = ctx.channel.unary_unary(METHOD + name)(data, timeout=TIMEOUT_S)
    outcome, _, details = await unary(call)
    ctx.ledger.check(kind, expected, outcome, details)


def hostile_chunk(ctx: Context, kind: str, earlier: list[str]) -> tuple[pb.SessionChunk, Outcome]:
    """One refused chunk of a batch; none names a target, so no target can change."""
    session_id = random_valid_id(ctx.rng, "batch-")
    if kind == "bad inputs":
        return pb.SessionChunk(session_id=session_id, inputs=bad_input_values(ctx.rng)), BAD
    if kind == "both encodings":
        values = random_inputs(ctx.rng, 1)
        packed = bytes(4 * INPUT_SIZE)
        return pb.SessionChunk(session_id=session_id, inputs=values, packed_inputs=packed), BAD
    if kind == "malformed id":
        return pb.SessionChunk(session_id=random_invalid_id(ctx.rng)), BAD
    if kind == "no id":
        return pb.SessionChunk(inputs=random_inputs(ctx.rng, 1)), BAD
    if kind == "twice" and earlier:
        return pb.SessionChunk(session_id=ctx.rng.choice(earlier)), BAD
    return pb.SessionChunk(session_id=session_id, inputs=random_inputs(ctx.rng, 1)), NOT_FOUND


async def batch_hostile(ctx: Context) -> None:
    """A StepBatch of refused chunks: the call succeeds and each chunk has its own error."""
    chunks, expected, ids = [], [], []
    for _ in range(ctx.rng.randint(1, 8)):
        chunk, outcome = hostile_chunk(ctx, ctx.rng.choice(BATCH_CHUNK_KINDS), ids)
        chunks.append(chunk)
        expected.append(outcome)
        if chunk.session_id and outcome == NOT_FOUND:
            ids.append(chunk.session_id)
    call = ctx.stub.StepBatch(pb.StepBatchRequest(chunks=chunks), timeout=TIMEOUT_S)
    outcome, response, details = await unary(call)
    kind = "StepBatch: hostile chunks"
    if not ctx.ledger.check(kind, OK, outcome, details) or response is None:
        return
    got = [chunk_outcome(result) for result in response.results]
    if got != expected:
        ctx.ledger.fail(kind, f"chunk outcomes {got}, expected {expected}")


def chunk_outcome(result: pb.ChunkResult) -> Outcome:
    from lstm_stream.client.batching import chunk_error

    if not result.HasField("error"):
        return OK
    error = chunk_error(result.error)
    return (error.code.name, error.reason, error.metadata.get("expected_step"))


UNARY_CASES = [
    (predict_bad_inputs, 14),
    (predict_num_steps, 5),
    (predict_empty, 2),
    (named_unknown, 8),
    (named_invalid, 8),
    (named_empty, 2),
    (named_disagreeing, 5),
    (create_bad, 5),
    (import_garbage, 3),
    (import_one_crafted, 1),
    (raw_unary_bytes, 8),
    (truncated_unary, 5),
    (batch_hostile, 6),
]
