"""Many sessions per message, for asyncio code: `AsyncStreamingClient.step_batch` and
`AsyncStreamingClient.stream_batches`; the same bookkeeping as the sync client (batching.py).

    async with AsyncStreamingClient("localhost:50051") as client:
        result = await client.step_batch({"pump-7": reading_7, "pump-9": reading_9})
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import grpc

from lstm_stream.client.batching import BatchBook, BatchResult, Item
from lstm_stream.client.errors import LstmStreamError, from_rpc_error
from lstm_stream.client.policy import ArrayLike, StreamRetry
from lstm_stream.v1 import inference_pb2 as pb

if TYPE_CHECKING:
    from lstm_stream.client.aio import AsyncStreamingClient

Inflight = deque[tuple[BatchResult, list[tuple[str, list[Item]]]]]


class AsyncBatchFeeder:
    """Feeds many sessions by batch calls (`AsyncStreamingClient.batches()`)."""

    def __init__(
        self,
        client: AsyncStreamingClient,
        info: pb.GetModelInfoResponse,
        model: str = "",
        model_version: int = 0,
    ) -> None:
        """Sessions of one model version, `info` its description (see BatchFeeder)."""
        self._client = client
        self._options = client.options
        self.create_missing = True
        self.book = BatchBook(client.options, info, model, model_version)
        self._streams: dict[str, Any] = {}
        self.recoveries = 0

    async def attach(self, session_id: str) -> None:
        """Go on feeding a session created elsewhere, from the server's next step."""
        self.book.attach(session_id, (await self._client.get_session(session_id)).next_step)

    async def step(
        self,
        chunks: Mapping[str, ArrayLike],
        reset: Collection[str] = (),
        end: Collection[str] = (),
    ) -> BatchResult:
        result, _ = self.book.add(chunks, reset, end)
        await self._complete([result])
        return result

    async def stream(
        self, batches: Iterable[Mapping[str, ArrayLike]], window: int = 4
    ) -> AsyncIterator[BatchResult]:
        inflight: Inflight = deque()
        try:
            for chunks in batches:
                result, items = self.book.add(chunks)
                parts = self.book.requests(items)
                inflight.append((result, parts))
                for key, group in parts:
                    await self._write(key, self.book.message(group, True))
                while len(inflight) >= window:
                    yield await self._finish_oldest(inflight)
            while inflight:
                yield await self._finish_oldest(inflight)
        finally:
            self.close_streams()

    def close_streams(self) -> None:
        for call in self._streams.values():
            call.cancel()
        self._streams.clear()

    def _stream(self, key: str) -> Any:
        if key not in self._streams:
            self._streams[key] = self._client.stub.StreamBatches(
                metadata=self._options.metadata(partition=key)
            )
        return self._streams[key]

    async def _write(self, key: str, message: pb.StepBatchRequest) -> None:
        """Write to a partition's stream; a call that has already finished (the connection
        dropped, even between deciding to write and writing) is found again when its answer is
        read, and recovery sends the message again. The stream is kept, not reopened here:
        the batches in flight on it must be read from it, in order."""
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            await self._stream(key).write(message)

    async def _finish_oldest(self, inflight: Inflight) -> BatchResult:
        result, parts = inflight[0]
        try:
            for key, group in parts:
                if result.complete:
                    break
                response = await asyncio.wait_for(
                    self._streams[key].read(), self._options.deadline_s
                )
                if response is grpc.aio.EOF or self.book.settle(group, response):
                    raise LookupError("sessions to send again")
        except (grpc.RpcError, LstmStreamError, LookupError, TimeoutError):
            self.close_streams()
            self.recoveries += 1
            await self._complete([r for r, _ in inflight])
        inflight.popleft()
        return result

    async def _complete(self, results: list[BatchResult]) -> None:
        retry = StreamRetry(self._options)
        while session_ids := self.book.unanswered(results):
            try:
                for round_items in self.book.resend_rounds(session_ids):
                    # The whole round goes out first (see sync_batches.BatchFeeder._complete).
                    again: dict[str, LstmStreamError] = {}
                    for key, group in self.book.requests(round_items):
                        again |= self.book.settle(group, await self._call(key, group))
                    if again:
                        raise next(iter(again.values()))
            except LstmStreamError as err:
                wait = retry.backoff_after(err, rewound=err.reason == "STEP_OUT_OF_ORDER")
                if wait is None:
                    raise
                await asyncio.sleep(wait)

    async def _call(self, key: str, group: list[Item]) -> pb.StepBatchResponse:
        try:
            return await self._client.stub.StepBatch(
                self.book.message(group, self.create_missing),
                timeout=self._options.deadline_s,
                metadata=self._options.metadata(partition=key),
            )
        except grpc.RpcError as rpc_error:
            raise from_rpc_error(rpc_error) from None
