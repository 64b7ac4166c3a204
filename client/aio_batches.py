"""Many sessions per message, for asyncio code: `AsyncStreamingClient.step_batch` and
`AsyncStreamingClient.stream_batches`; the same logic as the sync client (feeder_core.py),
awaited.

    async with AsyncStreamingClient("localhost:50051") as client:
        result = await client.step_batch({"pump-7": reading_7, "pump-9": reading_9})
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from lstm_stream.client.aio_call_stream import AsyncCallStream
from lstm_stream.client.batching import BatchResult
from lstm_stream.client.feeder_core import FeederCore
from lstm_stream.client.flows import aoutputs, arun
from lstm_stream.client.policy import ArrayLike
from lstm_stream.v1 import inference_pb2 as pb

if TYPE_CHECKING:
    from lstm_stream.client.aio import AsyncStreamingClient


class AsyncBatchFeeder(FeederCore):
    """Feeds many sessions by batch calls (`AsyncStreamingClient.batches()`)."""

    def __init__(
        self,
        client: AsyncStreamingClient,
        info: pb.GetModelInfoResponse,
        model: str = "",
        model_version: int = 0,
    ) -> None:
        """Sessions of one model version, `info` its description (see BatchFeeder)."""
        super().__init__(client, info, True, model, model_version)

    async def attach(self, session_id: str) -> None:
        """Go on feeding a session created elsewhere, from the server's next step."""
        await arun(self._attaching(session_id))

    async def step(
        self,
        chunks: Mapping[str, ArrayLike],
        reset: Collection[str] = (),
        end: Collection[str] = (),
    ) -> BatchResult:
        """One chunk (num_steps, input_size) per session -> each session's outputs."""
        return await arun(self._stepping(chunks, reset, end))

    async def stream(
        self, batches: Iterable[Mapping[str, ArrayLike]], window: int = 4
    ) -> AsyncIterator[BatchResult]:
        """Send batches over StreamBatches as they come, up to `window` unanswered; yield
        each one's result, in order."""
        async with aclosing(aoutputs(self._streaming(batches, window))) as results:
            async for result in results:
                yield result

    def _start(self, method: Any, metadata: Sequence[tuple[str, str]]) -> AsyncCallStream:
        return AsyncCallStream(method, metadata)
