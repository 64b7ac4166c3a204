"""One fuzz campaign against a real lstm-serve subprocess: more than 10,000 hostile messages
while 20 well-behaved sessions stream through it the whole time, with idle streams, half-open
TCP connections and a client that never reads held open throughout. The campaign records what
happened in a Report; the test modules of this package each check one part of it."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lstm_stream.v1 import inference_pb2 as pb
from lstm_stream.v1 import inference_pb2_grpc as pb_grpc
from tests.factories import ServeProcess, offline
from tests.outcomes import outcome_and_details
from tests.server.fuzz.common import (
    INPUT_SIZE,
    MAX_CHUNK_STEPS,
    REPLAY_STEPS,
    TIMEOUT_S,
    Context,
    Ledger,
    Stream,
    random_inputs,
    rows,
    rss_mb,
    sessions_active,
)
from tests.server.fuzz.crafted import crafted_imports_one_by_one
from tests.server.fuzz.stream_cases import (
    GAP_ON_NEW,
    STREAM_CASES,
    check_first,
    near_and_over_the_size_limit,
)
from tests.server.fuzz.tcp import TcpTally, tcp_garbage
from tests.server.fuzz.unary_cases import UNARY_CASES
from tests.server.fuzz.valid import ValidSession, run_valid
from tests.step_rule import Window

TARGETS = 12  # sessions the hostile traffic aims at; none of it may change them
TARGET_STEPS = 40
VALID_SESSIONS = 20
BAD_MESSAGES = 10_500  # at least 10,000, with a margin
WORKERS = 16
IDLE_STREAMS = 6
HALF_OPEN = 4
SLOW_READER_MESSAGES = 1000


@dataclass
class SlowReader:
    messages: int = SLOW_READER_MESSAGES
    responses: int = 0
    end: str = ""  # the stream's status once the client finished reading
    difference: float = float("inf")  # largest |output - offline|


@dataclass
class TargetCheck:
    next_step: int = -1  # as GetSession tells it after the fuzz
    error: str = ""  # what GetSession or the resend failed with
    replay_unchanged: bool = False
    difference: float = float("inf")  # of outputs continued after the fuzz, from offline


@dataclass(repr=False)  # holds whole histories: a repr would take seconds
class Report:
    ledger: Ledger = field(default_factory=Ledger)
    valid: list[ValidSession] = field(default_factory=list)
    tcp: TcpTally = field(default_factory=TcpTally)
    slow_reader: SlowReader = field(default_factory=SlowReader)
    targets: dict[str, TargetCheck] = field(default_factory=dict)
    idle_streams_ended: list[str] = field(default_factory=list)  # status codes
    rss_mb: dict[str, float] = field(default_factory=dict)
    sessions_expected: int = TARGETS + VALID_SESSIONS + 1 + 1  # + the slow reader's, idle one's
    sessions_active: int = -1
    health: str = ""
    predict_difference: float = float("inf")
    client_errors: list[str] = field(default_factory=list)  # surprises in the fuzz's own code
    broken: str = ""  # the server stopped serving streams mid-run: what the rest could not check
    alive: bool = True  # the server process was running when the campaign ended
    exit_code: int | str | None = None
    log: str = ""


async def setup_targets(stub, rng: random.Random) -> tuple[dict, dict, dict]:
    """Sessions with a known history that the hostile traffic aims at (and must not change);
    (windows, inputs, outputs) by session id."""
    windows, inputs, outputs = {}, {}, {}
    for i in range(TARGETS):
        session_id = f"target-{i:02d}-{rng.getrandbits(40):x}"
        await stub.CreateSession(pb.CreateSessionRequest(session_id=session_id), timeout=TIMEOUT_S)
        steps = np.asarray(random_inputs(rng, TARGET_STEPS), dtype=np.float32)
        request = pb.StreamStepsRequest(session_id=session_id, inputs=steps.tolist())
        responses = [r async for r in stub.StreamSteps(iter([request]), timeout=TIMEOUT_S)]
        windows[session_id] = Window.full(TARGET_STEPS, REPLAY_STEPS)
        inputs[session_id] = steps.reshape(-1, INPUT_SIZE)
        outputs[session_id] = rows(responses[0].outputs)
    return windows, inputs, outputs


def start_slow_reader(stub, rng: random.Random):
    """A client that writes many full-size messages and reads nothing until told to; (call,
    writing task, its inputs)."""
    generator = np.random.default_rng(rng.getrandbits(32))
    total = SLOW_READER_MESSAGES * MAX_CHUNK_STEPS
    inputs = (generator.standard_normal((total, INPUT_SIZE)) * 3).astype(np.float32)
    call = stub.StreamSteps(timeout=600)

    async def write_all() -> None:
        for chunk in np.split(inputs, SLOW_READER_MESSAGES):
            await call.write(pb.StreamStepsRequest(inputs=chunk.ravel().tolist()))

    return call, asyncio.create_task(write_all()), inputs


async def read_slow_reader(call, writer: asyncio.Task, inputs, model) -> SlowReader:
    """Now read all it was sent, and how the stream ends."""
    result, outputs = SlowReader(), []
    try:
        for _ in range(SLOW_READER_MESSAGES):
            response = await call.read()
            if response is grpc.aio.EOF:
                break
            outputs.append(rows(response.outputs))
        await writer
        await call.done_writing()
        extra = await call.read()
        result.end = (await call.code()).name + ("" if extra is grpc.aio.EOF else " and more")
    except grpc.RpcError as err:
        result.end = str(outcome_and_details(err))
    result.responses = len(outputs)
    if outputs and len(np.concatenate(outputs)) == len(inputs):
        result.difference = float(np.abs(np.concatenate(outputs) - offline(model, inputs)).max())
    return result


async def check_targets(stub, rng, windows, inputs, outputs, model) -> dict[str, TargetCheck]:
    """Each target's next step, replay buffer and state: resend its last 10 steps and 10 more."""
    checks = {}
    for session_id, window in windows.items():
        checks[session_id] = check = TargetCheck()
        try:
            request = pb.GetSessionRequest(session_id=session_id)
            got = await stub.GetSession(request, timeout=TIMEOUT_S)
            check.next_step = got.session.next_step
            if check.next_step != window.next_step:
                continue
            more = np.asarray(random_inputs(rng, 10), dtype=np.float32).reshape(-1, INPUT_SIZE)
            all_inputs = np.concatenate([inputs[session_id], more])
            resend_from = window.next_step - 10
            request = pb.StreamStepsRequest(
                session_id=session_id, inputs=all_inputs[resend_from:].ravel().tolist()
            )
            request.start_step = resend_from
            responses = [r async for r in stub.StreamSteps(iter([request]), timeout=TIMEOUT_S)]
        except grpc.RpcError as err:
            check.error = str(outcome_and_details(err))
            continue
        got_rows = rows(responses[0].outputs)
        check.replay_unchanged = np.array_equal(got_rows[:10], outputs[session_id][resend_from:])
        expected = offline(model, all_inputs)[window.next_step :]
        check.difference = float(np.abs(got_rows[10:] - expected).max())
    return checks


