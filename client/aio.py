"""The asyncio client: the same shape as the synchronous one (client/sync.py), awaitable.

async with AsyncStreamingClient("localhost:50051") as client:
    async with await client.open_session() as session:
        y = await session.step(x)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
import numpy as np
from lstm_stream.v1 import inference_pb2 as pb
from lstm_stream.v1 import inference_pb2_grpc as pb_grpc

from client.errors import LstmStreamError, from_rpc_error
from client.ledger import Chunk, Ledger
from client.options import IDEMPOTENT, ClientOptions, is_retryable
from client.sync import ArrayLike, as_rows, new_session_id


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
        self._info: asyncio.Task[pb.GetModelInfoResponse] | None = None

    async def __aenter__(self) -> AsyncStreamingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def call(self, method: str, request: Any, session_id: str = "") -> Any:
        """A unary RPC with the client's deadline, metadata and typed errors; idempotent calls
        are repeated after a transport failure (gRPC's own policy covers UNAVAILABLE)."""
        for attempt in range(1, self.options.max_retries + 2):
            try:
                return await getattr(self.stub, method)(
                    request,
                    timeout=self.options.deadline_s,
                    metadata=self.options.metadata(session_id),
                )
            except grpc.RpcError as rpc_error:
                err = from_rpc_error(rpc_error)
                if (
                    method not in IDEMPOTENT
                    or not is_retryable(err.code, err.reason)
                    or (attempt > self.options.max_retries)
                ):
                    raise err from None
                await asyncio.sleep(self.options.backoff(attempt))
        raise AssertionError("unreachable")

    async def info(self) -> pb.GetModelInfoResponse:
        """The model's description, asked once: sessions opened at once share one call."""
        if self._info is None or _failed(self._info):
            self._info = asyncio.ensure_future(self.call("GetModelInfo", pb.GetModelInfoRequest()))
        return await asyncio.shield(self._info)

    async def open_session(self, session_id: str | None = None) -> AsyncStreamSession:
        """Create a session (a new unguessable id unless one is given) and return it."""
        generated = not session_id
        session_id = session_id or new_session_id()
        try:
            await self.call(
                "CreateSession", pb.CreateSessionRequest(session_id=session_id), session_id
            )
        except LstmStreamError as err:
            if not (generated and err.reason == "SESSION_EXISTS"):
                raise
        return AsyncStreamSession(self, await self.info(), session_id, next_step=0)

    async def attach(self, session_id: str) -> AsyncStreamSession:
        """Continue an existing session from the server's next step."""
        session = await self.get_session(session_id)
        return AsyncStreamSession(self, await self.info(), session_id, session.next_step)

    async def get_session(self, session_id: str) -> pb.Session:
        request = pb.GetSessionRequest(session_id=session_id)
        return (await self.call("GetSession", request, session_id)).session

    async def delete_session(self, session_id: str) -> None:
        await self.call("DeleteSession", pb.DeleteSessionRequest(session_id=session_id), session_id)

    async def predict(self, inputs: ArrayLike) -> np.ndarray:
        info = await self.info()
        rows = as_rows(inputs, info.input_size)
        request = pb.PredictRequest(inputs=rows.ravel().tolist(), num_steps=len(rows))
        response = await self.call("Predict", request)
        return np.asarray(response.outputs, dtype=np.float32).reshape(-1, info.output_size)


class AsyncStreamSession:
    """One session, fed through a stream that is reopened whenever the connection drops."""

    def __init__(
        self,
        client: AsyncStreamingClient,
        info: pb.GetModelInfoResponse,
        session_id: str,
        next_step: int = 0,
    ) -> None:
        self._client = client
        self._options = client.options
        self.input_size, self.output_size = info.input_size, info.output_size
        self._ledger = Ledger(
            session_id,
            info.output_size,
            next_step,
            keep_until_durable=info.durable_sessions,
            max_kept_steps=self._options.max_unstored_steps,
        )
        self._call: grpc.aio.StreamStreamCall | None = None
        self.reconnects = 0

    async def __aenter__(self) -> AsyncStreamSession:
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            await self.close()
        else:
            self.detach()

    @property
    def session_id(self) -> str:
        return self._ledger.session_id

    @property
    def durable_step(self) -> int:
        """With durable sessions: the step up to which the server's state store holds this
        session (what a lost replica cannot take with it)."""
        return self._ledger.durable_step

    @property
    def resent_steps(self) -> int:
        """Timesteps sent again after a replica was lost before it stored them."""
        return self._ledger.resent_steps

    @property
    def next_step(self) -> int:
        return self._ledger.next_step

    async def step(self, x: ArrayLike) -> np.ndarray:
        """One timestep (input_size,) -> its output (output_size,)."""
        return (await self.send(np.asarray(x, dtype=np.float32).reshape(1, -1)))[0]

    async def send(self, chunk: ArrayLike, reset: bool = False) -> np.ndarray:
        """Timesteps (num_steps, input_size) -> their outputs (num_steps, output_size)."""
        await self._submit(self._ledger.add(as_rows(chunk, self.input_size), reset))
        return (await self._receive())[1]

    async def stream(
        self, chunks: Iterable[ArrayLike], window: int = 8
    ) -> AsyncIterator[np.ndarray]:
        """Send chunks as they come, up to `window` unanswered; yield each chunk's outputs."""
        for chunk in chunks:
            await self._submit(self._ledger.add(as_rows(chunk, self.input_size)))
            while len(self._ledger.pending) >= window:
                yield (await self._receive())[1]
        while self._ledger.pending:
            yield (await self._receive())[1]

    async def reset(self) -> None:
        await self.send([], reset=True)

    async def close(self) -> None:
        """End the session on the server (its state is deleted) and the stream."""
        empty = np.zeros((0, self.input_size), np.float32)
        await self._submit(self._ledger.add(empty, end_session=True))
        try:
            await self._receive()
        except LstmStreamError as err:
            if err.reason != "SESSION_NOT_FOUND":
                raise
        self.detach()

    def detach(self) -> None:
        """Close the stream only; the session stays on the server to attach to later."""
        if self._call is not None:
            self._call.cancel()
            self._call = None

    async def _submit(self, chunk: Chunk) -> None:
        if self._call is None:
            await self._open()
            return
        # A failed write shows in the read that follows, and the retry resends this chunk.
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            await self._call.write(chunk.request(self.session_id))

    async def _open(self) -> None:
        self._call = self._client.stub.StreamSteps(metadata=self._options.metadata(self.session_id))
        for chunk in self._ledger.to_send():
            try:
                await self._call.write(chunk.request(self.session_id))
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
        attempt = 0
        while True:
            try:
                accepted = self._ledger.accept(await self._read())
            except LstmStreamError as err:
                rewound = self._rewind(err)
                if not (rewound or is_retryable(err.code, err.reason)) or (
                    attempt >= self._options.max_retries
                ):
                    self.detach()
                    raise
                attempt += 1
                self.reconnects += 1
                self.detach()
                if not rewound:
                    await asyncio.sleep(self._options.backoff(attempt))
                await self._open()
                continue
            if accepted is not None:  # None: the answer to a chunk resent after a rewind
                return accepted

    def _rewind(self, err: LstmStreamError) -> bool:
        try:
            return self._ledger.rewind(err)
        except LstmStreamError:
            self.detach()
            raise


def _failed(task: asyncio.Future[Any]) -> bool:
    return task.done() and (task.cancelled() or task.exception() is not None)


def _finished_error(code: grpc.StatusCode, details: str, trailers: Any) -> grpc.RpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, details)
