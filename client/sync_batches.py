"""Many sessions per message, synchronously: `StreamingClient.step_batch` and
`StreamingClient.stream_batches` (feeder_core.py holds the logic, batching.py the bookkeeping
and the routing; this module drives it, blocking).

    with StreamingClient("localhost:50051") as client:
        result = client.step_batch({"pump-7": reading_7, "pump-9": reading_9})
        y7 = result["pump-7"]            # raises pump-7's error if its chunk was refused
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lstm_stream.client.batching import BatchResult
from lstm_stream.client.call_stream import CallStream
from lstm_stream.client.feeder_core import FeederCore
from lstm_stream.client.flows import outputs, run
from lstm_stream.client.policy import ArrayLike

if TYPE_CHECKING:
    from lstm_stream.client.sync import StreamingClient


class BatchFeeder(FeederCore):
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
        info = client.info(model, model_version)
        super().__init__(client, info, create_missing, model, model_version)

    def attach(self, session_id: str) -> None:
        """Go on feeding a session created elsewhere, from the server's next step."""
        run(self._attaching(session_id))

    def step(
        self,
        chunks: Mapping[str, ArrayLike],
        reset: Collection[str] = (),
        end: Collection[str] = (),
    ) -> BatchResult:
        """One chunk (num_steps, input_size) per session -> each session's outputs."""
        return run(self._stepping(chunks, reset, end))

    def stream(
        self, batches: Iterable[Mapping[str, ArrayLike]], window: int = 4
    ) -> Iterator[BatchResult]:
        """Send batches over StreamBatches as they come, up to `window` unanswered; yield
        each one's result, in order."""
        yield from outputs(self._streaming(batches, window))

    def _start(self, method: Any, metadata: Sequence[tuple[str, str]]) -> CallStream:
        return CallStream(method, metadata)
