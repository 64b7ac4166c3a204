"""The asyncio client: the same shape as the synchronous one (client/sync.py), awaitable.

async with AsyncStreamingClient("localhost:50051") as client:
    async with client.open_session() as session:
        y = await session.step(x)

The logic is in client_core.py and session_core.py; this module drives it, awaiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Collection,
    Generator,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import aclosing
from typing import Any

import grpc
import numpy as np

from lstm_stream.client.aio_batches import AsyncBatchFeeder
from lstm_stream.client.aio_call_stream import AsyncCallStream
from lstm_stream.client.batching import BatchResult
from lstm_stream.client.client_core import ClientCore, open_channel
from lstm_stream.client.flows import aoutputs, arun
from lstm_stream.client.options import ClientOptions
from lstm_stream.client.policy import ArrayLike
from lstm_stream.client.session_core import SessionCore
from lstm_stream.v1 import inference_pb2 as pb


def make_channel(options: ClientOptions) -> grpc.aio.Channel:
    return open_channel(options, grpc.aio)


class AsyncStreamingClient(ClientCore):
    """A connection to lstm-serve for asyncio code; sessions share the channel."""

    def __init__(self, target: str | None = None, options: ClientOptions | None = None) -> None:
        super().__init__(target, options, make_channel)
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
        return await arun(self._unary(method, request, session_id))

    async def info(self, model: str = "", model_version: int = 0) -> pb.GetModelInfoResponse:
        """A model version's description ('' and 0: the default model's newest ready version),
        asked once each: sessions opened at once share one call."""
        key = (model, model_version)
        if key not in self._info or _failed(self._info[key]):
            fetching = self._fetching_info(model, model_version)
            self._info[key] = asyncio.ensure_future(arun(fetching))
        return await asyncio.shield(self._info[key])

    async def list_models(self) -> pb.ListModelsResponse:
        """Every model the server holds, each version with its state and live sessions."""
        return await arun(self._listing_models())

    def open_session(
        self, session_id: str | None = None, model: str = "", model_version: int = 0
    ) -> Opening:
        """Create a session (a new unguessable id unless one is given) on a model version ('' and
        0: the default model's newest ready version): `await` it, or use it as `async with
        client.open_session() as session` (closed at the end)."""
        return Opening(arun(self._opening(session_id, model, model_version)))

    def attach(self, session_id: str) -> Opening:
        """Continue an existing session from the server's next step (await it, or `async
        with`)."""
        return Opening(arun(self._attaching(session_id)))

    def _new_session(self, **placed: Any) -> AsyncStreamSession:
        return AsyncStreamSession(self, **placed)

    async def get_session(self, session_id: str) -> pb.Session:
        return await arun(self._getting_session(session_id))

    async def delete_session(self, session_id: str) -> None:
        await arun(self._deleting_session(session_id))

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
        """A whole sequence (T, input_size) from zero state -> outputs (T, output_size)."""
        return await arun(self._predicting(inputs, model, model_version))


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
    """One session, fed through a stream that is reopened whenever the connection drops.
    `AsyncStreamSession(client, info, session_id, next_step=0, model="", model_version=0)`."""

    async def __aenter__(self) -> AsyncStreamSession:
        return self

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        """The block's end ends the session; see SessionCore._exiting."""
        await arun(self._exiting(exc))

    async def step(self, x: ArrayLike) -> np.ndarray:
        """One timestep (input_size,) -> its output (output_size,)."""
        return await arun(self._stepping(x))

    async def send(self, chunk: ArrayLike, reset: bool = False) -> np.ndarray:
        """Timesteps (num_steps, input_size) -> their outputs (num_steps, output_size)."""
        return await arun(self._sending(chunk, reset))

    async def stream(
        self, chunks: Iterable[ArrayLike], window: int = 8
    ) -> AsyncIterator[np.ndarray]:
        """Send chunks as they come, up to `window` unanswered; yield each chunk's outputs."""
        async with aclosing(aoutputs(self._streaming(chunks, window))) as outputs:
            async for output in outputs:
                yield output

    async def reset(self) -> None:
        """Zero the session's state; its step index keeps counting."""
        await self.send([], reset=True)

    async def close(self) -> None:
        """End the session on the server (its state is deleted) and the stream."""
        await arun(self._closing())

    def _start(self, method: Any, metadata: Sequence[tuple[str, str]]) -> AsyncCallStream:
        return AsyncCallStream(method, metadata)


def _failed(task: asyncio.Future[Any]) -> bool:
    return task.done() and (task.cancelled() or task.exception() is not None)