async def fuzz(ctx: Context, tally: TcpTally, report: Report, pid: int) -> None:
    """The hostile traffic: WORKERS at a time until BAD_MESSAGES must have been refused."""

    async def garbage_on_the_tcp_port(c: Context) -> None:
        await tcp_garbage(c, tally)

    cases = [*UNARY_CASES, *STREAM_CASES, (garbage_on_the_tcp_port, 1)]
    functions, weights = [c for c, _ in cases], [w for _, w in cases]

    async def worker() -> None:
        while sum(ctx.ledger.bad.values()) < BAD_MESSAGES:
            case = ctx.rng.choices(functions, weights)[0]
            try:
                await case(ctx)
            except Exception as exc:  # a surprise in the fuzz's own code, or a hung call
                report.client_errors.append(f"{case.__name__}: {type(exc).__name__}: {exc}")
            if "halfway" not in report.rss_mb and sum(ctx.ledger.bad.values()) >= BAD_MESSAGES // 2:
                report.rss_mb["halfway"] = rss_mb(pid)

    await asyncio.gather(*(worker() for _ in range(WORKERS)))


async def check_serving(report: Report, channel, rng: random.Random, model) -> None:
    """Health, and a Predict held to the offline model."""
    fresh = np.asarray(random_inputs(rng, 20), dtype=np.float32).reshape(-1, INPUT_SIZE)
    request = pb.PredictRequest(inputs=fresh.ravel().tolist(), num_steps=20)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        status = (await health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)).status
        report.health = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        stub = pb_grpc.InferenceServiceStub(channel)
        predicted = await stub.Predict(request, timeout=TIMEOUT_S)
    except grpc.RpcError as err:
        report.health += f" then {outcome_and_details(err)}"
        return
    report.predict_difference = float(np.abs(rows(predicted.outputs) - offline(model, fresh)).max())


async def gap_on_a_new_session_creates_nothing(ctx: Context, live_sessions) -> None:
    before = await live_sessions()
    request = pb.StreamStepsRequest(inputs=[0.0] * INPUT_SIZE, start_step=3)
    await check_first(ctx, GAP_ON_NEW, request)
    after = await live_sessions()
    if after != before:
        ctx.ledger.fail(
            GAP_ON_NEW, f"the refused first message created a session: {before} -> {after}"
        )


