"""What the fuzz modules share: the server's settings, the ledger of checked messages, call
helpers, and random ids and inputs."""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import grpc
import numpy as np

from lstm_stream.v1 import inference_pb2 as pb
from lstm_stream.v1 import inference_pb2_grpc as pb_grpc
from tests.factories import metric_value
from tests.outcomes import OK, Outcome, outcome_and_details
from tests.step_rule import Limits, Window

INPUT_SIZE, OUTPUT_SIZE = 6, 4  # the bundled model
MAX_CHUNK_STEPS = 512
REPLAY_STEPS = 16
LIMITS = Limits(INPUT_SIZE, MAX_CHUNK_STEPS, REPLAY_STEPS)
MAX_MESSAGE_BYTES = 64 * 2**20
METHOD = "/lstm_stream.v1.InferenceService/"
ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~-"
BAD_ID_CHARS_ASCII = " !\"#$%&'()*+,/:;<=>?@[\\]^`{|}"  # may travel in metadata
BAD_ID_CHARS = BAD_ID_CHARS_ASCII + "é漢🙂\x00\n\t"
TIMEOUT_S = 30.0


def slug(kind: str) -> str:
    """A kind of message as a test id."""
    return "".join(c if c.isalnum() else "-" for c in kind.lower()).strip("-")


@dataclass
class Ledger:
    """Every hostile message checked, by kind; the failures found, by kind."""

    messages: Counter = field(default_factory=Counter)
    bad: Counter = field(default_factory=Counter)  # messages that must be refused
    failures: defaultdict = field(default_factory=lambda: defaultdict(list))

    def check(
        self,
        kind: str,
        expected: Outcome | tuple[Outcome, ...],
        got: Outcome,
        details: str = "",
    ) -> bool:
        allowed = expected if isinstance(expected[0], tuple) else (expected,)
        self.messages[kind] += 1
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

    def report(self, kind: str) -> str:
        """What went wrong with one kind of message ('' when nothing did)."""
        failures = self.failures.get(kind, [])
        if not failures:
            return ""
        shown = "\n".join(f"    {f[:300]}" for f in failures[:5])
        return f"{kind}: {len(failures)} failures over {self.messages[kind]} messages:\n{shown}"


async def unary(call) -> tuple[Outcome, object, str]:
    """(outcome, response or None, error text)."""
    try:
        return OK, await call, ""
    except grpc.RpcError as err:
        outcome, details = outcome_and_details(err)
        return outcome, None, details


async def one_stream(call) -> tuple[Outcome, list, str]:
    """Drive a stream whose requests were given up front; (outcome, responses, details)."""
    responses = []
    try:
        async for response in call:
            responses.append(response)
    except grpc.RpcError as err:
        outcome, details = outcome_and_details(err)
        return outcome, responses, details
    return OK, responses, ""


class Stream:
    """An interactive asyncio stream: write one message, read its response."""

    def __init__(self, stub, metadata_id: str | None = None) -> None:
        self.metadata_id = metadata_id
        metadata = (("x-session-id", metadata_id),) if metadata_id else None
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


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def sessions_active(metrics_port: int) -> int:
    return int(metric_value(metrics_port, "lstm_sessions_active"))


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
    """A wrong width, a NaN or Inf, or more than max_chunk_steps timesteps."""
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


@dataclass
class Context:
    """What every fuzz case works with."""

    channel: grpc.aio.Channel
    port: int  # the server's, on 127.0.0.1
    rng: random.Random
    ledger: Ledger
    targets: dict[str, Window]  # sessions the hostile traffic must leave alone
    export: bytes = b""  # a real exported session, for crafted imports
    gaps_on_new: int = 0  # streams sent so far whose first message has a gap
    locks: dict[str, asyncio.Lock] = field(init=False)  # one attaching case per target at once

    def __post_init__(self) -> None:
        self.stub = pb_grpc.InferenceServiceStub(self.channel)
        self.locks = {session_id: asyncio.Lock() for session_id in self.targets}

    def target(self) -> str:
        """A target session's id, at random."""
        return self.rng.choice(list(self.targets))


def assert_kind_checked(ledger: Ledger, kind: str) -> None:
    """The campaign sent messages of this kind, and each got what the contract says."""
    assert ledger.messages[kind] > 0, f"the campaign sent no {kind!r} message"
    assert not ledger.failures.get(kind), ledger.report(kind)
