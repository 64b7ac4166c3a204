"""A closed-loop load generator for StreamBatches: many sessions per message.

Sessions are split into groups of `sessions_per_message`; each group is one StreamBatches
stream that keeps `window` messages in flight, every message carrying the next `chunk_steps`
timesteps of each of its sessions (packed, appended: the same prebuilt request every time, only
its chunks' `answered_step` set anew before a write, as the SDK tells a durable server). The
first message creates the sessions (create_missing) and is not counted; the last ends them.

    result = asyncio.run(run_batch_load("localhost:50051", 1024, 1024, 1, duration_s=3))
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import secrets
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from lstm_stream.client.loadgen import (
    CLOSE_TIMEOUT_S,
    STALL_MARGIN_S,
    LoadResult,
    _channels,
    _describe,
    _summarise,
    _Window,
)
from lstm_stream.client.options import ClientOptions
from lstm_stream.v1 import inference_pb2 as pb
from lstm_stream.v1 import inference_pb2_grpc as pb_grpc


@dataclass(eq=False)
class _Group:
    """One StreamBatches stream feeding a group of sessions with `window` messages in flight."""

    stub: pb_grpc.InferenceServiceStub
    request: pb.StepBatchRequest
    expected_bytes: int  # packed output bytes per chunk
    window: int
    metadata: tuple[tuple[str, str], ...] = ()
    chunk_steps: int = 1
    tell_answered: bool = True  # each chunk says answered_step, as the SDK does
    answered: int = 0  # timesteps whose outputs every session of the group has received
    told: int = 0  # the answered_step the request's chunks carry now
    latencies: list[float] = field(default_factory=list)
    timesteps: int = 0
    last_counted: float = 0.0
    error: str = ""
    call: grpc.aio.StreamStreamCall | None = None
    chunks: list[pb.SessionChunk] = field(init=False)  # the request's own, to set in place

    def __post_init__(self) -> None:
        self.chunks = list(self.request.chunks)

    async def _read(self) -> pb.StepBatchResponse:
        assert self.call is not None
        response = await self.call.read()
        if response is grpc.aio.EOF:
            raise RuntimeError(
                f"stream ended: {await self.call.code()} {await self.call.details()}"
            )
        for result in response.results:
            if result.HasField("error") or len(result.packed_outputs) != self.expected_bytes:
                raise RuntimeError(f"chunk of {result.session_id[:8]} refused: {result.error}")
        self.answered += self.chunk_steps
        return response

    def _tell(self) -> None:
        """Set the chunks' answered_step to what has been answered (a write serialises the
        request, so the next write may carry a newer value)."""
        if self.answered != self.told:
            self.told = answered = self.answered
            for chunk in self.chunks:
                chunk.answered_step = answered

    async def open(self) -> None:
        self.call = self.stub.StreamBatches(metadata=self.metadata)
        try:
            first = pb.StepBatchRequest(create_missing=True)
            first.MergeFrom(self.request)  # its chunks, and the model they run on
            await self.call.write(first)
            await self._read()
        except (grpc.RpcError, RuntimeError) as exc:
            self.error = _describe(exc)

    async def run(self, window: _Window) -> None:
        assert self.call is not None
        perf_counter, sent = time.perf_counter, []
        try:
            now = perf_counter()
            while now < window.end or not self.latencies:
                while len(sent) < self.window:
                    if self.tell_answered:
                        self._tell()
                    await self.call.write(self.request)
                    sent.append(perf_counter())
                response = await self._read()
                now = perf_counter()
                started = sent.pop(0)
                if window.start <= now and (now <= window.end or not self.latencies):
                    self.latencies.append(now - started)
                    self.timesteps += sum(r.num_steps for r in response.results)
                    self.last_counted = now
            for _ in sent:  # answers still owed
                await self._read()
        except (grpc.RpcError, RuntimeError) as exc:
            self.error = _describe(exc)

    async def close(self) -> None:
        if self.call is None:
            return
        ending = pb.StepBatchRequest(
            chunks=[
                pb.SessionChunk(session_id=c.session_id, end_session=True)
                for c in self.request.chunks
            ],
            model=self.request.model,
            model_version=self.request.model_version,
        )
        try:
            await asyncio.wait_for(self._end(ending), CLOSE_TIMEOUT_S)
        except (grpc.RpcError, RuntimeError, TimeoutError) as exc:
            self.error = self.error or f"closing: {_describe(exc)}"
            self.call.cancel()

    async def _end(self, ending: pb.StepBatchRequest) -> None:
        assert self.call is not None
        await self.call.write(ending)
        await self.call.read()
        await self.call.done_writing()
        await self.call.code()


def _batch_requests(
    sessions: int, per_message: int, values: int, seed: int, model: str = "", model_version: int = 0
) -> list[pb.StepBatchRequest]:
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((sessions, values), dtype=np.float32)
    run_id = secrets.token_hex(4)  # two runs against one server do not share sessions
    chunks = [
        pb.SessionChunk(session_id=f"bench-{run_id}-{i}", packed_inputs=row.tobytes())
        for i, row in enumerate(data)
    ]
    return [
        pb.StepBatchRequest(
            chunks=chunks[i : i + per_message], model=model, model_version=model_version
        )
        for i in range(0, sessions, per_message)
    ]


async def run_batch_load(
    target: str | ClientOptions,
    sessions: int,
    sessions_per_message: int,
    chunk_steps: int,
    duration_s: float,
    window: int = 4,
    warmup_s: float = 0.5,
    seed: int = 0,
    model: str = "",
    model_version: int = 0,
    tell_answered: bool = True,
) -> LoadResult:
    """Drive `sessions` sessions through StreamBatches streams of `sessions_per_message`
    chunks a message, on a model version ('' and 0: the default model's newest ready one);
    counted as run_load counts (latency is per message). With `tell_answered`, every chunk says
    how many timesteps' outputs its session has received (`answered_step`)."""
    client = target if isinstance(target, ClientOptions) else ClientOptions(target=target)
    metadata = client.metadata()
    groups_count = math.ceil(sessions / sessions_per_message)
    channels = _channels(client, groups_count * 64)
    try:
        info = await pb_grpc.InferenceServiceStub(channels[0]).GetModelInfo(
            pb.GetModelInfoRequest(model=model, model_version=model_version),
            metadata=metadata,
            timeout=client.deadline_s,
        )
        requests = _batch_requests(
            sessions,
            sessions_per_message,
            chunk_steps * info.input_size,
            seed,
            model,
            model_version,
        )
        groups = [
            _Group(
                pb_grpc.InferenceServiceStub(channels[i % len(channels)]),
                request,
                4 * chunk_steps * info.output_size,
                window,
                metadata,
                chunk_steps,
                tell_answered,
            )
            for i, request in enumerate(requests)
        ]
        await asyncio.gather(*(g.open() for g in groups))
        start = time.perf_counter() + warmup_s
        measured = _Window(start, start + duration_s)
        lost = 0
        try:
            await asyncio.wait_for(
                asyncio.gather(*(g.run(measured) for g in groups if not g.error)),
                warmup_s + duration_s + STALL_MARGIN_S,
            )
        except TimeoutError:
            lost = 1
        await asyncio.gather(*(g.close() for g in groups))
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    # A group has what _summarise reads of a session: latencies, timesteps, error, last_counted.
    result = _summarise(groups, chunk_steps, measured, lost, packed=True)  # type: ignore[arg-type]
    return dataclasses.replace(result, sessions=sessions, sessions_per_message=sessions_per_message)
