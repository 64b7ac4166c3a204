"""The synchronous client: StreamingClient and the sessions it opens.

    with StreamingClient("localhost:50051") as client, client.open_session() as session:
        for x in readings:
            y = session.step(x)          # this timestep's output, at once

A session survives dropped connections: unanswered chunks are resent with their step numbers
after a reconnect (with backoff), so each output is seen once and in order.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any

import grpc
import numpy as np

from lstm_stream.client.batching import BatchResult
from lstm_stream.client.call_stream import CallStream
from lstm_stream.client.errors import LstmStreamError, from_rpc_error
from lstm_stream.client.ledger import Chunk
from lstm_stream.client.options import ClientOptions
from lstm_stream.client.policy import ArrayLike, StreamRetry, UnaryRetry, as_rows, new_session_id
from lstm_stream.client.session_core import SessionCore, placement
from lstm_stream.client.sync_batches import BatchFeeder
from lstm_stream.v1 import inference_pb2 as pb
from lstm_stream.v1 import inference_pb2_grpc as pb_grpc


def make_channel(options: ClientOptions) -> grpc.Channel:
    if options.secure:
        return grpc.secure_channel(
            options.target, options.channel_credentials(), options.channel_options()
        )
    return grpc.insecure_channel(options.target, options.channel_options())


class StreamingClient:
    """A connection to lstm-serve. `target` or full `options`; sessions share the channel."""

    def __init__(self, target: str | None = None, options: ClientOptions | None = None) -> None:
        options = options or ClientOptions()
        if target:
            options = ClientOptions(**{**options.__dict__, "target": target})
        self.options = options
        self._channel = make_channel(options)
        self.stub = pb_grpc.InferenceServiceStub(self._channel)
        self._info: dict[tuple[str, int], pb.GetModelInfoResponse] = {}
        self._batches: dict[tuple[str, int], BatchFeeder] = {}

    def __enter__(self) -> StreamingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for feeder in self._batches.values():
            feeder.close_streams()
        self._channel.close()

    def call(self, method: str, request: Any, session_id: str = "") -> Any:
        """A unary RPC within the client's deadline (all attempts together), with its metadata
        and typed errors; idempotent calls are repeated after a transport failure."""
        retry = UnaryRetry(self.options, method)
        while True:
            try:
                return getattr(self.stub, method)(
                    request, timeout=retry.timeout(), metadata=self.options.metadata(session_id)
                )
            except grpc.RpcError as rpc_error:
                err = from_rpc_error(rpc_error)
                wait = retry.backoff_after(err)
                if wait is None:
                    raise retry.final(err) from None
                time.sleep(wait)

    def info(self, model: str = "", model_version: int = 0) -> pb.GetModelInfoResponse:
        """A served model version (sizes, labels, device); '' and 0: the default model's newest
        ready version. Fetched once each."""
        key = (model, model_version)
        if key not in self._info:
            request = pb.GetModelInfoRequest(model=model, model_version=model_version)
            self._info[key] = self.call("GetModelInfo", request)
        return self._info[key]

    def list_models(self) -> pb.ListModelsResponse:
        """Every model the server holds, each version with its state and live sessions."""
        return self.call("ListModels", pb.ListModelsRequest())

    def open_session(
        self, session_id: str | None = None, model: str = "", model_version: int = 0
    ) -> StreamSession:
        """Create a session (with a new unguessable id unless one is given) on a model version
        ('' and 0: the default model's newest ready version) and return it."""
        generated = not session_id
        session_id = session_id or new_session_id()
        request = pb.CreateSessionRequest(
            session_id=session_id, model=model, model_version=model_version
        )
        try:
            created = self.call("CreateSession", request, session_id).session
        except LstmStreamError as err:
            # A fresh random id that "exists" is our own create, answered again after a retry.
            if not (generated and err.reason == "SESSION_EXISTS"):
                raise
            created = self.get_session(session_id)
        return self._session(session_id, 0, created, model, model_version)

    def attach(self, session_id: str) -> StreamSession:
        """Continue an existing session from the server's next step, on its own model."""
        session = self.get_session(session_id)
        return self._session(session_id, session.next_step, session)

    def _session(
        self, session_id: str, next_step: int, placed: pb.Session, model: str = "", version: int = 0
    ) -> StreamSession:
        info = self.info(*placement(placed, model, version))
        return StreamSession(self, session_id, next_step, info, placed.model, placed.model_version)

    def get_session(self, session_id: str) -> pb.Session:
        request = pb.GetSessionRequest(session_id=session_id)
        return self.call("GetSession", request, session_id).session

    def delete_session(self, session_id: str) -> None:
        self.call("DeleteSession", pb.DeleteSessionRequest(session_id=session_id), session_id)

    @property
    def batches(self) -> BatchFeeder:
        """What feeds sessions of the default model by batch calls: their ledgers, shared by
        step_batch and stream_batches."""
        return self.batches_on()

    def batches_on(self, model: str = "", model_version: int = 0) -> BatchFeeder:
        """What feeds sessions of one model version by batch calls (see `batches`)."""
        key = (model, model_version)
        if key not in self._batches:
            self._batches[key] = BatchFeeder(self, model=model, model_version=model_version)
        return self._batches[key]

    def step_batch(
        self,
        chunks: Mapping[str, ArrayLike],
        reset: Collection[str] = (),
        end: Collection[str] = (),
        model: str = "",
        model_version: int = 0,
    ) -> BatchResult:
        """The next chunk of many sessions in one call: `{session_id: (num_steps, input_size)}`
        -> each session's outputs (`result[session_id]`, which raises that session's error if
        its chunk was refused). A session id not fed before is a new session on the model
        version asked for (see `batches.attach` to go on with one fed elsewhere); `reset` and
        `end` name sessions."""
        return self.batches_on(model, model_version).step(chunks, reset, end)

    def stream_batches(
        self,
        batches: Iterable[Mapping[str, ArrayLike]],
        window: int = 4,
        model: str = "",
        model_version: int = 0,
    ) -> Iterator[BatchResult]:
        """step_batch over one stream, up to `window` batches in flight; a result per batch."""
        return self.batches_on(model, model_version).stream(batches, window)

    def predict(self, inputs: ArrayLike, model: str = "", model_version: int = 0) -> np.ndarray:
        """A whole sequence (T, input_size) from zero state -> outputs (T, output_size)."""
        info = self.info(model, model_version)
        rows = as_rows(inputs, info.input_size)
        request = pb.PredictRequest(
            packed_inputs=rows.astype("<f4").tobytes(),
            num_steps=len(rows),
            model=model,
            model_version=model_version,
        )
        response = self.call("Predict", request)
        return np.frombuffer(response.packed_outputs, "<f4").reshape(-1, info.output_size).copy()


class StreamSession(SessionCore):
    """One session, fed through a stream that is reopened whenever the connection drops."""

    def __init__(
        self,
        client: StreamingClient,
        session_id: str,
        next_step: int = 0,
        info: pb.GetModelInfoResponse | None = None,
        model: str = "",
        model_version: int = 0,
    ) -> None:
        info = info or client.info(model, model_version)
        super().__init__(client.options, info, session_id, next_step, model, model_version)
        self._client = client
        self._stream: CallStream | None = None

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        """The block's end ends the session, whether the block ran to its end or raised;
        `detach()` (or `close()`) inside it leaves the session as it is. After an exception
        the session is deleted without waiting for unanswered chunks (a session another stream
        took over is left to it); if that fails (the connection is gone), the block's own
        exception is raised, with a note saying so."""
        if self._released:
            return
        if exc is None:
            try:
                self.close()
                return
            except LstmStreamError:
                pass  # e.g. a chunk the server refused is unanswered still: delete instead
        if self._leave_after(exc):
            return
        try:
            self._client.delete_session(self.session_id)
        except Exception as err:
            self._not_ended(exc, err)

    def step(self, x: ArrayLike) -> np.ndarray:
        """One timestep (input_size,) -> its output (output_size,)."""
        return self.send(np.asarray(x, dtype=np.float32).reshape(1, -1))[0]

    def send(self, chunk: ArrayLike, reset: bool = False) -> np.ndarray:
        """Timesteps (num_steps, input_size) -> their outputs (num_steps, output_size)."""
        self._submit(self._chunk(chunk, reset))
        return self._receive()[1]

    def stream(self, chunks: Iterable[ArrayLike], window: int = 8) -> Iterator[np.ndarray]:
        """Send chunks as they come, up to `window` unanswered; yield each chunk's outputs."""
        for chunk in chunks:
            self._submit(self._chunk(chunk))
            while len(self._ledger.pending) >= window:
                yield self._receive()[1]
        while self._ledger.pending:
            yield self._receive()[1]

    def reset(self) -> None:
        """Zero the session's state; its step index keeps counting."""
        self.send([], reset=True)

    def close(self) -> None:
        """End the session on the server (its state is deleted) and the stream."""
        self._submit(self._end_chunk())
        try:
            self._receive()
        except LstmStreamError as err:
            if err.reason != "SESSION_NOT_FOUND":  # a resent end after the first one worked
                raise
        self.detach()

    def _close_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def _submit(self, chunk: Chunk) -> None:
        if self._stream is None:
            self._open()  # sends every pending chunk, this one included
        else:
            self._stream.write(chunk.request(self.session_id, self._ledger.answered))

    def _open(self) -> None:
        self._stream = CallStream(
            self._client.stub.StreamSteps, self._options.metadata(self.session_id)
        )
        for chunk in self._ledger.to_send():
            self._stream.write(chunk.request(self.session_id, self._ledger.answered))

    def _receive(self) -> tuple[Chunk, np.ndarray]:
        retry = StreamRetry(self._options)
        while True:
            try:
                assert self._stream is not None
                accepted = self._ledger.accept(self._stream.read(self._options.deadline_s))
            except LstmStreamError as err:
                wait = retry.backoff_after(err, rewound=self._rewind(err))
                self._close_stream()
                if wait is None:
                    self._ledger.drop_refused(err)
                    raise
                self.reconnects += 1
                time.sleep(wait)
                self._open()
                continue
            if accepted is not None:  # None: the answer to a chunk resent after a rewind
                return accepted
