"""The synchronous client: StreamingClient and the sessions it opens.

    with StreamingClient("localhost:50051") as client, client.open_session() as session:
        for x in readings:
            y = session.step(x)          # this timestep's output, at once

A session survives dropped connections: unanswered chunks are resent with their step numbers
after a reconnect (with backoff), so each output is seen once and in order. The logic is in
client_core.py and session_core.py; this module drives it, blocking.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc
import numpy as np

from lstm_stream.client.batching import BatchResult
from lstm_stream.client.call_stream import CallStream
from lstm_stream.client.client_core import ClientCore, open_channel
from lstm_stream.client.flows import outputs, run
from lstm_stream.client.options import ClientOptions
from lstm_stream.client.policy import ArrayLike
from lstm_stream.client.session_core import SessionCore
from lstm_stream.client.sync_batches import BatchFeeder
from lstm_stream.v1 import inference_pb2 as pb


def make_channel(options: ClientOptions) -> grpc.Channel:
    return open_channel(options, grpc)


class StreamingClient(ClientCore):
    """A connection to lstm-serve. `target` or full `options`; sessions share the channel."""

    def __init__(self, target: str | None = None, options: ClientOptions | None = None) -> None:
        super().__init__(target, options, make_channel)
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
        return run(self._unary(method, request, session_id))

    def info(self, model: str = "", model_version: int = 0) -> pb.GetModelInfoResponse:
        """A served model version (sizes, labels, device); '' and 0: the default model's newest
        ready version. Fetched once each."""
        key = (model, model_version)
        if key not in self._info:
            self._info[key] = run(self._fetching_info(model, model_version))
        return self._info[key]

    def list_models(self) -> pb.ListModelsResponse:
        """Every model the server holds, each version with its state and live sessions."""
        return run(self._listing_models())

    def open_session(
        self, session_id: str | None = None, model: str = "", model_version: int = 0
    ) -> StreamSession:
        """Create a session (with a new unguessable id unless one is given) on a model version
        ('' and 0: the default model's newest ready version) and return it."""
        return run(self._opening(session_id, model, model_version))

    def attach(self, session_id: str) -> StreamSession:
        """Continue an existing session from the server's next step, on its own model."""
        return run(self._attaching(session_id))

    def _new_session(self, **placed: Any) -> StreamSession:
        return StreamSession(self, **placed)

    def get_session(self, session_id: str) -> pb.Session:
        return run(self._getting_session(session_id))

    def delete_session(self, session_id: str) -> None:
        run(self._deleting_session(session_id))

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
        return run(self._predicting(inputs, model, model_version))


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
        super().__init__(client, info, session_id, next_step, model, model_version)

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        """The block's end ends the session; see SessionCore._exiting."""
        run(self._exiting(exc))

    def step(self, x: ArrayLike) -> np.ndarray:
        """One timestep (input_size,) -> its output (output_size,)."""
        return run(self._stepping(x))

    def send(self, chunk: ArrayLike, reset: bool = False) -> np.ndarray:
        """Timesteps (num_steps, input_size) -> their outputs (num_steps, output_size)."""
        return run(self._sending(chunk, reset))

    def stream(self, chunks: Iterable[ArrayLike], window: int = 8) -> Iterator[np.ndarray]:
        """Send chunks as they come, up to `window` unanswered; yield each chunk's outputs."""
        yield from outputs(self._streaming(chunks, window))

    def reset(self) -> None:
        """Zero the session's state; its step index keeps counting."""
        self.send([], reset=True)

    def close(self) -> None:
        """End the session on the server (its state is deleted) and the stream."""
        run(self._closing())

    def _start(self, method: Any, metadata: Sequence[tuple[str, str]]) -> CallStream:
        return CallStream(method, metadata)
