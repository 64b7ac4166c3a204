"""Fuzzing the API (issue 6): more than 10,000 malformed or hostile messages at a real lstm-serve
subprocess while 20 well-behaved sessions stream through it the whole time.

Every bad message must get the status code and ErrorInfo reason of DESIGN Part 1.2 and change no
session's state; the well-behaved sessions' outputs must equal the offline model's; the server
must end up alive, healthy, with no leaked sessions and bounded memory. The hostile traffic:
wrong widths, NaN/Inf, empty and oversized inputs (past max_chunk_steps, and one message near the
64 MiB limit), huge start_step, unknown, malformed and disagreeing session ids, random bytes and
truncated protobuf as request bodies, random bytes on the raw TCP port, crafted ImportSession
states, streams that never send, and a client that writes without ever reading.

Failures are collected per kind of message and reported together at the end, so one run names
every contract violation it found.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import re
import struct
import subprocess
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lstm_stream.v1 import inference_pb2 as pb
from lstm_stream.v1 import inference_pb2_grpc as pb_grpc
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from client.errors import from_rpc_error
from server.config import ServerConfig
from tests.factories import ServeProcess, free_port, offline
from tests.outcomes import BAD, EXISTS, NOT_FOUND, OK, Outcome

INPUT_SIZE, OUTPUT_SIZE = 6, 4  # the bundled model
MAX_CHUNK_STEPS = 512
REPLAY_STEPS = 16
MAX_MESSAGE_BYTES = 64 * 2**20  # set by flag where the server has one (it was fixed at 64 MiB)
SIZE_FLAG = (
    ["--max-message-bytes", str(MAX_MESSAGE_BYTES)]
    if hasattr(ServerConfig(), "max_message_bytes")
    else []
)
METHOD = "/lstm_stream.v1.InferenceService/"
SESSION_ID = re.compile(r"[A-Za-z0-9._~-]{1,128}")  # "1-128 characters from A-Z a-z 0-9 . _ ~ -"
ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~-"
BAD_ID_CHARS_ASCII = " !\"#$%&'()*+,/:;<=>?@[\\]^`{|}"  # may travel in metadata
BAD_ID_CHARS = BAD_ID_CHARS_ASCII + "é漢🙂\x00\n\t"
TARGETS = 12  # sessions the hostile traffic aims at; none of it may change them
TARGET_STEPS = 40
VALID_SESSIONS = 20
BAD_MESSAGES = 10_500  # at least 10,000, with a margin
GAPS_ON_NEW_SESSIONS = 120  # capped: each one leaks a session if the server is wrong
TIMEOUT_S = 30.0

MODEL_MISMATCH: Outcome = ("FAILED_PRECONDITION", "MODEL_MISMATCH", None)
TOO_LARGE: Outcome = ("RESOURCE_EXHAUSTED", "", None)  # gRPC's own limit, before the servicer


def out_of_order(expected_step: int) -> Outcome:
    return ("FAILED_PRECONDITION", "STEP_OUT_OF_ORDER", str(expected_step))


def outcome_of(err: grpc.RpcError) -> tuple[Outcome, str]:
    error = from_rpc_error(err)
    return (error.code.name, error.reason, error.metadata.get("expected_step")), error.details


# What the contract says a message must get (the reference the server is held to)


def bad_inputs(values) -> bool:
    if len(values) % INPUT_SIZE or len(values) // INPUT_SIZE > MAX_CHUNK_STEPS:
        return True
    return not np.isfinite(np.asarray(values, dtype=np.float32)).all()


def expect_predict(request: pb.PredictRequest) -> Outcome:
    if bad_inputs(request.inputs) or request.num_steps != len(request.inputs) // INPUT_SIZE:
        return BAD
    return OK


def expect_named(session_id: str, metadata_id: str | None, live: dict[str, int]) -> Outcome:
    """A unary call that names a session (Get, Delete, Export)."""
    if metadata_id and session_id and metadata_id != session_id:
        return BAD
    session_id = session_id or metadata_id or ""
    if not SESSION_ID.fullmatch(session_id):
        return BAD
    return OK if session_id in live else NOT_FOUND


def expect_first(
    request: pb.StreamStepsRequest, metadata_id: str | None, live: dict[str, int]
) -> Outcome:
    """The first message of a stream; `live` maps session ids to their next step."""
    if metadata_id and request.session_id and metadata_id != request.session_id:
        return BAD
    session_id = request.session_id or metadata_id or ""
    if session_id and not SESSION_ID.fullmatch(session_id):
        return BAD
    if bad_inputs(request.inputs):
        return BAD
    if session_id and session_id not in live:
        return NOT_FOUND
    return expect_step(request, live.get(session_id, 0))


def expect_step(request: pb.StreamStepsRequest, next_step: int) -> Outcome:
    """The step rule for a session at `next_step` whose replay buffer holds all it can."""
    if not request.HasField("start_step"):
        return OK
    start = request.start_step
    if start > next_step:
        return out_of_order(next_step)
    already = min(next_step - start, len(request.inputs) // INPUT_SIZE)
    if already and start < next_step - min(next_step, REPLAY_STEPS):
        return out_of_order(next_step)
    return OK


# Helpers


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def packed_inputs(num_values: int) -> bytes:
    """A StreamStepsRequest of `num_values` zero inputs, serialized by hand (fast at 64 MiB)."""
    return b"\x1a" + varint(4 * num_values) + bytes(4 * num_values)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def sessions_active(metrics_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as page:
        for line in page.read().decode().splitlines():
            if line.startswith("lstm_sessions_active "):
                return int(float(line.split()[1]))
    raise RuntimeError("lstm_sessions_active is not exported")


@dataclass
class Ledger:
    messages: Counter = field(default_factory=Counter)  # by kind
    bad: Counter = field(default_factory=Counter)  # messages that must be refused, by kind
    failures: defaultdict = field(default_factory=lambda: defaultdict(list))

    def check(
        self,
        kind: str,
        expected: Outcome | tuple[Outcome, ...],
        got: Outcome,
        details: str = "",
        messages: int = 1,
    ) -> bool:
        allowed = expected if isinstance(expected[0], tuple) else (expected,)
        self.messages[kind] += messages
        if OK not in allowed:
            self.bad[kind] += 1
        if got not in allowed:
            self.fail(kind, f"expected {' or '.join(map(str, allowed))}, got {got}: {details!r}")
            return False
        names_expected = "expected" in details or kind.startswith("ImportSession")
        if got[1] in ("BAD_INPUT", "STEP_OUT_OF_ORDER") and not names_expected:
            self.fail(kind, f"{got[1]} without naming what was expected: {details!r}")
        return True

    def fail(self, kind: str, what: str) -> None:
        self.failures[kind].append(what)

    def summary(self) -> str:
        lines = []
        for kind, failures in sorted(self.failures.items()):
            lines.append(f"{kind}: {len(failures)} failures over {self.messages[kind]} messages:")
            lines.extend(f"    {f[:300]}" for f in failures[:3])
        return "\n".join(lines)


async def unary(call) -> tuple[Outcome, object, str]:
    try:
        return OK, await call, ""
    except grpc.RpcError as err:
        outcome, details = outcome_of(err)
        return outcome, None, details


async def one_stream(call) -> tuple[Outcome, list, str]:
    """Drive a stream whose requests were given up front; (outcome, responses, details)."""
    responses = []
    try:
        async for response in call:
            responses.append(response)
    except grpc.RpcError as err:
        outcome, details = outcome_of(err)
        return outcome, responses, details
    return OK, responses, ""


class Stream:
    """An interactive stream: write one message, read its response."""

    def __init__(self, stub, metadata=None) -> None:
        self.call = stub.StreamSteps(metadata=metadata, timeout=600)
        self.sent = 0

    async def send(self, request: pb.StreamStepsRequest) -> pb.StreamStepsResponse:
        self.sent += 1
        await self.call.write(request)
        response = await self.call.read()
        if response is grpc.aio.EOF:
            raise grpc.aio.AioRpcError(
                await self.call.code(),
                grpc.aio.Metadata(),
                await self.call.trailing_metadata(),
                await self.call.details(),
            )
        return response

    def close(self) -> None:
        self.call.cancel()


def rows(values, width: int = OUTPUT_SIZE) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).reshape(-1, width)


# The well-behaved sessions


@dataclass(repr=False)  # holds whole histories: a repr would take seconds
class ValidSession:
    index: int
    session_id: str = ""
    inputs: list = field(default_factory=list)  # (I,) rows by step index
    outputs: list = field(default_factory=list)  # (O,) rows by step index
    resets: list = field(default_factory=lambda: [0])  # step indices where a reset applied
    messages: int = 0
    refused: int = 0
    reconnects: int = 0

    @property
    def next_step(self) -> int:
        return len(self.inputs)


async def run_valid(
    session: ValidSession, stub, rng: random.Random, stop: asyncio.Event, ledger: Ledger
) -> None:
    kind = "valid session"
    stream: Stream | None = None
    first: dict = {}
    while not stop.is_set():
        if stream is None:
            metadata, first = None, {}
            if session.session_id:
                session.reconnects += 1
                if rng.random() < 0.5:
                    metadata = (("x-session-id", session.session_id),)
                    if rng.random() < 0.5:
                        first = {"session_id": session.session_id}
                else:
                    first = {"session_id": session.session_id}
            stream = Stream(stub, metadata)
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
            outcome, details = outcome_of(err)
            ledger.check(kind, OK, outcome, details)
            stream.close()
            stream = None
        first = {}
    if stream is not None:
        stream.close()


async def send_valid(session, stream, first, rng, ledger, action) -> None:
    next_step = session.next_step
    steps = 0 if action < 0.07 or 0.30 <= action < 0.32 else rng.randint(1, 16)
    chunk = np.asarray(
        [[rng.gauss(0, 3) for _ in range(INPUT_SIZE)] for _ in range(steps)], dtype=np.float32
    ).reshape(steps, INPUT_SIZE)
    overlap, start, reset = 0, None, False
    if action < 0.10:
        reset = rng.random() < 0.05  # rarely: each reset costs the offline check a model call
    elif action < 0.20 and next_step:
        overlap = rng.randint(1, min(next_step, REPLAY_STEPS // 2))
        start = next_step - overlap
        chunk = np.concatenate([np.asarray(session.inputs[start:]), chunk])
    elif action < 0.30:
        start = next_step
    request = pb.StreamStepsRequest(inputs=chunk.ravel().tolist(), reset=reset, **first)
    if start is not None:
        request.start_step = start
    response = await stream.send(request)
    session.messages += 1
    first_step = next_step - overlap
    if not session.session_id:
        session.session_id = response.session_id
    got = rows(response.outputs)
    if (response.session_id, response.start_step, response.num_steps, len(got)) != (
        session.session_id,
        first_step,
        len(chunk),
        len(chunk),
    ):
        ledger.fail(
            "valid session",
            f"session {session.index}: expected ({session.session_id}, {first_step}, "
            f"{len(chunk)}), got ({response.session_id}, {response.start_step}, "
            f"{response.num_steps}) with {len(got)} rows",
        )
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.UNKNOWN, grpc.aio.Metadata(), grpc.aio.Metadata(), "desynchronised"
        )
    if overlap and not np.array_equal(got[:overlap], np.asarray(session.outputs[first_step:])):
        ledger.fail("valid session", f"session {session.index}: replayed rows differ")
    if reset:
        session.resets.append(next_step)
    session.inputs.extend(chunk[overlap:])
    session.outputs.extend(got[overlap:])


async def inject_bad(session, stream, first, rng, ledger) -> None:
    """A bad message on a well-behaved session's own stream: refused, then the session resumes."""
    next_step = session.next_step
    kinds = ["width", "nonfinite", "too long", "gap"]
    if stream.sent or not first.get("session_id"):
        kinds.append("other id")
    if next_step > REPLAY_STEPS:
        kinds.append("stale")
    kind = rng.choice(kinds)
    request = pb.StreamStepsRequest(
        inputs=[0.5] * INPUT_SIZE * rng.randint(1, 4),
        reset=rng.random() < 0.3,
        end_session=rng.random() < 0.3,
        **first,
    )
    expected = BAD
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
        expected = out_of_order(next_step)
    else:  # stale: starts before what the replay buffer holds
        request.start_step = rng.randrange(0, next_step - REPLAY_STEPS)
        expected = out_of_order(next_step)
    try:
        await stream.send(request)
        outcome, details = OK, "accepted"
    except grpc.RpcError as err:
        outcome, details = outcome_of(err)
    session.refused += 1
    ledger.check(f"bad message on a live stream: {kind}", expected, outcome, details)
    stream.close()


