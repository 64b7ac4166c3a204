"""Many sessions per message, synchronously: `StreamingClient.step_batch` and
`StreamingClient.stream_batches` (see batching.py for the bookkeeping and the routing).

    with StreamingClient("localhost:50051") as client:
        result = client.step_batch({"pump-7": reading_7, "pump-9": reading_9})
        y7 = result["pump-7"]            # raises pump-7's error if its chunk was refused
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import grpc

from lstm_stream.client.batching import BatchBook, BatchResult, Item
from lstm_stream.client.call_stream import CallStream
from lstm_stream.client.errors import LstmStreamError, from_rpc_error
from lstm_stream.client.policy import ArrayLike, StreamRetry
from lstm_stream.v1 import inference_pb2 as pb

if TYPE_CHECKING:
    from lstm_stream.client.sync import StreamingClient

Inflight = deque[tuple[BatchResult, list[tuple[str, list[Item]]]]]


class BatchFeeder:
    """Feeds many sessions by batch calls (`StreamingClient.batches`)."""

    def __init__(
        self,
        client: StreamingClient,
        create_missing: bool = True,
        model: str = "",
        model_version: int = 0,
    ) -> None:
        """Sessions of one model version ('' and 0: the default model's newest ready one): its
        input size decodes their chunks, and new sessions are created on it."""
        self._client = client
        self._options = client.options
        self.create_missing = create_missing
        info = client.info(model, model_version)
        self.book = BatchBook(client.options, info, model, model_version)
        self._streams: dict[str, CallStream] = {}
        self.recoveries = 0  # times unanswered chunks were sent again

    def attach(self, session_id: str) -> None:
        """Go on feeding a session created elsewhere, from the server's next step."""
        self.book.attach(session_id, self._client.get_session(session_id).next_step)

    def step(
        self,
        chunks: Mapping[str, ArrayLike],
        reset: Collection[str] = (),
        end: Collection[str] = (),
    ) -> BatchResult:
        """One chunk (num_steps, input_size) per session -> each session's outputs."""
        result, _ = self.book.add(chunks, reset, end)
        self._complete([result])
        return result

    def stream(
        self, batches: Iterable[Mapping[str, ArrayLike]], window: int = 4
    ) -> Iterator[BatchResult]:
        """Send batches over StreamBatches as they come, up to `window` unanswered; yield
        each one's result, in order."""
        inflight: Inflight = deque()
        try:
            for chunks in batches:
                result, items = self.book.add(chunks)
                parts = self.book.requests(items)
                inflight.append((result, parts))
                for key, group in parts:
                    self._stream(key).write(self.book.message(group, self.create_missing))
                while len(inflight) >= window:
                    yield self._finish_oldest(inflight)
            while inflight:
                yield self._finish_oldest(inflight)
        finally:
            self.close_streams()

    def close_streams(self) -> None:
        for stream in self._streams.values():
            stream.close()
        self._streams.clear()

    def _stream(self, key: str) -> CallStream:
        if key not in self._streams:
            self._streams[key] = CallStream(
                self._client.stub.StreamBatches, self._options.metadata(partition=key)
            )
        return self._streams[key]

    def _finish_oldest(self, inflight: Inflight) -> BatchResult:
        result, parts = inflight[0]
        try:
            for key, group in parts:
                if result.complete:
                    break
                response = self._streams[key].read(self._options.deadline_s)
                if self.book.settle(group, response):
                    raise LookupError("sessions to send again")
        except (LstmStreamError, LookupError):
            # Start again from the ledgers: every unanswered chunk, by unary calls; what the
            # server already applied is answered from its replay buffers.
            self.close_streams()
            self.recoveries += 1
            self._complete([r for r, _ in inflight])
        inflight.popleft()
        return result

    def _complete(self, results: list[BatchResult]) -> None:
        """Send what the results wait for until each is answered or refused: rounds of one
        chunk per session, each round answered before the next; reconnect with backoff."""
        retry = StreamRetry(self._options)
        while session_ids := self.book.unanswered(results):
            try:
                for round_items in self.book.resend_rounds(session_ids):
                    # The whole round goes out before a session that must send again restarts
                    # it: a failover rewinds many sessions, spread over many messages, and one
                    # attempt per message would spend the retries on a large gateway.
                    again: dict[str, LstmStreamError] = {}
                    for key, group in self.book.requests(round_items):
                        again |= self.book.settle(group, self._call(key, group))
                    if again:
                        raise next(iter(again.values()))
            except LstmStreamError as err:
                wait = retry.backoff_after(err, rewound=err.reason == "STEP_OUT_OF_ORDER")
                if wait is None:
                    raise
                time.sleep(wait)

    def _call(self, key: str, group: list[Item]) -> pb.StepBatchResponse:
        try:
            return self._client.stub.StepBatch(
                self.book.message(group, self.create_missing),
                timeout=self._options.deadline_s,
                metadata=self._options.metadata(partition=key),
            )
        except grpc.RpcError as rpc_error:
            raise from_rpc_error(rpc_error) from None
