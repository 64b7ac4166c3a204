"""Exactly-once bookkeeping for one session, shared by the sync and asyncio clients.

Every chunk is numbered with the step index of its first timestep (`start_step`) and kept until
its answer arrives. After a reconnect the unanswered chunks are sent again with the same numbers:
the server applies what it had not applied and answers the rest from its replay buffer, so the
caller sees each timestep's output once, in order.

With durable sessions (a server with a state store), answered chunks are kept too, until a
response's `durable_step` says the store holds them. Should the replica be lost, the replica that
continues the session has the stored state only, and refuses the next chunk as a gap naming the
step it holds; the client then resends the kept chunks from that step (their answers, given
once already, are dropped), and goes on.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import grpc
import numpy as np

from lstm_stream.client.errors import LstmStreamError
from lstm_stream.v1 import inference_pb2 as pb


@dataclass(frozen=True)
class Chunk:
    start: int
    rows: np.ndarray  # (T, input_size) float32
    reset: bool = False
    end_session: bool = False

    @property
    def end(self) -> int:
        return self.start + len(self.rows)

    def request(self, session_id: str, answered_step: int | None = None) -> pb.StreamStepsRequest:
        """answered_step: every output before it has reached the caller (with a durable server,
        so that its stored record keeps fewer outputs)."""
        return pb.StreamStepsRequest(
            session_id=session_id,
            start_step=self.start,
            packed_inputs=self.rows.astype("<f4", copy=False).tobytes(),
            reset=self.reset,
            end_session=self.end_session,
            answered_step=answered_step,
        )

    def session_chunk(self, session_id: str, answered_step: int | None = None) -> pb.SessionChunk:
        return pb.SessionChunk(
            session_id=session_id,
            start_step=self.start,
            packed_inputs=self.rows.astype("<f4", copy=False).tobytes(),
            reset=self.reset,
            end_session=self.end_session,
            answered_step=answered_step,
        )

    def missing_from(self, step: int) -> bool:
        """Whether a server whose session is at `step` lacks some of this chunk's effect (a
        reset at `step` itself may or may not be in the state stored there)."""
        return self.end > step or (self.reset and self.start >= step)

    def tail(self, step: int) -> Chunk:
        """The part from `step` on; the part before it is applied already."""
        if step <= self.start:
            return self
        return Chunk(step, self.rows[step - self.start :], False, self.end_session)


class Ledger:
    def __init__(
        self,
        session_id: str,
        output_size: int,
        next_step: int = 0,
        keep_until_durable: bool = False,
        max_kept_steps: int = 8192,
    ) -> None:
        self.session_id = session_id
        self.output_size = output_size
        self.next_step = next_step  # step index the next new timestep gets
        self.answered_step = next_step  # outputs delivered to the caller up to here
        self.pending: deque[Chunk] = deque()  # sent (or to send), unanswered
        self.keep_until_durable = keep_until_durable
        self.max_kept_steps = max_kept_steps
        self.durable_step = next_step
        self.kept: deque[Chunk] = deque()  # answered, not yet stored
        self._kept_steps = 0
        self._resending: deque[Chunk] = deque()  # kept chunks sent again; answers dropped
        self.resent_steps = 0  # timesteps applied again after a lost replica
        self.unkept_steps = 0  # answered timesteps no longer kept although not stored
        self.doomed = 0  # unanswered chunks numbered after a refused one (see refuse)

    def add(self, rows: np.ndarray, reset: bool = False, end_session: bool = False) -> Chunk:
        chunk = Chunk(self.next_step, rows, reset, end_session)
        self.pending.append(chunk)
        self.next_step += len(rows)
        return chunk

    @property
    def answered(self) -> int | None:
        """What a chunk tells a durable server: every output before this step has arrived."""
        return self.answered_step if self.keep_until_durable else None

    def to_send(self) -> list[Chunk]:
        """What a new stream carries, in order: kept chunks being resent, then every
        unanswered chunk."""
        if not self._resending:
            # A reset with no timesteps leaves the step index alone, so a successor that lost
            # it shows no gap: resend it (where it was applied, no step has followed it, and
            # zeroing again changes nothing; where steps followed, it is answered as a replay).
            self._resending = deque(c for c in self.kept if c.reset and not len(c.rows))
        return [*self._resending, *self.pending]

    def accept(self, response: pb.StreamStepsResponse) -> tuple[Chunk, np.ndarray] | None:
        """Match a response to the oldest chunk awaiting one; that chunk and its outputs, or
        None for the answer to a resent chunk whose outputs the caller has had."""
        if self.keep_until_durable:
            self._stored(response.durable_step)
        if self._resending:
            chunk = self._resending.popleft()
            _check(response, chunk)
            self.resent_steps += len(chunk.rows)
            return None
        chunk = self.pending.popleft()
        _check(response, chunk)
        self.doomed = max(self.doomed - 1, 0)
        outputs = decode_outputs(response, self.output_size)
        self.answered_step = chunk.end
        if self.keep_until_durable and not chunk.end_session:
            self._keep(chunk)
        return chunk, outputs

    def refuse(self) -> Chunk:
        """The oldest unanswered chunk was refused: the server applied none of it. New chunks
        are numbered from where it began; chunks sent after it, numbered past it, are doomed
        (the server will refuse them as a gap)."""
        chunk = self.pending.popleft()
        if self.doomed:
            self.doomed -= 1
        elif len(chunk.rows):
            self.doomed = len(self.pending)
            self.next_step = chunk.start
        return chunk

    def drop_refused(self, error: LstmStreamError) -> None:
        """A stream's oldest unanswered chunk was refused as bad input, which ends the stream:
        the server applied neither it nor any chunk sent after it. They are dropped (the caller
        has the error), and new chunks are numbered from where the refused one began; kept,
        they would be resent, and refused, on every later call."""
        if error.reason != "BAD_INPUT" or self._resending or not self.pending:
            return
        self.next_step = self.pending[0].start
        self.pending.clear()

    def rewind(self, error: LstmStreamError) -> bool:
        """After a gap refusal (STEP_OUT_OF_ORDER naming the step the server holds): whether
        resending the kept chunks from that step continues the session. A server behind what
        this client still keeps lost answered steps the client no longer has: DATA_LOSS."""
        if not self.keep_until_durable or error.reason != "STEP_OUT_OF_ORDER":
            return False
        try:
            step = int(error.metadata["expected_step"])
        except (KeyError, ValueError):
            return False
        first_unsent = self.pending[0].start if self.pending else self.next_step
        if step >= first_unsent:
            return False  # not a rewind: the server is not behind what was answered
        held_from = self.kept[0].start if self.kept else first_unsent
        if step < held_from:
            raise LstmStreamError(
                grpc.StatusCode.DATA_LOSS,
                f"session {self.session_id!r}: the server holds it up to step {step}, but steps "
                f"{step}..{held_from - 1} were answered and not yet stored when its replica was "
                f"lost, and this client no longer keeps them (ClientOptions.max_unstored_steps)",
                reason="STATE_LOST",
                metadata={"expected_step": step, "kept_from": held_from},
            )
        self._resending = deque(c.tail(step) for c in self.kept if c.missing_from(step))
        return True

    def _keep(self, chunk: Chunk) -> None:
        if not chunk.missing_from(self.durable_step):
            return
        self.kept.append(chunk)
        self._kept_steps += len(chunk.rows)
        while self._kept_steps > self.max_kept_steps:  # the store is far behind (or down)
            dropped = self.kept.popleft()
            self._kept_steps -= len(dropped.rows)
            self.unkept_steps += len(dropped.rows)

    def _stored(self, durable_step: int) -> None:
        self.durable_step = max(self.durable_step, durable_step)
        while self.kept and not self.kept[0].missing_from(self.durable_step):
            self._kept_steps -= len(self.kept.popleft().rows)


def decode_outputs(response: pb.StreamStepsResponse | pb.ChunkResult, width: int) -> np.ndarray:
    """A response's outputs (num_steps, width), from packed bytes or repeated floats."""
    if response.packed_outputs:
        flat = np.frombuffer(response.packed_outputs, dtype="<f4")
    else:
        flat = np.asarray(response.outputs, dtype=np.float32)
    return flat.reshape(response.num_steps, width).copy()  # writable, the caller's own


def _check(response: pb.StreamStepsResponse | pb.ChunkResult, chunk: Chunk) -> None:
    if response.start_step != chunk.start or response.num_steps != len(chunk.rows):
        raise RuntimeError(
            f"response for steps {response.start_step}+{response.num_steps} does not answer "
            f"the chunk at {chunk.start}+{len(chunk.rows)}"
        )