@dataclass
class Held:
    """Held open for the whole run: streams that never send, one that sent once and idles, TCP
    connections that stop halfway through the HTTP/2 preface, and a client that never reads."""

    streams: list  # calls
    half_open: list  # asyncio StreamWriters
    reader: tuple  # (call, writing task, inputs) of start_slow_reader


async def hold_open(stub, port: int, rng: random.Random) -> Held:
    idle_with_session = Stream(stub)
    await idle_with_session.send(pb.StreamStepsRequest(inputs=[0.0] * INPUT_SIZE))
    streams = [stub.StreamSteps(timeout=600) for _ in range(IDLE_STREAMS)]
    half_open = []
    for _ in range(HALF_OPEN):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"PRI * HTTP/2.0\r\n")
        half_open.append(writer)
    return Held([*streams, idle_with_session.call], half_open, start_slow_reader(stub, rng))


async def let_go(held: Held, report: Report) -> None:
    """The held streams must still be open; then close everything."""
    for call in held.streams:
        if call.done():
            report.idle_streams_ended.append((await call.code()).name)
        call.cancel()
    for writer in held.half_open:
        writer.close()


async def start_valid(stub, channel, rng: random.Random, report: Report, stop: asyncio.Event):
    """Twenty well-behaved sessions, half with client-chosen ids; their tasks."""
    report.valid = [ValidSession(i) for i in range(VALID_SESSIONS)]
    for session in report.valid[::2]:
        session.session_id = f"valid-{session.index}-{rng.getrandbits(40):x}"
        request = pb.CreateSessionRequest(session_id=session.session_id)
        await stub.CreateSession(request, timeout=TIMEOUT_S)
    valid_stub = pb_grpc.InferenceServiceStub(channel)
    return [
        asyncio.create_task(run_valid(s, valid_stub, random.Random(s.index), stop, report.ledger))
        for s in report.valid
    ]


async def stop_valid_and_read_back(tasks: list, held: Held, report: Report, model) -> None:
    if report.broken:  # streams hang now: stop waiting for them
        for task in [*tasks, held.reader[1]]:
            task.cancel()
        await asyncio.gather(*tasks, held.reader[1], return_exceptions=True)
        held.reader[0].cancel()
        return
    for failed in await asyncio.gather(*tasks, return_exceptions=True):
        if failed is not None:
            report.client_errors.append(f"a valid session: {type(failed).__name__}: {failed}")
    report.slow_reader = await read_slow_reader(*held.reader, model)


async def run(proc: ServeProcess, metrics_port: int, model) -> Report:
    report, rng, pid = Report(), random.Random(20260601), proc.process.pid
    report.rss_mb["at start"] = rss_mb(pid)
    channel, valid_channel, fuzz_channel = (grpc.aio.insecure_channel(proc.target) for _ in "abc")
    stub = pb_grpc.InferenceServiceStub(channel)
    windows, target_inputs, target_outputs = await setup_targets(stub, rng)
    ctx = Context(fuzz_channel, proc.port, rng, report.ledger, windows)
    export = pb.ExportSessionRequest(session_id=next(iter(windows)))
    ctx.export = (await stub.ExportSession(export, timeout=TIMEOUT_S)).state
    held = await hold_open(stub, proc.port, rng)
    stop = asyncio.Event()
    valid_tasks = await start_valid(stub, valid_channel, rng, report, stop)
    report.rss_mb["before the fuzz"] = rss_mb(pid)

    # The near-limit messages, once each, early (so the final RSS shows whether they stuck).
    await near_and_over_the_size_limit(ctx)
    report.rss_mb["after the near-limit messages"] = rss_mb(pid)
    await fuzz(ctx, report.tcp, report, pid)

    async def live() -> int:
        return await asyncio.to_thread(sessions_active, metrics_port)

    report.broken = await crafted_imports_one_by_one(stub, ctx.export, rng, ctx.ledger, live)
    await gap_on_a_new_session_creates_nothing(ctx, live)
    stop.set()
    await stop_valid_and_read_back(valid_tasks, held, report, model)
    await let_go(held, report)
    if not report.broken:
        report.targets = await check_targets(
            stub, rng, windows, target_inputs, target_outputs, model
        )
        await check_serving(report, channel, rng, model)
    report.sessions_active = await live()
    report.rss_mb["after the fuzz"] = rss_mb(pid)
    for each in (fuzz_channel, valid_channel, channel):
        await each.close()
    return report
