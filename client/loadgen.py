"""A closed-loop load generator for StreamSteps, usable as a library.

Each session is one bidi `StreamSteps` stream: write a message of `chunk_steps` timesteps, read
its answer, repeat until the deadline. Sessions share a few channels (one per
`SESSIONS_PER_CHANNEL`), and each builds its request once up front, so the generator spends its
CPU on gRPC and not on making random numbers: on a small machine it shares the cores with the
server it measures. Before each write only its `answered_step` is set (the timesteps answered so
far), as the SDK tells a durable server.

    result = asyncio.run(run_load("localhost:50051", sessions=64, chunk_steps=32, duration_s=3))
    print(format_result(result))
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from lstm_stream.client.options import ClientOptions
from lstm_stream.v1 import inference_pb2 as pb
from lstm_stream.v1 import inference_pb2_grpc as pb_grpc

SESSIONS_PER_CHANNEL = 64
CLOSE_TIMEOUT_S = 10.0
STALL_MARGIN_S = 60.0  # how far past its deadline a run may go before it is cancelled


@dataclass(frozen=True)
class LoadResult:
    """What one run measured, over its measurement window (after the warm-up)."""

    sessions: int
    chunk_steps: int
    duration_s: float
    messages: int
    timesteps: int
    timesteps_per_s: float
    latency_p50_s: float
    latency_p95_s: float
    latency_p99_s: float
    errors: int
    error_sample: str = ""
    sessions_per_message: int = 0  # StreamBatches runs (batch_loadgen.py); 0: StreamSteps
    packed: bool = False  # inputs and outputs as packed bytes (DESIGN 1.6)


@dataclass
class _Window:
    """Messages that complete inside [start, end] are counted, and so is a session's first
    completion after start even when it comes later (a message slower than the window)."""

    start: float
    end: float


@dataclass(eq=False)
class _Session:
    """One stream fed in a closed loop with the same prebuilt request."""

    stub: pb_grpc.InferenceServiceStub
    request: pb.StreamStepsRequest
    expected_outputs: int  # output values per answer: chunk_steps * output_size
    metadata: tuple[tuple[str, str], ...] = ()  # a bearer token on plaintext channels
    model: str = ""  # where the first message creates the session
    model_version: int = 0
    tell_answered: bool = True  # each message says answered_step, as the SDK does
    answered: int = 0  # timesteps whose outputs this session has received
    latencies: list[float] = field(default_factory=list)
    timesteps: int = 0
    last_counted: float = 0.0
    error: str = ""
    call: grpc.aio.StreamStreamCall | None = None

    async def _exchange(self, request: pb.StreamStepsRequest) -> pb.StreamStepsResponse:
        assert self.call is not None
        await self.call.write(request)
        response = await self.call.read()
        if response is grpc.aio.EOF:
            raise RuntimeError(
                f"stream ended: {await self.call.code()} {await self.call.details()}"
            )
        return response

    async def open(self) -> None:
        """Open the stream; its first message creates the session (and is not counted)."""
        self.call = self.stub.StreamSteps(metadata=self.metadata)
        first = pb.StreamStepsRequest(model=self.model, model_version=self.model_version)
        first.MergeFrom(self.request)
        try:
            self.answered += (await self._exchange(first)).num_steps
        except (grpc.RpcError, RuntimeError) as exc:
            self.error = _describe(exc)

    async def run(self, window: _Window) -> None:
        perf_counter, request, latencies = time.perf_counter, self.request, self.latencies
        tell = self.tell_answered
        try:
            now = perf_counter()
            while now < window.end or not latencies:
                sent = now
                if tell:  # the write serialises it: the next one may set it again
                    request.answered_step = self.answered
                response = await self._exchange(request)
                now = perf_counter()
                self.answered += response.num_steps
                got = len(response.outputs) or len(response.packed_outputs) // 4
                if got != self.expected_outputs:
                    raise RuntimeError(f"expected {self.expected_outputs} output values, got {got}")
                if window.start <= now and (now <= window.end or not latencies):
                    latencies.append(now - sent)
                    self.timesteps += response.num_steps
                    self.last_counted = now
        except (grpc.RpcError, RuntimeError) as exc:
            self.error = _describe(exc)

    async def close(self) -> None:
        """End the session with an empty `end_session` message; cancel the stream if that fails."""
        if self.call is None:
            return
        try:
            await asyncio.wait_for(self._end(), CLOSE_TIMEOUT_S)
        except (grpc.RpcError, RuntimeError, TimeoutError) as exc:
            self.error = self.error or f"closing: {_describe(exc)}"
            self.call.cancel()

    async def _end(self) -> None:
        await self._exchange(pb.StreamStepsRequest(end_session=True))
        await self.call.done_writing()
        await self.call.code()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


def _channels(client: ClientOptions, sessions: int) -> list[grpc.aio.Channel]:
    """A connection per SESSIONS_PER_CHANNEL sessions (a local subchannel pool keeps them
    apart), with the client's TLS and token but none of its retries or keepalive pings."""
    count = max(1, math.ceil(sessions / SESSIONS_PER_CHANNEL))
    options: list[tuple[str, object]] = [("grpc.use_local_subchannel_pool", 1)]
    if not client.secure:
        return [grpc.aio.insecure_channel(client.target, options=options) for _ in range(count)]
    if client.tls_server_name:
        options.append(("grpc.ssl_target_name_override", client.tls_server_name))
    credentials = client.channel_credentials()
    return [grpc.aio.secure_channel(client.target, credentials, options) for _ in range(count)]


