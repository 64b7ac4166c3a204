"""Feeding many sessions by batch calls, written once for BatchFeeder and AsyncBatchFeeder: the
flows (flows.py) of StepBatch and StreamBatches over the bookkeeping of batching.py. A surface
adds only the streams it opens (`_start`) and how it drives the flows."""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import grpc

from lstm_stream.client.batching import BatchBook, BatchResult, Item
from lstm_stream.client.errors import LstmStreamError, from_rpc_error
from lstm_stream.client.flows import Call, Flow, Output, Sleep
from lstm_stream.client.policy import ArrayLike, StreamRetry
from lstm_stream.v1 import inference_pb2 as pb

Inflight = deque[tuple[BatchResult, list[tuple[str, list[Item]]]]]


class FeederCore:
    def __init__(
        self,
        client: Any,
        info: pb.GetModelInfoResponse,
        create_missing: bool = True,
        model: str = "",
        model_version: int = 0,
    ) -> None:
        """Sessions of one model version ('' and 0: the default model's newest ready one): its
        input size decodes their chunks, and new sessions are created on it."""
        self._client = client
        self._options = client.options
        self.create_missing = create_missing
        self.book = BatchBook(client.options, info, model, model_version)
        self._streams: dict[str, Any] = {}  # StreamBatches calls by partition (see _start)
        self.recoveries = 0  # times unanswered chunks were sent again

    def close_streams(self) -> None:
        for stream in self._streams.values():
            stream.close()
        self._streams.clear()

    def _start(self, method: Any, metadata: Sequence[tuple[str, str]]) -> Any:
        """Open a StreamBatches call: an object with `write(request)`, `read(timeout)` (raising
        LstmStreamError) and `close()`."""
        raise NotImplementedError

    def _attaching(self, session_id: str) -> Flow[None]:
        """Go on feeding a session created elsewhere, from the server's next step."""
        session = yield Call(self._client.get_session, session_id)
        self.book.attach(session_id, session.next_step)

    def _stepping(
        self, chunks: Mapping[str, ArrayLike], reset: Collection[str], end: Collection[str]
    ) -> Flow[BatchResult]:
        result, _ = self.book.add(chunks, reset, end)
        yield from self._completing([result])
        return result

    def _streaming(self, batches: Iterable[Mapping[str, ArrayLike]], window: int) -> Flow[None]:
        """Send batches over StreamBatches as they come, up to `window` unanswered; hand out
        each one's result, in order."""
        inflight: Inflight = deque()
        try:
            for chunks in batches:
                result, items = self.book.add(chunks)
                parts = self.book.requests(items)
                inflight.append((result, parts))
                for key, group in parts:
                    # A write to a call that has finished shows when its answer is read, and
                    # recovery sends the message again. The stream is kept, not reopened here:
                    # the batches in flight on it must be read from it, in order.
                    yield Call(self._stream(key).write, self._message(group))
                while len(inflight) >= window:
                    yield Output((yield from self._finishing_oldest(inflight)))
            while inflight:
                yield Output((yield from self._finishing_oldest(inflight)))
        finally:
            self.close_streams()

    def _stream(self, key: str) -> Any:
        if key not in self._streams:
            metadata = self._options.metadata(partition=key)
            self._streams[key] = self._start(self._client.stub.StreamBatches, metadata)
        return self._streams[key]

    def _message(self, group: list[Item]) -> pb.StepBatchRequest:
        return self.book.message(group, self.create_missing)

    def _finishing_oldest(self, inflight: Inflight) -> Flow[BatchResult]:
        result, parts = inflight[0]
        try:
            for key, group in parts:
                if result.complete:
                    break
                response = yield Call(self._streams[key].read, self._options.deadline_s)
                if self.book.settle(group, response):
                    raise LookupError("sessions to send again")
        except (LstmStreamError, LookupError):
            # Start again from the ledgers: every unanswered chunk, by unary calls; what the
            # server already applied is answered from its replay buffers.
            self.close_streams()
            self.recoveries += 1
            yield from self._completing([r for r, _ in inflight])
        inflight.popleft()
        return result

    def _completing(self, results: list[BatchResult]) -> Flow[None]:
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
                        again |= self.book.settle(group, (yield from self._calling(key, group)))
                    if again:
                        raise next(iter(again.values()))
            except LstmStreamError as err:
                wait = retry.backoff_after(err, rewound=err.reason == "STEP_OUT_OF_ORDER")
                if wait is None:
                    raise
                yield Sleep(wait)

    def _calling(self, key: str, group: list[Item]) -> Flow[pb.StepBatchResponse]:
        """One StepBatch call, within the client's deadline; no retry (see _completing)."""
        metadata = self._options.metadata(partition=key)
        call = Call(
            self._client.stub.StepBatch,
            self._message(group),
            timeout=self._options.deadline_s,
            metadata=metadata,
        )
        try:
            return (yield call)
        except grpc.RpcError as rpc_error:
            raise from_rpc_error(rpc_error) from None
