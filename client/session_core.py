"""What a sync and an asyncio session share: the ledger of chunks and what it tells the caller.
The subclasses add only the transport (a thread-fed stream, or an asyncio call)."""

from __future__ import annotations

import numpy as np

from lstm_stream.client.errors import LstmStreamError, not_ended
from lstm_stream.client.ledger import Chunk, Ledger
from lstm_stream.client.options import ClientOptions
from lstm_stream.client.policy import ArrayLike, as_rows
from lstm_stream.v1 import inference_pb2 as pb


def placement(session: pb.Session, model: str, model_version: int) -> tuple[str, int]:
    """The model version whose sizes a session takes: where the server says it lives, else what
    was asked for (a server that does not say serves one model)."""
    if session.model:
        return session.model, session.model_version
    return model, model_version


class SessionCore:
    def __init__(
        self,
        options: ClientOptions,
        info: pb.GetModelInfoResponse,
        session_id: str,
        next_step: int = 0,
        model: str = "",
        model_version: int = 0,
    ) -> None:
        self._options = options
        # Where the server says the session lives ('' and 0 where it did not say).
        self.model, self.model_version = model, model_version
        self.input_size, self.output_size = info.input_size, info.output_size
        self._ledger = Ledger(
            session_id,
            info.output_size,
            next_step,
            keep_until_durable=info.durable_sessions,
            max_kept_steps=options.max_unstored_steps,
        )
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

    # How a `with` block's end ends the session, in both SDKs: closed when the block ran to
    # its end; deleted, without waiting for unanswered chunks, when it raised (or the close
    # failed); left alone when detached or closed inside the block.

    def _leave_after(self, exc: BaseException | None) -> bool:
        """Detach; whether to leave the session (another stream took it over) rather than
        delete it."""
        self.detach()
        return isinstance(exc, LstmStreamError) and exc.reason == "SESSION_TAKEN_OVER"

    def _not_ended(self, exc: BaseException | None, err: Exception) -> None:
        """Deleting failed with `err`: fine if it is gone already; else the block's own
        exception says so in a note (or, with none, `err` is raised)."""
        if isinstance(err, LstmStreamError) and err.reason == "SESSION_NOT_FOUND":
            return
        if exc is None:
            raise err
        exc.add_note(not_ended(self.session_id, err))

    def _close_stream(self) -> None:
        raise NotImplementedError

    def _chunk(self, chunk: ArrayLike, reset: bool = False) -> Chunk:
        return self._ledger.add(as_rows(chunk, self.input_size), reset)

    def _end_chunk(self) -> Chunk:
        return self._ledger.add(np.zeros((0, self.input_size), np.float32), end_session=True)

    def _rewind(self, err: LstmStreamError) -> bool:
        """Whether a refusal asks for kept chunks to be resent (see Ledger.rewind)."""
        try:
            return self._ledger.rewind(err)
        except LstmStreamError:
            self._close_stream()
            raise