# The hostile traffic


def random_valid_id(rng: random.Random, prefix: str = "") -> str:
    return prefix + "".join(rng.choice(ID_CHARS) for _ in range(rng.randint(8, 40)))


def random_invalid_id(rng: random.Random, ascii_only: bool = False) -> str:
    if rng.random() < 0.3:
        return "".join(rng.choice(ID_CHARS) for _ in range(rng.randint(129, 2000)))
    base = random_valid_id(rng)
    at = rng.randint(1, len(base) - 1)
    return base[:at] + rng.choice(BAD_ID_CHARS_ASCII if ascii_only else BAD_ID_CHARS) + base[at:]


def random_inputs(rng: random.Random, steps: int) -> list[float]:
    return [rng.gauss(0, 3) for _ in range(steps * INPUT_SIZE)]


def bad_input_values(rng: random.Random) -> list[float]:
    kind = rng.choice(["width", "nonfinite", "too long", "width"])
    if kind == "width":
        values = random_inputs(rng, rng.randint(0, 8))
        return values + [1.0] * rng.randint(1, INPUT_SIZE - 1)
    if kind == "nonfinite":
        values = random_inputs(rng, rng.randint(1, 8))
        for _ in range(rng.randint(1, 3)):
            values[rng.randrange(len(values))] = rng.choice([np.nan, np.inf, -np.inf])
        return values
    return [0.25] * INPUT_SIZE * rng.randint(MAX_CHUNK_STEPS + 1, MAX_CHUNK_STEPS + 300)