def _requests(
    sessions: int, values: int, seed: int, packed: bool = False
) -> list[pb.StreamStepsRequest]:
    """One request per session, random standard-normal inputs, built before the clock starts."""
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((sessions, values), dtype=np.float32)
    if packed:
        return [pb.StreamStepsRequest(packed_inputs=row.tobytes()) for row in data]
    return [pb.StreamStepsRequest(inputs=row.tolist()) for row in data]


def _percentile(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0


def _summarise(
    sessions: list[_Session], chunk_steps: int, window: _Window, lost: int, packed: bool
) -> LoadResult:
    latencies = np.concatenate([np.asarray(s.latencies) for s in sessions])
    timesteps = sum(s.timesteps for s in sessions)
    errors = [s.error for s in sessions if s.error]
    end = max([window.end, *(s.last_counted for s in sessions)])
    duration_s = end - window.start  # longer than asked only when a message outlasted it
    return LoadResult(
        sessions=len(sessions),
        chunk_steps=chunk_steps,
        duration_s=duration_s,
        messages=len(latencies),
        timesteps=timesteps,
        timesteps_per_s=timesteps / duration_s,
        latency_p50_s=_percentile(latencies, 50),
        latency_p95_s=_percentile(latencies, 95),
        latency_p99_s=_percentile(latencies, 99),
        errors=len(errors) + lost,
        error_sample=errors[0] if errors else ("run stalled past its deadline" if lost else ""),
        packed=packed,
    )


async def run_load(
    target: str | ClientOptions,
    sessions: int,
    chunk_steps: int,
    duration_s: float,
    warmup_s: float = 0.5,
    seed: int = 0,
    packed: bool = False,
    model: str = "",
    model_version: int = 0,
    tell_answered: bool = True,
) -> LoadResult:
    """Drive `sessions` concurrent closed-loop streams of `chunk_steps`-step messages, to a
    target address or with full ClientOptions (TLS, token), on a model version ('' and 0: the
    default model's newest ready version). With `tell_answered`, each message says how many
    timesteps' outputs its session has received (`answered_step`), as the SDK does: a durable
    server's records then keep no outputs the client already has.

    All streams are opened (and their sessions created) first; then they run for
    `warmup_s + duration_s`, and only messages answered in the last `duration_s` count, plus
    each session's first answer when none came in time (the duration then stretches to it).
    """
    client = target if isinstance(target, ClientOptions) else ClientOptions(target=target)
    metadata = client.metadata()
    channels = _channels(client, sessions)
    try:
        info = await pb_grpc.InferenceServiceStub(channels[0]).GetModelInfo(
            pb.GetModelInfoRequest(model=model, model_version=model_version),
            metadata=metadata,
            timeout=client.deadline_s,
        )
        requests = _requests(sessions, chunk_steps * info.input_size, seed, packed)
        streams = [
            _Session(
                pb_grpc.InferenceServiceStub(channels[i % len(channels)]),
                request,
                chunk_steps * info.output_size,
                metadata,
                model,
                model_version,
                tell_answered,
            )
            for i, request in enumerate(requests)
        ]
        await asyncio.gather(*(s.open() for s in streams))
        start = time.perf_counter() + warmup_s
        window = _Window(start, start + duration_s)
        running = [s for s in streams if not s.error]
        lost = 0
        try:
            await asyncio.wait_for(
                asyncio.gather(*(s.run(window) for s in running)),
                warmup_s + duration_s + STALL_MARGIN_S,
            )
        except TimeoutError:
            lost = 1
        await asyncio.gather(*(s.close() for s in streams))
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    return _summarise(streams, chunk_steps, window, lost, packed)


def format_result(r: LoadResult) -> str:
    """One line: load, throughput, latency quantiles, errors."""
    line = (
        f"{r.sessions} sessions x {r.chunk_steps} steps: {r.timesteps_per_s:,.0f} timesteps/s "
        f"({r.messages / r.duration_s:,.0f} msg/s), latency p50 {r.latency_p50_s * 1e3:.2f} ms "
        f"p95 {r.latency_p95_s * 1e3:.2f} ms p99 {r.latency_p99_s * 1e3:.2f} ms, "
        f"{r.errors} errors"
    )
    return f"{line} ({r.error_sample})" if r.error_sample else line
