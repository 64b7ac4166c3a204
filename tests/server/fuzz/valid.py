"""The well-behaved sessions that stream beside the hostile traffic: appended chunks, resends
over the replay buffer, empty messages, resets, reconnects by message or metadata id, and now and
then a bad message on their own stream (refused; the session resumes on a new stream). Every
response is held to the step-rule model, and at the end every output to the offline model."""

from __future__ import annotations

import asyncio
import itertools
import random
from dataclasses import dataclass, field

import grpc
import numpy as np

from lstm_stream.v1 import inference_pb2 as pb
from tests.factories import offline
from tests.outcomes import OK, outcome_and_details
from tests.server.fuzz.common import (
    INPUT_SIZE,
    LIMITS,
    MAX_CHUNK_STEPS,
    REPLAY_STEPS,
    Ledger,
    Stream,
    rows,
)
from tests.step_rule import Message, Verdict, Window, first_message, next_message

VALID = "valid session"
LIVE_STREAM_BAD = ["width", "nonfinite", "too long", "other id", "gap", "stale"]
LIVE_STREAM_KINDS = [f"bad message on a live stream: {kind}" for kind in LIVE_STREAM_BAD]


@dataclass(repr=False)  # holds whole histories: a repr would take seconds
class ValidSession:
    index: int
    session_id: str = ""
    inputs: list = field(default_factory=list)  # (I,) rows by step index
    outputs: list = field(default_factory=list)  # (O,) rows by step index
    resets: list = field(default_factory=lambda: [0])  # step indices where a reset applied
    messages: int = 0
    refused: int = 0

    @property
    def next_step(self) -> int:
        return len(self.inputs)

    @property
    def window(self) -> Window:
        return Window.full(self.next_step, REPLAY_STEPS)

    def verdict(self, stream: Stream, request: pb.StreamStepsRequest) -> Verdict:
        """What the step rule says of `request` on `stream`."""
        message = Message.of(request)
        if stream.sent:
            return next_message(message, self.session_id, self.window, LIMITS)
        sessions = {self.session_id: self.window} if self.session_id else {}
        return first_message(message, stream.metadata_id, sessions, LIMITS)[1]


def open_stream(session: ValidSession, stub, rng: random.Random) -> tuple[Stream, dict]:
    """A new stream for the session, naming it by message, metadata or both; (stream, fields
    of its first message)."""
    if not session.session_id:
        return Stream(stub), {}
    if rng.random() < 0.5:
        both = rng.random() < 0.5
        return Stream(stub, session.session_id), {"session_id": session.session_id} if both else {}
    return Stream(stub), {"session_id": session.session_id}


async def run_valid(
    session: ValidSession, stub, rng: random.Random, stop: asyncio.Event, ledger: Ledger
) -> None:
    stream: Stream | None = None
    first: dict = {}
    while not stop.is_set():
        if stream is None:
            stream, first = open_stream(session, stub, rng)
        action = rng.random()
        if action < 0.04 and session.session_id:
            await inject_bad(session, stream, first, rng, ledger)
            stream = None
            continue
        if action < 0.06:
            stream.close()
            stream = None
            continue
        await asyncio.sleep(rng.uniform(0, 0.004))
        try:
            await send_valid(session, stream, first, rng, ledger, action)
        except grpc.RpcError as err:
            outcome, details = outcome_and_details(err)
            ledger.check(VALID, OK, outcome, details)
            stream.close()
            stream = None
        first = {}
    if stream is not None:
        stream.close()


