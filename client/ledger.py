"""Exactly-once bookkeeping for one session, shared by the sync and asyncio clients.

Every chunk is numbered with the step index of its first timestep (`start_step`) and kept until
its answer arrives. After a reconnect the unanswered chunks are sent again with the same numbers:
the server applies what it had not applied and answers the rest from its replay buffer, so the
caller sees each timestep's output once, in order.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from lstm_stream.v1 import inference_pb2 as pb


@dataclass(frozen=True)
class Chunk:
    start: int
    rows: np.ndarray  # (T, input_size) float32
    reset: bool = False
    end_session: bool = False

    def request(self, session_id: str) -> pb.StreamStepsRequest:
        return pb.StreamStepsRequest(
            session_id=session_id,
            start_step=self.start,
            inputs=self.rows.ravel().tolist(),
            reset=self.reset,
            end_session=self.end_session,
        )


class Ledger:
    def __init__(self, session_id: str, output_size: int, next_step: int = 0) -> None:
        self.session_id = session_id
        self.output_size = output_size
        self.next_step = next_step  # step index the next new timestep gets
        self.answered_step = next_step  # outputs delivered to the caller up to here
        self.pending: deque[Chunk] = deque()

    def add(self, rows: np.ndarray, reset: bool = False, end_session: bool = False) -> Chunk:
        chunk = Chunk(self.next_step, rows, reset, end_session)
        self.pending.append(chunk)
        self.next_step += len(rows)
        return chunk

    def accept(self, response: pb.StreamStepsResponse) -> tuple[Chunk, np.ndarray]:
        """Match a response to the oldest unanswered chunk; that chunk and its outputs."""
        chunk = self.pending.popleft()
        if response.start_step != chunk.start or response.num_steps != len(chunk.rows):
            raise RuntimeError(
                f"response for steps {response.start_step}+{response.num_steps} does not answer "
                f"the chunk at {chunk.start}+{len(chunk.rows)}"
            )
        outputs = np.asarray(response.outputs, dtype=np.float32).reshape(
            response.num_steps, self.output_size
        )
        self.answered_step = chunk.start + len(chunk.rows)
        return chunk, outputs
