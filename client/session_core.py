"""One session, written once for StreamSession and AsyncStreamSession: its ledger of chunks and
the flows (flows.py) of sending, streaming, resuming after a failure and ending. A surface adds
only the stream it opens (`_start`) and how it drives the flows (blocking, or awaiting)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from lstm_stream.client.errors import LstmStreamError, not_ended
from lstm_stream.client.flows import Call, Flow, Output, Sleep
from lstm_stream.client.ledger import Chunk, Ledger
from lstm_stream.client.policy import ArrayLike, StreamRetry, as_rows
from lstm_stream.v1 import inference_pb2 as pb


class SessionCore:
    def __init__(
        self,
        client: Any,
        info: pb.GetModelInfoResponse,
        session_id: str,
        next_step: int = 0,
        model: str = "",
        model_version: int = 0,
    ) -> None:
        self._client = client
        self._options = client.options
        # Where the server says the session lives ('' and 0 where it did not say).
        self.model, self.model_version = model, model_version
        self.input_size, self.output_size = info.input_size, info.output_size
        self._ledger = Ledger(
            session_id,
            info.output_size,
            next_step,
            keep_until_durable=info.durable_sessions,
            max_kept_steps=self._options.max_unstored_steps,
        )
        self._stream: Any = None  # the surface's stream (see _start), while one is open
        self.reconnects = 0  # streams reopened after a failure

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
        """Step index of the next timestep this session will send."""
        return self._ledger.next_step

    _released = False  # detached or closed: a `with` block's end leaves it alone

    def detach(self) -> str:
        """Close the stream only; the session stays on the server to attach to later (and
        past the end of a `with` block). Returns its id (what `attach` takes)."""
        self._released = True
        self._close_stream()
        return self.session_id

    def _start(self, method: Any, metadata: Sequence[tuple[str, str]]) -> Any:
        """Open a StreamSteps call: an object with `write(request)`, `read(timeout)` (raising
        LstmStreamError) and `close()`."""
        raise NotImplementedError

    def _close_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def _stepping(self, x: ArrayLike) -> Flow[np.ndarray]:
        return (yield from self._sending(np.asarray(x, dtype=np.float32).reshape(1, -1)))[0]

    def _sending(self, chunk: ArrayLike, reset: bool = False) -> Flow[np.ndarray]:
        yield from self._submitting(self._chunk(chunk, reset))
        return (yield from self._receiving())[1]

    def _streaming(self, chunks: Iterable[ArrayLike], window: int) -> Flow[None]:
        """Send chunks as they come, up to `window` unanswered; hand out each one's outputs."""
        for chunk in chunks:
            yield from self._submitting(self._chunk(chunk))
            while len(self._ledger.pending) >= window:
                yield Output((yield from self._receiving())[1])
        while self._ledger.pending:
            yield Output((yield from self._receiving())[1])

    def _closing(self) -> Flow[None]:
        """End the session on the server (its state is deleted) and the stream."""
        yield from self._submitting(self._end_chunk())
        try:
            yield from self._receiving()
        except LstmStreamError as err:
            if err.reason != "SESSION_NOT_FOUND":  # a resent end after the first one worked
                raise
        self.detach()

    def _exiting(self, exc: BaseException | None) -> Flow[None]:
        """The end of a `with` block ends the session, whether the block ran to its end or
        raised; `detach()` (or `close()`) inside it leaves the session as it is. After an
        exception the session is deleted without waiting for unanswered chunks (a session
        another stream took over is left to it); if that fails (the connection is gone), the
        block's own exception is raised, with a note saying so."""
        if self._released:
            return
        if exc is None:
            try:
                yield from self._closing()
                return
            except LstmStreamError:
                pass  # e.g. a chunk the server refused is unanswered still: delete instead
        self.detach()
        if isinstance(exc, LstmStreamError) and exc.reason == "SESSION_TAKEN_OVER":
            return  # the stream that took it over goes on with it
        try:
            yield Call(self._client.delete_session, self.session_id)
        except Exception as err:
            if isinstance(err, LstmStreamError) and err.reason == "SESSION_NOT_FOUND":
                return  # gone already
            if exc is None:
                raise
            exc.add_note(not_ended(self.session_id, err))

    def _chunk(self, chunk: ArrayLike, reset: bool = False) -> Chunk:
        return self._ledger.add(as_rows(chunk, self.input_size), reset)

    def _end_chunk(self) -> Chunk:
        return self._ledger.add(np.zeros((0, self.input_size), np.float32), end_session=True)

    def _submitting(self, chunk: Chunk) -> Flow[None]:
        if self._stream is None:
            yield from self._reopening()  # sends every pending chunk, this one included
        else:
            yield Call(self._stream.write, chunk.request(self.session_id, self._ledger.answered))

    def _reopening(self) -> Flow[None]:
        """A new stream, carrying every chunk still to send. A failed write shows in the read
        that follows, and the retry sends the chunk again."""
        stub = self._client.stub
        self._stream = self._start(stub.StreamSteps, self._options.metadata(self.session_id))
        for chunk in self._ledger.to_send():
            yield Call(self._stream.write, chunk.request(self.session_id, self._ledger.answered))

    def _receiving(self) -> Flow[tuple[Chunk, np.ndarray]]:
        """The next chunk answered, and its outputs; after a failure, the stream is reopened
        with backoff and the unanswered chunks are sent again."""
        retry = StreamRetry(self._options)
        while True:
            try:
                assert self._stream is not None
                response = yield Call(self._stream.read, self._options.deadline_s)
                accepted = self._ledger.accept(response)
            except LstmStreamError as err:
                wait = retry.backoff_after(err, rewound=self._rewind(err))
                self._close_stream()
                if wait is None:
                    self._ledger.drop_refused(err)
                    raise
                self.reconnects += 1
                yield Sleep(wait)
                yield from self._reopening()
                continue
            if accepted is not None:  # None: the answer to a chunk resent after a rewind
                return accepted

    def _rewind(self, err: LstmStreamError) -> bool:
        """Whether a refusal asks for kept chunks to be resent (see Ledger.rewind)."""
        try:
            return self._ledger.rewind(err)
        except LstmStreamError:
            self._close_stream()
            raise