def valid_request(
    session: ValidSession, first: dict, rng: random.Random, action: float
) -> pb.StreamStepsRequest:
    """Appended (maybe with a reset), resent over the replay buffer, or at the next step."""
    next_step = session.next_step
    steps = 0 if action < 0.07 or 0.30 <= action < 0.32 else rng.randint(1, 16)
    chunk = np.asarray(
        [[rng.gauss(0, 3) for _ in range(INPUT_SIZE)] for _ in range(steps)], dtype=np.float32
    ).reshape(steps, INPUT_SIZE)
    start, reset = None, False
    if action < 0.10:
        reset = rng.random() < 0.05  # rarely: each reset costs the offline check a model call
    elif action < 0.20 and next_step:
        start = next_step - rng.randint(1, min(next_step, REPLAY_STEPS // 2))
        chunk = np.concatenate([np.asarray(session.inputs[start:]), chunk])
    elif action < 0.30:
        start = next_step
    request = pb.StreamStepsRequest(inputs=chunk.ravel().tolist(), reset=reset, **first)
    if start is not None:
        request.start_step = start
    return request


async def send_valid(session, stream, first, rng, ledger, action) -> None:
    request = valid_request(session, first, rng, action)
    verdict = session.verdict(stream, request)
    if not verdict.ok:
        ledger.fail(VALID, f"session {session.index}: the model refuses a valid message {verdict}")
    response = await stream.send(request)
    session.messages += 1
    if not session.session_id:
        session.session_id = response.session_id
    got = rows(response.outputs)
    header = (response.session_id, response.start_step, response.num_steps, len(got))
    expected = (session.session_id, verdict.start_step, verdict.num_steps, verdict.num_steps)
    if header != expected:
        ledger.fail(VALID, f"session {session.index}: expected {expected}, got {header}")
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.UNKNOWN, grpc.aio.Metadata(), grpc.aio.Metadata(), "desynchronised"
        )
    replayed = len(verdict.replayed)
    held = np.asarray(session.outputs[verdict.replayed.start : verdict.replayed.stop])
    if replayed and not np.array_equal(got[:replayed], held):
        ledger.fail(VALID, f"session {session.index}: replayed rows differ")
    if verdict.reset:
        session.resets.append(session.next_step)
    session.inputs.extend(rows(request.inputs, INPUT_SIZE)[replayed:])
    session.outputs.extend(got[replayed:])


def bad_request(
    session: ValidSession, stream: Stream, first: dict, rng: random.Random
) -> tuple[str, pb.StreamStepsRequest]:
    next_step = session.next_step
    kinds = ["width", "nonfinite", "too long", "gap"]
    if stream.sent or not first.get("session_id"):
        kinds.append("other id")  # else it would only name another session
    if next_step > REPLAY_STEPS:
        kinds.append("stale")
    kind = rng.choice(kinds)
    request = pb.StreamStepsRequest(
        inputs=[0.5] * INPUT_SIZE * rng.randint(1, 4),
        reset=rng.random() < 0.3,
        end_session=rng.random() < 0.3,
        **first,
    )
    if kind == "width":
        request.inputs.append(1.0)
    elif kind == "nonfinite":
        request.inputs[rng.randrange(len(request.inputs))] = rng.choice([np.nan, np.inf, -np.inf])
    elif kind == "too long":
        request.inputs.extend([0.5] * INPUT_SIZE * MAX_CHUNK_STEPS)
    elif kind == "other id":
        request.session_id = f"someone-else-{rng.getrandbits(32)}"
    elif kind == "gap":
        request.start_step = rng.choice([next_step + 1, next_step + 1000, 2**63, 2**64 - 1])
    else:  # stale: starts before what the replay buffer holds
        request.start_step = rng.randrange(0, next_step - REPLAY_STEPS)
    return f"bad message on a live stream: {kind}", request


async def inject_bad(session, stream, first, rng, ledger: Ledger) -> None:
    """A bad message on a well-behaved session's own stream: refused, then the session resumes."""
    kind, request = bad_request(session, stream, first, rng)
    verdict = session.verdict(stream, request)
    if verdict.ok:
        ledger.fail(kind, f"the case made a message the model accepts: {request}"[:300])
    try:
        await stream.send(request)
        outcome, details = OK, "accepted"
    except grpc.RpcError as err:
        outcome, details = outcome_and_details(err)
    session.refused += 1
    ledger.check(kind, verdict.outcome, outcome, details)
    stream.close()


def offline_mismatches(session: ValidSession, model) -> list[str]:
    """Where the session's outputs differ from the offline model's, segment by segment (a reset
    starts a new segment)."""
    inputs, outputs = np.asarray(session.inputs), np.asarray(session.outputs)
    found = []
    for start, end in itertools.pairwise([*session.resets, session.next_step]):
        if end > start:
            difference = np.abs(outputs[start:end] - offline(model, inputs[start:end])).max()
            if difference > 1e-5:
                found.append(f"session {session.index} steps {start}-{end}: off by {difference}")
    return found
