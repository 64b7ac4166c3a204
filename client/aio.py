"""The asyncio client: the same shape as the synchronous one (client/sync.py), awaitable.

async with AsyncStreamingClient("localhost:50051") as client:
    async with client.open_session() as session:
        y = await session.step(x)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Collection, Generator, Iterable, Mapping
from typing import Any

import grpc
import numpy as np

from lstm_stream.client.aio_batches import AsyncBatchFeeder
from lstm_stream.client.batching import BatchResult
from lstm_stream.client.errors import LstmStreamError, from_rpc_error
from lstm_stream.client.ledger import Chunk
from lstm_stream.client.options import ClientOptions
from lstm_stream.client.policy import ArrayLike, StreamRetry, UnaryRetry, as_rows, new_session_id
from lstm_stream.client.session_core import SessionCore, placement
from lstm_stream.v1 import inference_pb2 as pb
from lstm_stream.v1 import inference_pb2_grpc as pb_grpc


def make_channel(options: ClientOptions) -> grpc.aio.Channel:
    if options.secure:
        return grpc.aio.secure_channel(
            options.target, options.channel_credentials(), options.channel_options()
        )
    return grpc.aio.insecure_channel(options.target, options.channel_options())


class AsyncStreamingClient:
    """A connection to lstm-serve for asyncio code; sessions share the channel."""

    def __init__(self, target: str | None = None, options: ClientOptions | None = None) -> None:
        options = options or ClientOptions()
        if target:
            options = ClientOptions(**{**options.__dict__, "target": target})
        self.options = options
        self._channel = make_channel(options)
        self.stub = pb_grpc.InferenceServiceStub(self._channel)
        self._info: dict[tuple[str, int], asyncio.Future[pb.GetModelInfoResponse]] = {}
        self._batches: dict[tuple[str, int], AsyncBatchFeeder] = {}

    async def __aenter__(self) -> AsyncStreamingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for feeder in self._batches.values():
            feeder.close_streams()
        await self._channel.close()

    async def call(self, method: str, request: Any, session_id: str = "") -> Any:
        """A unary RPC within the client's deadline (all attempts together), with its metadata
        and typed errors; idempotent calls are repeated after a transport failure."""
        retry = UnaryRetry(self.options, method)
        while True:
            try:
                return await getattr(self.stub, method)(
                    request, timeout=retry.timeout(), metadata=self.options.metadata(session_id)
                )
            except grpc.RpcError as rpc_error:
                err = from_rpc_error(rpc_error)
                wait = retry.backoff_after(err)
                if wait is None:
                    raise retry.final(err) from None
                await asyncio.sleep(wait)

    async def info(self, model: str = "", model_version: int = 0) -> pb.GetModelInfoResponse:
        """A model version's description ('' and 0: the default model's newest ready version),
        asked once each: sessions opened at once share one call."""
        key = (model, model_version)
        if key not in self._info or _failed(self._info[key]):
            request = pb.GetModelInfoRequest(model=model, model_version=model_version)
            self._info[key] = asyncio.ensure_future(self.call("GetModelInfo", request))
        return await asyncio.shield(self._info[key])

    async def list_models(self) -> pb.ListModelsResponse:
        """Every model the server holds, each version with its state and live sessions."""
        return await self.call("ListModels", pb.ListModelsRequest())

    def open_session(
        self, session_id: str | None = None, model: str = "", model_version: int = 0
    ) -> Opening:
        """Create a session (a new unguessable id unless one is given) on a model version ('' and
        0: the default model's newest ready version): `await` it, or use it as `async with
        client.open_session() as session` (closed at the end)."""
        return Opening(self._open_session(session_id, model, model_version))

    def attach(self, session_id: str) -> Opening:
        """Continue an existing session from the server's next step (await it, or `async
        with`)."""
        return Opening(self._attach(session_id))

    async def _open_session(
        self, session_id: str | None, model: str, model_version: int
    ) -> AsyncStreamSession:
        generated = not session_id
        session_id = session_id or new_session_id()
        request = pb.CreateSessionRequest(
            session_id=session_id, model=model, model_version=model_version
        )
        try:
            created = (await self.call("CreateSession", request, session_id)).session
        except LstmStreamError as err:
            if not (generated and err.reason == "SESSION_EXISTS"):
                raise
            created = await self.get_session(session_id)
        return await self._session(session_id, 0, created, model, model_version)

    async def _attach(self, session_id: str) -> AsyncStreamSession:
        session = await self.get_session(session_id)
        return await self._session(session_id, session.next_step, session)

    async def _session(
        self, session_id: str, next_step: int, placed: pb.Session, model: str = "", version: int = 0
    ) -> AsyncStreamSession:
        info = await self.info(*placement(placed, model, version))
        return AsyncStreamSession(
            self, info, session_id, next_step, placed.model, placed.model_version
        )

    async def get_session(self, session_id: str) -> pb.Session:
        request = pb.GetSessionRequest(session_id=session_id)
        return (await self.call("GetSession", request, session_id)).session

    async def delete_session(self, session_id: str) -> None:
        await self.call("DeleteSession", pb.DeleteSessionRequest(session_id=session_id), session_id)

    async def batches(self, model: str = "", model_version: int = 0) -> AsyncBatchFeeder:
        """What feeds sessions of a model version by batch calls: their ledgers, shared by
        step_batch and stream_batches."""
        key = (model, model_version)
        if key not in self._batches:
            info = await self.info(model, model_version)
            self._batches.setdefault(key, AsyncBatchFeeder(self, info, model, model_version))
        return self._batches[key]

    async def step_batch(
        self,
        chunks: Mapping[str, ArrayLike],
        reset: Collection[str] = (),
        end: Collection[str] = (),
        model: str = "",
        model_version: int = 0,
    ) -> BatchResult:
        """The next chunk of many sessions in one call; see StreamingClient.step_batch."""
        return await (await self.batches(model, model_version)).step(chunks, reset, end)

    async def stream_batches(
        self,
        batches: Iterable[Mapping[str, ArrayLike]],
        window: int = 4,
        model: str = "",
        model_version: int = 0,
    ) -> AsyncIterator[BatchResult]:
        """step_batch over one stream, up to `window` batches in flight; a result per batch."""
        async for result in (await self.batches(model, model_version)).stream(batches, window):
            yield result

    async def predict(
        self, inputs: ArrayLike, model: str = "", model_version: int = 0
    ) -> np.ndarray:
        info = await self.info(model, model_version)
        rows = as_rows(inputs, info.input_size)
        request = pb.PredictRequest(
            packed_inputs=rows.astype("<f4").tobytes(),
            num_steps=len(rows),
            model=model,
            model_version=model_version,
        )
        response = await self.call("Predict", request)
        return np.frombuffer(response.packed_outputs, "<f4").reshape(-1, info.output_size).copy()


class Opening:
    """A session being opened: awaitable, and an async context manager that closes it."""

    def __init__(self, opening: Awaitable[AsyncStreamSession]) -> None:
        self._opening = opening
        self._session: AsyncStreamSession | None = None

    def __await__(self) -> Generator[Any, None, AsyncStreamSession]:
        return self._opening.__await__()

    async def __aenter__(self) -> AsyncStreamSession:
        self._session = await self._opening
        return self._session

    async def __aexit__(self, *exc: Any) -> None:
        assert self._session is not None
        await self._session.__aexit__(*exc)


class AsyncStreamSession(SessionCore):
    """One session, fed through a stream that is reopened whenever the connection drops."""

    def __init__(
        self,
        client: AsyncStreamingClient,
        info: pb.GetModelInfoResponse,
        session_id: str,
        next_step: int = 0,
        model: str = "",
        model_version: int = 0,
    ) -> None:
        super().__init__(client.options, info, session_id, next_step, model, model_version)
        self._client = client
        self._call: grpc.aio.StreamStreamCall | None = None

    async def __aenter__(self) -> AsyncStreamSession:
        return self

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        """The block's end ends the session, whether it ran to its end or raised; see
        StreamSession.__exit__ (client/sync.py)."""
        if self._released:
            return
        if exc is None:
            try:
                await self.close()
                return
            except LstmStreamError:
                pass  # e.g. a chunk the server refused is unanswered still: delete instead
        if self._leave_after(exc):
            return
        try:
            await self._client.delete_session(self.session_id)
        except Exception as err:
            self._not_ended(exc, err)

    async def step(self, x: ArrayLike) -> np.ndarray:
        """One timestep (input_size,) -> its output (output_size,)."""
        return (await self.send(np.asarray(x, dtype=np.float32).reshape(1, -1)))[0]

    async def send(self, chunk: ArrayLike, reset: bool = False) -> np.ndarray:
        """Timesteps (num_steps, input_size) -> their outputs (num_steps, output_size)."""
        await self._submit(self._chunk(chunk, reset))
        return (await self._receive())[1]

    async def stream(
        self, chunks: Iterable[ArrayLike], window: int = 8
    ) -> AsyncIterator[np.ndarray]:
        """Send chunks as they come, up to `window` unanswered; yield each chunk's outputs."""
        for chunk in chunks:
            await self._submit(self._chunk(chunk))
            while len(self._ledger.pending) >= window:
                yield (await self._receive())[1]
        while self._ledger.pending:
            yield (await self._receive())[1]

    async def reset(self) -> None:
        await self.send([], reset=True)

    async def close(self) -> None:
        """End the session on the server (its state is deleted) and the stream."""
        await self._submit(self._end_chunk())
        try:
            await self._receive()
        except LstmStreamError as err:
            if err.reason != "SESSION_NOT_FOUND":
                raise
        self.detach()

    def _close_stream(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None

    async def _submit(self, chunk: Chunk) -> None:
        if self._call is None:
            await self._open()
            return
        # A failed write shows in the read that follows, and the retry resends this chunk.
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            await self._call.write(chunk.request(self.session_id, self._ledger.answered))

    async def _open(self) -> None:
        self._call = self._client.stub.StreamSteps(metadata=self._options.metadata(self.session_id))
        for chunk in self._ledger.to_send():
            try:
                await self._call.write(chunk.request(self.session_id, self._ledger.answered))
            except (grpc.RpcError, asyncio.InvalidStateError):
                return

    async def _read(self) -> pb.StreamStepsResponse:
        assert self._call is not None
        try:
            response = await asyncio.wait_for(self._call.read(), self._options.deadline_s)
        except TimeoutError:
            raise LstmStreamError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {self._options.deadline_s} s"
            ) from None
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        if response is grpc.aio.EOF:
            code = await self._call.code()
            if code == grpc.StatusCode.OK:
                raise LstmStreamError(grpc.StatusCode.UNAVAILABLE, "stream ended by the server")
            raise from_rpc_error(
                _finished_error(
                    code, await self._call.details(), await self._call.trailing_metadata()
                )
            )
        return response

    async def _receive(self) -> tuple[Chunk, np.ndarray]:
        retry = StreamRetry(self._options)
        while True:
            try:
                accepted = self._ledger.accept(await self._read())
            except LstmStreamError as err:
                wait = retry.backoff_after(err, rewound=self._rewind(err))
                self._close_stream()
                if wait is None:
                    self._ledger.drop_refused(err)
                    raise
                self.reconnects += 1
                await asyncio.sleep(wait)
                await self._open()
                continue
            if accepted is not None:  # None: the answer to a chunk resent after a rewind
                return accepted


def _failed(task: asyncio.Future[Any]) -> bool:
    return task.done() and (task.cancelled() or task.exception() is not None)


def _finished_error(code: grpc.StatusCode, details: str, trailers: Any) -> grpc.RpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, details)
