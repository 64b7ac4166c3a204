"""Hostile StreamSteps messages, one stream each (a stream ends at its first error). What each
must get comes from the step-rule model (tests/step_rule.py), given the target sessions'
windows; `reset` and `end_session` ride on many of them, and must not happen either."""

from __future__ import annotations

import os

from google.protobuf.message import DecodeError

from lstm_stream.v1 import inference_pb2 as pb
from tests.outcomes import (
    BAD,
    MODEL_NOT_FOUND,
    NOT_FOUND,
    TOO_LARGE,
    Outcome,
    names_another_model,
)
from tests.server.fuzz.common import (
    INPUT_SIZE,
    LIMITS,
    MAX_MESSAGE_BYTES,
    METHOD,
    REPLAY_STEPS,
    TIMEOUT_S,
    Context,
    bad_input_values,
    one_stream,
    packed_inputs,
    random_inputs,
    random_invalid_id,
    random_valid_id,
)
from tests.step_rule import Message, first_message, next_message

GAPS_ON_NEW_SESSIONS = 120  # capped: each one leaks a session if the server is wrong
BAD_FIRST_WHERE = ["new session", "target by id", "target by metadata"]
SECOND_KINDS = ["bad inputs", "other id", "malformed id", "gap", "stale"]
GAP_ON_NEW = "StreamSteps: gap on a new session"
NEAR_LIMIT = "StreamSteps: message near the size limit"
OVER_LIMIT = "StreamSteps: message over the size limit"
STREAM_KINDS = [
    *(f"StreamSteps: bad inputs, {where}" for where in BAD_FIRST_WHERE),
    "StreamSteps: unknown id",
    "StreamSteps: unknown id (metadata)",
    "StreamSteps: malformed id",
    "StreamSteps: malformed id (metadata)",
    "StreamSteps: ids disagree",
    GAP_ON_NEW,
    "StreamSteps: gap start_step on a session",
    "StreamSteps: stale start_step on a session",
    *(f"StreamSteps: second message {kind}" for kind in SECOND_KINDS),
    "StreamSteps: random bytes",
    "StreamSteps: truncated",
    NEAR_LIMIT,
    OVER_LIMIT,
]


def stream_call(ctx: Context, requests, metadata_id: str | None = None, raw: bool = False):
    metadata = (("x-session-id", metadata_id),) if metadata_id else None
    method = ctx.channel.stream_stream(METHOD + "StreamSteps") if raw else ctx.stub.StreamSteps
    return method(iter(requests), metadata=metadata, timeout=TIMEOUT_S)


def hostile_flags(ctx: Context, request: pb.StreamStepsRequest) -> pb.StreamStepsRequest:
    request.reset = ctx.rng.random() < 0.3
    request.end_session = ctx.rng.random() < 0.3
    return request


async def check_first(
    ctx: Context, kind: str, request: pb.StreamStepsRequest, metadata_id: str | None = None
) -> None:
    """A stream of one message, which must be refused as the model says."""
    _, verdict = first_message(Message.of(request), metadata_id, ctx.targets, LIMITS)
    if verdict.ok:
        ctx.ledger.fail(kind, f"the case made a message the model accepts: {request}"[:300])
        return
    outcome, responses, details = await one_stream(stream_call(ctx, [request], metadata_id))
    if ctx.ledger.check(kind, verdict.outcome, outcome, details) and responses:
        ctx.ledger.fail(kind, f"{len(responses)} responses before the error")


async def bad_first(ctx: Context) -> None:
    request = hostile_flags(ctx, pb.StreamStepsRequest(inputs=bad_input_values(ctx.rng)))
    metadata_id = None
    where = ctx.rng.choice(BAD_FIRST_WHERE)
    if where == "target by id":
        request.session_id = ctx.target()
    elif where == "target by metadata":
        metadata_id = ctx.target()
    if ctx.rng.random() < 0.2:
        request.start_step = ctx.rng.choice([0, 1, 2**63])
    await check_first(ctx, f"StreamSteps: bad inputs, {where}", request, metadata_id)


async def unknown_id(ctx: Context) -> None:
    session_id = random_valid_id(ctx.rng, "unknown-")
    steps = ctx.rng.choice([0, 1, 5])
    request = hostile_flags(ctx, pb.StreamStepsRequest(inputs=random_inputs(ctx.rng, steps)))
    if ctx.rng.random() < 0.5:
        await check_first(ctx, "StreamSteps: unknown id (metadata)", request, session_id)
    else:
        request.session_id = session_id
        await check_first(ctx, "StreamSteps: unknown id", request)


async def malformed_id(ctx: Context) -> None:
    request = hostile_flags(ctx, pb.StreamStepsRequest(inputs=random_inputs(ctx.rng, 1)))
    if ctx.rng.random() < 0.4:
        metadata_id = random_invalid_id(ctx.rng, ascii_only=True)
        await check_first(ctx, "StreamSteps: malformed id (metadata)", request, metadata_id)
    else:
        request.session_id = random_invalid_id(ctx.rng)
        await check_first(ctx, "StreamSteps: malformed id", request)


async def disagreeing_ids(ctx: Context) -> None:
    session_id, other = ctx.target(), random_valid_id(ctx.rng, "other-")
    message_id, metadata_id = (session_id, other) if ctx.rng.random() < 0.5 else (other, session_id)
    request = pb.StreamStepsRequest(session_id=message_id, inputs=random_inputs(ctx.rng, 2))
    await check_first(ctx, "StreamSteps: ids disagree", hostile_flags(ctx, request), metadata_id)