class Fuzzer:
    def __init__(
        self, target: str, rng: random.Random, ledger: Ledger, targets: dict[str, int]
    ) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.InferenceServiceStub(self.channel)
        self.raw_stream = self.channel.stream_stream(METHOD + "StreamSteps")
        self.raw_unary = {
            name: self.channel.unary_unary(METHOD + name)
            for name in ("Predict", "GetSession", "DeleteSession")
        }
        self.rng = rng
        self.ledger = ledger
        self.targets = targets  # id -> next step; the hostile traffic must leave these alone
        self.target_locks = {session_id: asyncio.Lock() for session_id in targets}
        self.host, self.port = target.rsplit(":", 1)
        self.export: bytes = b""  # a real exported session, for crafted imports
        self.gaps_on_new = 0
        self.cases = [
            (self.predict_bad_inputs, 14),
            (self.predict_num_steps, 5),
            (self.predict_empty, 2),
            (self.named_unknown, 8),
            (self.named_invalid, 8),
            (self.named_empty, 2),
            (self.named_disagreeing, 5),
            (self.create_bad, 5),
            (self.import_garbage, 3),
            (self.import_crafted, 1),
            (self.raw_unary_bytes, 8),
            (self.truncated_unary, 5),
            (self.stream_bad_first, 14),
            (self.stream_unknown, 5),
            (self.stream_invalid_id, 5),
            (self.stream_disagreeing, 4),
            (self.stream_gap_on_new, 1),
            (self.stream_out_of_order_target, 6),
            (self.stream_bad_second, 6),
            (self.raw_stream_bytes, 8),
            (self.truncated_stream, 6),
            (self.tcp_garbage, 1),
        ]

    def pick(self):
        return self.rng.choices([c for c, _ in self.cases], [w for _, w in self.cases])[0]

    async def close(self) -> None:
        await self.channel.close()

    # Unary

    async def predict_bad_inputs(self) -> None:
        values = bad_input_values(self.rng)
        request = pb.PredictRequest(inputs=values, num_steps=len(values) // INPUT_SIZE)
        outcome, _, details = await unary(self.stub.Predict(request, timeout=TIMEOUT_S))
        self.ledger.check("Predict: bad inputs", BAD, outcome, details)

    async def predict_num_steps(self) -> None:
        steps = self.rng.randint(1, 10)
        wrong = self.rng.choice([0, steps + 1, steps - 1 or 7, 2**32 - 1])
        request = pb.PredictRequest(inputs=random_inputs(self.rng, steps), num_steps=wrong)
        outcome, _, details = await unary(self.stub.Predict(request, timeout=TIMEOUT_S))
        self.ledger.check("Predict: num_steps disagrees", BAD, outcome, details)

    async def predict_empty(self) -> None:
        """An empty sequence: no outputs (as streaming nothing gives), or refused; never a crash."""
        num_steps = self.rng.choice([0, 0, 3])
        request = pb.PredictRequest(num_steps=num_steps)
        outcome, response, details = await unary(self.stub.Predict(request, timeout=TIMEOUT_S))
        expected = (OK, BAD) if num_steps == 0 else BAD
        if self.ledger.check("Predict: empty inputs", expected, outcome, details) and response:
            assert not response.outputs

    def named_call(self, session_id: str, metadata_id: str | None):
        rpc, request_type = self.rng.choice(
            [
                (self.stub.GetSession, pb.GetSessionRequest),
                (self.stub.DeleteSession, pb.DeleteSessionRequest),
                (self.stub.ExportSession, pb.ExportSessionRequest),
            ]
        )
        metadata = (("x-session-id", metadata_id),) if metadata_id else None
        return rpc(request_type(session_id=session_id), metadata=metadata, timeout=TIMEOUT_S)

    async def named_unknown(self) -> None:
        session_id = random_valid_id(self.rng, "unknown-")
        via_metadata = self.rng.random() < 0.3
        call = self.named_call(
            "" if via_metadata else session_id, session_id if via_metadata else None
        )
        outcome, _, details = await unary(call)
        self.ledger.check("Get/Delete/Export: unknown session", NOT_FOUND, outcome, details)

    async def named_invalid(self) -> None:
        via_metadata = self.rng.random() < 0.3
        session_id = random_invalid_id(self.rng, ascii_only=via_metadata)
        call = self.named_call(
            "" if via_metadata else session_id, session_id if via_metadata else None
        )
        outcome, _, details = await unary(call)
        self.ledger.check("Get/Delete/Export: malformed id", BAD, outcome, details)

    async def named_empty(self) -> None:
        outcome, _, details = await unary(self.named_call("", None))
        self.ledger.check("Get/Delete/Export: no id", BAD, outcome, details)

    async def named_disagreeing(self) -> None:
        session_id = self.rng.choice(list(self.targets))
        other = random_valid_id(self.rng, "other-")
        ids = (session_id, other) if self.rng.random() < 0.5 else (other, session_id)
        outcome, _, details = await unary(self.named_call(*ids))
        self.ledger.check("Get/Delete/Export: ids disagree", BAD, outcome, details)

    async def create_bad(self) -> None:
        kind = self.rng.choice(["existing", "malformed", "disagreeing"])
        metadata, expected = None, BAD
        if kind == "existing":
            request, expected = (
                pb.CreateSessionRequest(session_id=self.rng.choice(list(self.targets))),
                EXISTS,
            )
        elif kind == "malformed":
            request = pb.CreateSessionRequest(session_id=random_invalid_id(self.rng))
        else:
            request = pb.CreateSessionRequest(session_id=random_valid_id(self.rng, "mine-"))
            metadata = (("x-session-id", random_valid_id(self.rng, "theirs-")),)
        call = self.stub.CreateSession(request, metadata=metadata, timeout=TIMEOUT_S)
        outcome, _, details = await unary(call)
        self.ledger.check(f"CreateSession: {kind} id", expected, outcome, details)

    async def import_garbage(self) -> None:
        kind = self.rng.choice(["random", "truncated", "bad id"])
        request = pb.ImportSessionRequest(state=os.urandom(self.rng.randint(0, 300)))
        if kind == "truncated":
            request.state = self.export[: self.rng.randint(0, len(self.export) - 1)]
        elif kind == "bad id":
            request = pb.ImportSessionRequest(
                state=self.export, session_id=random_invalid_id(self.rng)
            )
        call = self.stub.ImportSession(request, timeout=TIMEOUT_S)
        outcome, _, details = await unary(call)
        self.ledger.check(f"ImportSession: {kind} state", BAD, outcome, details)

    async def import_crafted(self, variant: str | None = None) -> tuple[str, Outcome]:
        """A well-formed export with one field made hostile; (the id it names, the outcome)."""
        variant = variant or self.rng.choice(list(CRAFTED))
        session_id = random_valid_id(self.rng, "imported-")
        state, expected = craft_state(self.export, variant, session_id)
        call = self.stub.ImportSession(pb.ImportSessionRequest(state=state), timeout=TIMEOUT_S)
        outcome, _, details = await unary(call)
        self.ledger.check(f"ImportSession: crafted {variant}", expected, outcome, details)
        return session_id, outcome

    async def raw_unary_bytes(self) -> None:
        name = self.rng.choice(list(self.raw_unary))
        data = os.urandom(self.rng.randint(1, 64))
        await self.send_raw_unary(f"{name}: random bytes", name, data)

    async def truncated_unary(self) -> None:
        if self.rng.random() < 0.5:
            name = "Predict"
            steps = self.rng.randint(1, 8)
            full = pb.PredictRequest(inputs=random_inputs(self.rng, steps), num_steps=steps)
        else:
            name = "GetSession"
            full = pb.GetSessionRequest(session_id=random_valid_id(self.rng, "unknown-"))
        data = full.SerializeToString()
        await self.send_raw_unary(
            f"{name}: truncated", name, data[: self.rng.randrange(1, len(data))]
        )

    async def send_raw_unary(self, kind: str, name: str, data: bytes) -> None:
        try:
            decoded = getattr(pb, name + "Request").FromString(data)
        except DecodeError:
            expected = BAD  # undecodable: a bad message like any other
        else:
            if name == "Predict":
                expected = expect_predict(decoded)
                if expected == OK and not decoded.inputs:
                    expected = (OK, BAD)
            else:
                expected = expect_named(decoded.session_id, None, {})
        outcome, _, details = await unary(self.raw_unary[name](data, timeout=TIMEOUT_S))
        self.ledger.check(kind, expected, outcome, details)

    # Streams, one per malformed message (a stream ends at its first error)

    def stream_call(self, requests, metadata_id: str | None = None, raw: bool = False):
        metadata = (("x-session-id", metadata_id),) if metadata_id else None
        method = self.raw_stream if raw else self.stub.StreamSteps
        return method(iter(requests), metadata=metadata, timeout=TIMEOUT_S)

    async def first_message(self, kind: str, request, metadata_id=None, expected=None) -> None:
        expected = expected or expect_first(request, metadata_id, self.targets)
        outcome, responses, details = await one_stream(self.stream_call([request], metadata_id))
        if self.ledger.check(kind, expected, outcome, details) and responses and outcome != OK:
            self.ledger.fail(kind, f"{len(responses)} responses before the error")

    def hostile_flags(self, request: pb.StreamStepsRequest) -> pb.StreamStepsRequest:
        """reset and end_session on a bad message must not happen either."""
        request.reset = self.rng.random() < 0.3
        request.end_session = self.rng.random() < 0.3
        return request

    async def stream_bad_first(self) -> None:
        request = self.hostile_flags(pb.StreamStepsRequest(inputs=bad_input_values(self.rng)))
        metadata_id = None
        where = self.rng.choice(["new session", "target by id", "target by metadata"])
        if where == "target by id":
            request.session_id = self.rng.choice(list(self.targets))
        elif where == "target by metadata":
            metadata_id = self.rng.choice(list(self.targets))
        if self.rng.random() < 0.2:
            request.start_step = self.rng.choice([0, 1, 2**63])
        await self.first_message(f"StreamSteps: bad inputs, {where}", request, metadata_id, BAD)

    async def stream_unknown(self) -> None:
        session_id = random_valid_id(self.rng, "unknown-")
        steps = self.rng.choice([0, 1, 5])
        request = self.hostile_flags(pb.StreamStepsRequest(inputs=random_inputs(self.rng, steps)))
        if self.rng.random() < 0.5:
            await self.first_message("StreamSteps: unknown id (metadata)", request, session_id)
        else:
            request.session_id = session_id
            await self.first_message("StreamSteps: unknown id", request)

    async def stream_invalid_id(self) -> None:
        request = self.hostile_flags(pb.StreamStepsRequest(inputs=random_inputs(self.rng, 1)))
        if self.rng.random() < 0.4:
            metadata_id = random_invalid_id(self.rng, ascii_only=True)
            await self.first_message("StreamSteps: malformed id (metadata)", request, metadata_id)
        else:
            request.session_id = random_invalid_id(self.rng)
            await self.first_message("StreamSteps: malformed id", request)

    async def stream_disagreeing(self) -> None:
        session_id = self.rng.choice(list(self.targets))
        other = random_valid_id(self.rng, "other-")
        message_id, metadata_id = (
            (session_id, other) if self.rng.random() < 0.5 else (other, session_id)
        )
        request = pb.StreamStepsRequest(session_id=message_id, inputs=random_inputs(self.rng, 2))
        await self.first_message(
            "StreamSteps: ids disagree", self.hostile_flags(request), metadata_id
        )

    async def stream_gap_on_new(self) -> None:
        if self.gaps_on_new >= GAPS_ON_NEW_SESSIONS:
            return await self.stream_unknown()
        self.gaps_on_new += 1
        request = pb.StreamStepsRequest(
            inputs=random_inputs(self.rng, self.rng.randint(0, 3)),
            start_step=self.rng.choice([1, 2**63, 2**64 - 1]),
        )
        await self.first_message("StreamSteps: gap on a new session", request)

    async def stream_out_of_order_target(self) -> None:
        """A gap, or a resend older than the replay buffer, on a target (attaches, then refused)."""
        session_id = self.rng.choice(list(self.targets))
        next_step = self.targets[session_id]
        stale = self.rng.random() < 0.4
        if stale:
            start = self.rng.randrange(0, next_step - REPLAY_STEPS)
            steps = self.rng.randint(1, 30)
        else:
            start = self.rng.choice([next_step + 1, next_step + 7, 2**63, 2**64 - 1])
            steps = self.rng.randint(0, 5)
        request = pb.StreamStepsRequest(
            session_id=session_id, inputs=random_inputs(self.rng, steps), start_step=start
        )
        kind = f"StreamSteps: {'stale' if stale else 'gap'} start_step on a session"
        async with self.target_locks[session_id]:
            await self.first_message(
                kind, self.hostile_flags(request), None, out_of_order(next_step)
            )

    async def stream_bad_second(self) -> None:
        """A good first message (it attaches and applies nothing), then a bad one."""
        session_id = self.rng.choice(list(self.targets))
        next_step = self.targets[session_id]
        second = self.hostile_flags(pb.StreamStepsRequest(inputs=random_inputs(self.rng, 1)))
        kind = self.rng.choice(["bad inputs", "other id", "malformed id", "gap", "stale"])
        expected = BAD
        if kind == "bad inputs":
            second.ClearField("inputs")
            second.inputs.extend(bad_input_values(self.rng))
        elif kind == "other id":
            second.session_id = self.rng.choice([s for s in self.targets if s != session_id])
        elif kind == "malformed id":
            second.session_id = random_invalid_id(self.rng)
        elif kind == "gap":
            second.start_step = self.rng.choice([next_step + 1, 2**63, 2**64 - 1])
            expected = out_of_order(next_step)
        else:
            second.start_step = self.rng.randrange(0, next_step - REPLAY_STEPS)
            expected = out_of_order(next_step)
        first = pb.StreamStepsRequest(session_id=session_id)
        async with self.target_locks[session_id]:
            outcome, responses, details = await one_stream(self.stream_call([first, second]))
        kind = f"StreamSteps: second message {kind}"
        self.ledger.messages[kind] += 1  # the good first message
        if self.ledger.check(kind, expected, outcome, details):
            summary = [(r.session_id, r.start_step, r.num_steps) for r in responses]
            if summary != [(session_id, next_step, 0)]:
                self.ledger.fail(kind, f"first message answered {summary}")

    async def raw_stream_bytes(self) -> None:
        for _ in range(20):
            data = os.urandom(self.rng.randint(1, 80))
            if await self.send_raw_stream("StreamSteps: random bytes", data):
                return

    async def truncated_stream(self) -> None:
        request = pb.StreamStepsRequest(
            session_id=random_valid_id(self.rng, "unknown-"),
            inputs=random_inputs(self.rng, self.rng.randint(1, 6)),
        )
        if self.rng.random() < 0.5:
            request.start_step = self.rng.randint(0, 2**64 - 1)
        data = request.SerializeToString()
        await self.send_raw_stream(
            "StreamSteps: truncated", data[: self.rng.randrange(1, len(data))]
        )

    async def send_raw_stream(self, kind: str, data: bytes, expected=None) -> bool:
        """Send bytes as a stream's one message; False (nothing sent) when they would decode to
        a message the server must accept, which is not the point here."""
        if expected is None:
            try:
                decoded = pb.StreamStepsRequest.FromString(data)
            except DecodeError:
                expected = BAD
            else:
                expected = expect_first(decoded, None, {})
                if expected not in (BAD, NOT_FOUND):
                    return False
        outcome, _, details = await one_stream(self.stream_call([data], raw=True))
        self.ledger.check(kind, expected, outcome, details)
        return True

    async def tcp_garbage(self) -> None:
        """Bytes on the raw port, not HTTP/2 at all (or a preface and then garbage)."""
        data = os.urandom(self.rng.randint(24, 4096))  # at least a preface's length: no waiting
        choice = self.rng.random()
        if choice < 0.3:
            data = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + data
        elif choice < 0.4:
            data = b"GET / HTTP/1.1\r\nHost: lstm\r\n\r\n"
        reader, writer = await asyncio.open_connection(self.host, int(self.port))
        try:
            writer.write(data)
            await writer.drain()
            await asyncio.wait_for(reader.read(65536), 1)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()
        self.ledger.messages["TCP: garbage bytes"] += 1
        self.ledger.bad["TCP: garbage bytes"] += 1


# Crafted ImportSession states: a real export with one thing made hostile


CRAFTED = {
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
    "another version": ({"version": "2"}, {}, BAD),
    "no next_step": ({"next_step": None}, {}, BAD),
    "another model's fingerprint": ({"fingerprint": "0" * 64}, {}, MODEL_MISMATCH),
}


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


# The run


@dataclass(repr=False)  # holds whole histories: a repr would take seconds
class Report:
    ledger: Ledger
    valid: list
    rss_mb: dict
    sessions_expected: int
    sessions_active: int
    slow_reader: dict
    seconds: float
    problems: list
    phases: dict
    broken: bool = False  # the server stopped serving streams mid-run


async def setup_targets(stub, rng: random.Random) -> tuple[dict, dict, dict]:
    """Sessions with known history that the hostile traffic aims at (and must not change)."""
    targets, inputs, outputs = {}, {}, {}
    for i in range(TARGETS):
        session_id = f"target-{i:02d}-{rng.getrandbits(40):x}"
        await stub.CreateSession(pb.CreateSessionRequest(session_id=session_id), timeout=TIMEOUT_S)
        steps = np.asarray(random_inputs(rng, TARGET_STEPS), dtype=np.float32)
        request = pb.StreamStepsRequest(session_id=session_id, inputs=steps.tolist())
        responses = [r async for r in stub.StreamSteps(iter([request]), timeout=TIMEOUT_S)]
        targets[session_id] = TARGET_STEPS
        inputs[session_id] = steps.reshape(-1, INPUT_SIZE)
        outputs[session_id] = rows(responses[0].outputs)
    return targets, inputs, outputs


async def slow_reader(stub, rng: random.Random, messages: int = 1000, steps: int = MAX_CHUNK_STEPS):
    """A client that writes many messages and reads nothing until told to (its writes stall
    once the server's unread responses fill the flow-control windows, some 7 MB)."""
    generator = np.random.default_rng(rng.getrandbits(32))
    inputs = (generator.standard_normal((messages * steps, INPUT_SIZE)) * 3).astype(np.float32)
    call = stub.StreamSteps(timeout=600)
    written = [0]

    async def write_all() -> None:
        for i in range(messages):
            chunk = inputs[i * steps : (i + 1) * steps]
            await call.write(pb.StreamStepsRequest(inputs=chunk.ravel().tolist()))
            written[0] += 1

    return call, asyncio.create_task(write_all()), written, inputs, messages


async def crafted_imports_one_by_one(fuzzer: Fuzzer, stub, metrics_port: int) -> str:
    """Every crafted import once more, one at a time, with the live-session count around each;
    a wrongly accepted one is fed a message, and the server must still serve a new stream.
    Returns what broke ('' when the server still serves)."""
    ledger = fuzzer.ledger
    for variant in CRAFTED:
        kind = f"ImportSession: crafted {variant}"
        before = await asyncio.to_thread(sessions_active, metrics_port)
        session_id, accepted = await fuzzer.import_crafted(variant)
        after = await asyncio.to_thread(sessions_active, metrics_port)
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


async def fuzz_run(proc: ServeProcess, metrics_port: int, model) -> Report:
    rng = random.Random(20260601)
    ledger = Ledger()
    problems: list[str] = []
    pid = proc.process.pid
    rss = {"at start": rss_mb(pid)}
    clock = time.monotonic()
    phases: dict[str, float] = {}

    def phase(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        phases[name] = now - clock
        clock = now

    channel = grpc.aio.insecure_channel(proc.target)
    stub = pb_grpc.InferenceServiceStub(channel)
    targets, target_inputs, target_outputs = await setup_targets(stub, rng)
    fuzzer = Fuzzer(proc.target, rng, ledger, dict(targets))
    fuzzer.export = (
        await stub.ExportSession(
            pb.ExportSessionRequest(session_id=next(iter(targets))), timeout=TIMEOUT_S
        )
    ).state

    # Held open for the whole run: streams that never send, one that sent once and idles,
    # TCP connections that stop halfway through the HTTP/2 preface, and a client that never reads.
    idle_streams = [stub.StreamSteps(timeout=600) for _ in range(6)]
    idle_with_session = Stream(stub)
    await idle_with_session.send(pb.StreamStepsRequest(inputs=[0.0] * INPUT_SIZE))
    half_open = []
    for _ in range(4):
        _, writer = await asyncio.open_connection(fuzzer.host, int(fuzzer.port))
        writer.write(b"PRI * HTTP/2.0\r\n")
        half_open.append(writer)
    reader_call, reader_task, written, reader_inputs, reader_messages = await slow_reader(stub, rng)

    # Twenty well-behaved sessions, half with client-chosen ids, streaming the whole time.
    valid = [ValidSession(i) for i in range(VALID_SESSIONS)]
    for session in valid[::2]:
        session.session_id = f"valid-{session.index}-{rng.getrandbits(40):x}"
        await stub.CreateSession(
            pb.CreateSessionRequest(session_id=session.session_id), timeout=TIMEOUT_S
        )
    stop = asyncio.Event()
    valid_channel = grpc.aio.insecure_channel(proc.target)
    valid_stub = pb_grpc.InferenceServiceStub(valid_channel)
    valid_tasks = [
        asyncio.create_task(run_valid(s, valid_stub, random.Random(s.index), stop, ledger))
        for s in valid
    ]
    rss["before the fuzz"] = rss_mb(pid)
    phase("setup")

    # The near-limit messages, once each, early (so the final RSS shows whether they stuck).
    near = MAX_MESSAGE_BYTES - 11
    near_values = (near // 4) // INPUT_SIZE * INPUT_SIZE
    await fuzzer.send_raw_stream(
        "StreamSteps: message near the size limit", packed_inputs(near_values), BAD
    )
    await fuzzer.send_raw_stream(
        "StreamSteps: message over the size limit",
        packed_inputs(MAX_MESSAGE_BYTES // 4 + 6),
        TOO_LARGE,
    )
    rss["after the near-limit messages"] = rss_mb(pid)

    started = time.monotonic()

    async def fuzz_worker() -> None:
        while sum(ledger.bad.values()) < BAD_MESSAGES:
            case = fuzzer.pick()
            try:
                await case()
            except Exception as exc:  # a client-side surprise is a finding too
                ledger.fail(case.__name__, f"{type(exc).__name__}: {exc}")

    workers = [asyncio.create_task(fuzz_worker()) for _ in range(16)]
    halfway_reported = False
    while not all(w.done() for w in workers):
        await asyncio.sleep(0.5)
        if not halfway_reported and sum(ledger.bad.values()) >= BAD_MESSAGES // 2:
            rss["halfway"] = rss_mb(pid)
            halfway_reported = True
    await asyncio.gather(*workers)
    broken = await crafted_imports_one_by_one(fuzzer, stub, metrics_port)
    before = await asyncio.to_thread(sessions_active, metrics_port)
    request = pb.StreamStepsRequest(inputs=[0.0] * INPUT_SIZE, start_step=3)
    await fuzzer.first_message("StreamSteps: gap on a new session", request)
    after = await asyncio.to_thread(sessions_active, metrics_port)
    if after != before:
        ledger.fail(
            "StreamSteps: gap on a new session",
            f"the refused first message created a session: {before} -> {after} live",
        )
    seconds = time.monotonic() - started
    phase("fuzz")
    stop.set()
    if broken:  # streams hang now: stop waiting for them, skip what needs them
        problems.append(broken)
        for task in [*valid_tasks, reader_task]:
            task.cancel()
        await asyncio.gather(*valid_tasks, reader_task, return_exceptions=True)
        for call in [reader_call, *idle_streams, idle_with_session.call]:
            call.cancel()
        for writer in half_open:
            writer.close()
        live = await asyncio.to_thread(sessions_active, metrics_port)
        rss["after the fuzz"] = rss_mb(pid)
        await fuzzer.close()
        await valid_channel.close()
        await channel.close()
        slow = {"messages": reader_messages, "written before any read": written[0]}
        expected_live = TARGETS + VALID_SESSIONS + 1 + 1
        return Report(
            ledger, valid, rss, expected_live, live, slow, seconds, problems, phases, broken=True
        )
    await asyncio.gather(*valid_tasks)

    # The client that never read: it kept writing as far as flow control let it; now read all.
    written_unread = written[0]
    responses = []
    for _ in range(reader_messages):
        response = await reader_call.read()
        if response is grpc.aio.EOF:
            break
        responses.append(response)
    await reader_task
    await reader_call.done_writing()
    if (
        await reader_call.read() is not grpc.aio.EOF
        or await reader_call.code() != grpc.StatusCode.OK
    ):
        problems.append(f"the unread stream ended {await reader_call.code()}")
    reader_outputs = np.concatenate([rows(r.outputs) for r in responses]) if responses else None
    if reader_outputs is None or len(reader_outputs) != len(reader_inputs):
        problems.append(f"the unread stream got {len(responses)} of {reader_messages} responses")
    else:
        difference = np.abs(reader_outputs - offline(model, reader_inputs)).max()
        if difference > 1e-5:
            problems.append(f"the unread stream's outputs differ from offline by {difference}")
    slow = {"messages": reader_messages, "written before any read": written_unread}
    phase("slow reader read-back")

    # The streams held open must still be open; then let them go.
    for call in [*idle_streams, idle_with_session.call]:
        if call.done():
            problems.append(f"an idle stream was ended by the server: {await call.code()}")
        call.cancel()
    for writer in half_open:
        writer.close()

    # No target changed: same next step, same state (continue and resend, compare).
    for session_id, next_step in targets.items():
        got = (await stub.GetSession(pb.GetSessionRequest(session_id=session_id))).session
        if got.next_step != next_step:
            problems.append(f"target {session_id}: next_step {got.next_step}, expected {next_step}")
            continue
        more = np.asarray(random_inputs(rng, 10), dtype=np.float32).reshape(-1, INPUT_SIZE)
        all_inputs = np.concatenate([target_inputs[session_id], more])
        resend_from = next_step - 10
        request = pb.StreamStepsRequest(
            session_id=session_id, inputs=all_inputs[resend_from:].ravel().tolist()
        )
        request.start_step = resend_from
        responses = [r async for r in stub.StreamSteps(iter([request]), timeout=TIMEOUT_S)]
        got_rows = rows(responses[0].outputs)
        if not np.array_equal(got_rows[:10], target_outputs[session_id][resend_from:]):
            problems.append(f"target {session_id}: its replay buffer changed")
        difference = np.abs(got_rows[10:] - offline(model, all_inputs)[next_step:]).max()
        if difference > 1e-5:
            problems.append(f"target {session_id}: its state changed (outputs off by {difference})")

    # Healthy, serving, and holding exactly the sessions it should.
    health = health_pb2_grpc.HealthStub(channel)
    status = (await health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)).status
    if status != health_pb2.HealthCheckResponse.SERVING:
        problems.append(f"health is {status} after the fuzz")
    fresh = np.asarray(random_inputs(rng, 20), dtype=np.float32).reshape(-1, INPUT_SIZE)
    predicted = await stub.Predict(
        pb.PredictRequest(inputs=fresh.ravel().tolist(), num_steps=20), timeout=TIMEOUT_S
    )
    if np.abs(rows(predicted.outputs) - offline(model, fresh)).max() > 1e-5:
        problems.append("Predict after the fuzz differs from offline")
    phase("target checks")
    expected_live = TARGETS + VALID_SESSIONS + 1 + 1  # + the unread stream's, the idle one's
    live = await asyncio.to_thread(sessions_active, metrics_port)
    rss["after the fuzz"] = rss_mb(pid)
    await fuzzer.close()
    await valid_channel.close()
    await channel.close()
    phase("final checks")
    return Report(ledger, valid, rss, expected_live, live, slow, seconds, problems, phases)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_fuzzing_the_api_refuses_every_bad_message_and_serves_the_good(bundled_model):
    began = time.monotonic()
    metrics_port = free_port()
    with ServeProcess(
        "--replay-steps", str(REPLAY_STEPS), "--metrics-port", str(metrics_port), *SIZE_FLAG
    ) as proc:
        started = time.monotonic()
        report = asyncio.run(fuzz_run(proc, metrics_port, bundled_model))
        report.phases["server start"] = started - began
        report.phases["whole run"] = time.monotonic() - started
        alive = proc.process.poll() is None
        try:
            exit_code, log = proc.finish(timeout=10 if report.broken else 30)
        except subprocess.TimeoutExpired:
            exit_code, log = "no exit after SIGTERM", "".join(proc.log)
        report.phases["shutdown"] = time.monotonic() - started - report.phases["whole run"]
    ledger = report.ledger
    checks_began = time.monotonic()

    # The well-behaved sessions, segment by segment (a reset starts a new one).
    valid_steps = 0
    for session in report.valid:
        inputs, outputs = np.asarray(session.inputs), np.asarray(session.outputs)
        bounds = [*session.resets, session.next_step]
        for start, end in itertools.pairwise(bounds):
            if end > start:
                expected = offline(bundled_model, inputs[start:end])
                difference = np.abs(outputs[start:end] - expected).max()
                if difference > 1e-5:
                    ledger.fail(
                        "valid session",
                        f"session {session.index} steps {start}-{end}: off by {difference}",
                    )
        valid_steps += session.next_step
    report.phases["offline checks"] = time.monotonic() - checks_began

    total = sum(ledger.messages.values())
    bad = sum(ledger.bad.values())
    unexpected = Counter(
        re.findall(r"Unexpected \[(\w+)\] raised by servicer method \[(\S+)\]", log)
    )
    print(
        f"\nfuzz: {total} hostile messages ({bad} that must be refused) in {report.seconds:.1f} s; "
        f"valid: {sum(s.messages for s in report.valid)} messages, {valid_steps} timesteps, "
        f"{sum(s.refused for s in report.valid)} refused on purpose, "
        f"{sum(s.reconnects for s in report.valid)} reconnects over {len(report.valid)} sessions"
    )
    print("by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(ledger.messages.items())))
    print("server VmRSS (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in report.rss_mb.items()))
    print(f"slow reader: {report.slow_reader}")
    print("phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report.phases.items()))
    print(f"live sessions: {report.sessions_active} (expected {report.sessions_expected})")
    print(f"servicer exceptions logged by grpc: {sum(unexpected.values())}")
    for (exception, method), count in unexpected.most_common():
        print(f"    {count} x {exception} in {method}")
    print("other server log lines at WARNING or above:")
    for line in log.splitlines():
        if re.search(r" (WARNING|ERROR|CRITICAL) ", line) and "Unexpected [" not in line:
            print("    " + line[:200])

    assert bad >= 10_000, ledger.messages
    problems = list(report.problems)
    if not alive:
        problems.append("the server process died:\n" + log[-5000:])
    if exit_code != 0:
        problems.append(f"SIGTERM then exit code {exit_code!r}, expected 0")
    growth = report.rss_mb["after the fuzz"] - report.rss_mb["before the fuzz"]
    if growth >= 200:
        problems.append(f"server memory grew by {growth:.0f} MB")
    if report.sessions_active != report.sessions_expected:
        problems.append(
            f"{report.sessions_active} live sessions, expected {report.sessions_expected}: "
            "refused messages left sessions behind"
        )
    failures = ledger.summary()
    assert not failures and not problems, "\n".join([*problems, failures])