async def gap_on_new(ctx: Context) -> None:
    if ctx.gaps_on_new >= GAPS_ON_NEW_SESSIONS:
        return await unknown_id(ctx)
    ctx.gaps_on_new += 1
    request = pb.StreamStepsRequest(
        inputs=random_inputs(ctx.rng, ctx.rng.randint(0, 3)),
        start_step=ctx.rng.choice([1, 2**63, 2**64 - 1]),
    )
    await check_first(ctx, GAP_ON_NEW, request)


async def out_of_order_on_target(ctx: Context) -> None:
    """A gap, or a resend older than the replay buffer, on a target (attaches, then refused)."""
    session_id = ctx.target()
    next_step = ctx.targets[session_id].next_step
    stale = ctx.rng.random() < 0.4
    if stale:
        start = ctx.rng.randrange(0, next_step - REPLAY_STEPS)
        steps = ctx.rng.randint(1, 30)
    else:
        start = ctx.rng.choice([next_step + 1, next_step + 7, 2**63, 2**64 - 1])
        steps = ctx.rng.randint(0, 5)
    request = pb.StreamStepsRequest(
        session_id=session_id, inputs=random_inputs(ctx.rng, steps), start_step=start
    )
    kind = f"StreamSteps: {'stale' if stale else 'gap'} start_step on a session"
    async with ctx.locks[session_id]:  # it attaches: a concurrent one would take it over
        await check_first(ctx, kind, hostile_flags(ctx, request))


def bad_second_message(ctx: Context, session_id: str, kind: str) -> pb.StreamStepsRequest:
    next_step = ctx.targets[session_id].next_step
    second = hostile_flags(ctx, pb.StreamStepsRequest(inputs=random_inputs(ctx.rng, 1)))
    if kind == "bad inputs":
        second.ClearField("inputs")
        second.inputs.extend(bad_input_values(ctx.rng))
    elif kind == "other id":
        second.session_id = ctx.rng.choice([s for s in ctx.targets if s != session_id])
    elif kind == "malformed id":
        second.session_id = random_invalid_id(ctx.rng)
    elif kind == "gap":
        second.start_step = ctx.rng.choice([next_step + 1, 2**63, 2**64 - 1])
    else:
        second.start_step = ctx.rng.randrange(0, next_step - REPLAY_STEPS)
    return second


async def bad_second(ctx: Context) -> None:
    """A good first message (it attaches and applies nothing), then a bad one."""
    session_id = ctx.target()
    window = ctx.targets[session_id]
    kind = ctx.rng.choice(SECOND_KINDS)
    first = pb.StreamStepsRequest(session_id=session_id)
    second = bad_second_message(ctx, session_id, kind)
    _, opened = first_message(Message.of(first), None, ctx.targets, LIMITS)
    expected = next_message(Message.of(second), session_id, window, LIMITS).outcome
    kind = f"StreamSteps: second message {kind}"
    async with ctx.locks[session_id]:
        outcome, responses, details = await one_stream(stream_call(ctx, [first, second]))
    if ctx.ledger.check(kind, expected, outcome, details):
        summary = [(r.session_id, r.start_step, r.num_steps) for r in responses]
        if summary != [(session_id, opened.start_step, opened.num_steps)]:
            ctx.ledger.fail(kind, f"first message answered {summary}")


async def raw_stream_bytes(ctx: Context) -> None:
    for _ in range(20):
        if await send_raw_stream(
            ctx, "StreamSteps: random bytes", os.urandom(ctx.rng.randint(1, 80))
        ):
            return


async def truncated_stream(ctx: Context) -> None:
    request = pb.StreamStepsRequest(
        session_id=random_valid_id(ctx.rng, "unknown-"),
        inputs=random_inputs(ctx.rng, ctx.rng.randint(1, 6)),
    )
    if ctx.rng.random() < 0.5:
        request.start_step = ctx.rng.randint(0, 2**64 - 1)
    data = request.SerializeToString()
    await send_raw_stream(ctx, "StreamSteps: truncated", data[: ctx.rng.randrange(1, len(data))])


async def send_raw_stream(
    ctx: Context, kind: str, data: bytes, expected: Outcome | None = None
) -> bool:
    """Send bytes as a stream's one message; False (nothing sent) when they decode to a message
    that would create or feed a session, which is not the point here."""
    if expected is None:
        try:
            decoded = pb.StreamStepsRequest.FromString(data)
        except DecodeError:
            expected = BAD
        else:
            expected = first_message(Message.of(decoded), None, {}, LIMITS)[1].outcome
            if not decoded.session_id and names_another_model(decoded):
                expected = MODEL_NOT_FOUND  # looked up before the inputs are decoded
            if expected not in (BAD, NOT_FOUND, MODEL_NOT_FOUND):
                return False
    outcome, _, details = await one_stream(stream_call(ctx, [data], raw=True))
    ctx.ledger.check(kind, expected, outcome, details)
    return True


async def near_and_over_the_size_limit(ctx: Context) -> None:
    """One message just under the gRPC size limit (too many timesteps: BAD_INPUT), one over it
    (refused by gRPC itself)."""
    near_values = ((MAX_MESSAGE_BYTES - 11) // 4) // INPUT_SIZE * INPUT_SIZE
    await send_raw_stream(ctx, NEAR_LIMIT, packed_inputs(near_values), BAD)
    await send_raw_stream(ctx, OVER_LIMIT, packed_inputs(MAX_MESSAGE_BYTES // 4 + 6), TOO_LARGE)


STREAM_CASES = [
    (bad_first, 14),
    (unknown_id, 5),
    (malformed_id, 5),
    (disagreeing_ids, 4),
    (gap_on_new, 1),
    (out_of_order_on_target, 6),
    (bad_second, 6),
    (raw_stream_bytes, 8),
    (truncated_stream, 6),
]
