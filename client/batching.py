"""Many sessions per message (StepBatch / StreamBatches): what the sync and asyncio clients share.

Every session fed by batches has its own Ledger (ledger.py), as a StreamSession does: each chunk
is numbered with its start_step and kept until answered, so after a lost connection the
unanswered chunks are sent again and the server applies each timestep once. A session id this
client has not fed before is a new session at step 0 (created by `create_missing`); to go on
with a session fed elsewhere, `attach` it first.

Routing behind a balancer: with `ClientOptions.partitions = P`, a session belongs to partition
`crc32(session_id) % P`, every call for it (batch or not) carries `x-lstm-partition`, and one
batch message holds the sessions of one partition only. The balancer hashes that header, so a
session stays on one replica whatever call feeds it.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field

import grpc
import numpy as np
from google.rpc import error_details_pb2

from lstm_stream.client.errors import BadInputError, LstmStreamError
from lstm_stream.client.ledger import Chunk, Ledger
from lstm_stream.client.options import ClientOptions, is_retryable
from lstm_stream.client.policy import ArrayLike, as_rows
from lstm_stream.v1 import inference_pb2 as pb

NOT_FOUND = grpc.StatusCode.NOT_FOUND
Item = tuple[str, Chunk]  # a session's chunk, as sent


def partition_of(session_id: str, partitions: int) -> int:
    """The routing partition of a session: crc32 of its UTF-8 id, modulo the partition count."""
    return zlib.crc32(session_id.encode()) % partitions


@dataclass
class BatchResult(Mapping[str, np.ndarray]):
    """Each session's outputs (num_steps, output_size), in the order the chunks were given;
    `result[session_id]` raises that session's error instead when its chunk was refused (it
    changed nothing on the server)."""

    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    errors: dict[str, LstmStreamError] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)

    def __getitem__(self, session_id: str) -> np.ndarray:
        if session_id in self.errors:
            raise self.errors[session_id]
        return self.outputs[session_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)

    @property
    def complete(self) -> bool:
        return len(self.outputs) + len(self.errors) == len(self.order)


def chunk_error(status) -> LstmStreamError:
    """A ChunkResult's google.rpc.Status as the error a call would have raised."""
    reason, metadata = "", {}
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
    code = next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)
    return LstmStreamError(code, status.message, reason, metadata)


class BatchBook:
    """The ledgers of every session this client feeds by batches, and the results owed."""

    def __init__(
        self,
        options: ClientOptions,
        info: pb.GetModelInfoResponse,
        model: str = "",
        model_version: int = 0,
    ) -> None:
        self.options = options
        self.model, self.model_version = model, model_version  # what every message names
        self.input_size, self.output_size = info.input_size, info.output_size
        self.durable = info.durable_sessions
        self.max_chunks = info.max_batch_chunks or 4096
        self.ledgers: dict[str, Ledger] = {}
        self._owed: dict[int, tuple[BatchResult, str]] = {}  # id(chunk) -> where its answer goes

    def attach(self, session_id: str, next_step: int) -> None:
        """Go on with a session from `next_step` (what GetSession says)."""
        self.ledgers[session_id] = self._ledger(session_id, next_step)

    def add(
        self,
        chunks: Mapping[str, ArrayLike],
        reset: Collection[str] = (),
        end: Collection[str] = (),
    ) -> tuple[BatchResult, list[Item]]:
        """Number the chunks in their sessions' ledgers; the result they will fill, and the
        items to send."""
        result = BatchResult(order=list(chunks))
        items = []
        # Every chunk checked before any is numbered: a refused batch leaves no ledger fed.
        shaped = {}
        for session_id, rows in chunks.items():
            try:
                shaped[session_id] = as_rows(rows, self.input_size)
            except BadInputError as err:
                raise BadInputError(f"session {session_id!r}: {err.details}") from None
        for session_id, rows in shaped.items():
            ledger = self.ledgers.get(session_id) or self._ledger(session_id, 0)
            self.ledgers[session_id] = ledger
            chunk = ledger.add(rows, session_id in reset, session_id in end)
            self._owed[id(chunk)] = (result, session_id)
            items.append((session_id, chunk))
        return result, items

    def _ledger(self, session_id: str, next_step: int) -> Ledger:
        return Ledger(
            session_id,
            self.output_size,
            next_step,
            keep_until_durable=self.durable,
            max_kept_steps=self.options.max_unstored_steps,
        )

    def requests(self, items: list[Item]) -> list[tuple[str, list[Item]]]:
        """Items grouped into messages: by partition (its metadata value, '' when off), at most
        max_batch_chunks each."""
        groups: dict[str, list[Item]] = {}
        partitions = self.options.partitions
        for item in items:
            key = str(partition_of(item[0], partitions)) if partitions else ""
            groups.setdefault(key, []).append(item)
        return [
            (key, group[i : i + self.max_chunks])
            for key, group in groups.items()
            for i in range(0, len(group), self.max_chunks)
        ]

    def message(self, items: list[Item], create_missing: bool) -> pb.StepBatchRequest:
        return pb.StepBatchRequest(
            chunks=[
                chunk.session_chunk(session_id, self.ledgers[session_id].answered)
                for session_id, chunk in items
            ],
            create_missing=create_missing,
            model=self.model,
            model_version=self.model_version,
        )

    def resend_rounds(self, session_ids: Collection[str]) -> list[list[Item]]:
        """What the given sessions must send again, as messages of one chunk per session: the
        n-th message holds each session's n-th chunk still to send."""
        queues = [
            [(sid, chunk) for chunk in self.ledgers[sid].to_send()]
            for sid in session_ids
            if sid in self.ledgers
        ]
        depth = max((len(q) for q in queues), default=0)
        if not depth:  # every unanswered chunk is in a ledger: nothing to send is a bug
            raise RuntimeError(f"answers owed to {len(session_ids)} sessions with nothing to send")
        return [[q[n] for q in queues if n < len(q)] for n in range(depth)]

    def settle(
        self, items: list[Item], response: pb.StepBatchResponse
    ) -> dict[str, LstmStreamError]:
        """Apply a response to the ledgers and fill the results owed; the sessions that must
        send again (a retryable refusal, or a new replica behind what was answered), each
        with the error that says so."""
        if len(response.results) != len(items):
            raise RuntimeError(
                f"StepBatch answered {len(response.results)} results for {len(items)} chunks"
            )
        again: dict[str, LstmStreamError] = {}
        for (session_id, _), result in zip(items, response.results, strict=True):
            ledger = self.ledgers.get(session_id)
            if ledger is None:
                continue  # an answer to a session this client has given up on
            if result.HasField("error"):
                err = chunk_error(result.error)
                if self._refused(ledger, err):
                    again[session_id] = err
                continue
            accepted = ledger.accept(result)
            if accepted is not None:
                chunk, outputs = accepted
                self._deliver(chunk, outputs)
                if chunk.end_session:
                    ended = f"session {session_id!r} was ended by an earlier chunk"
                    self._drop(session_id, LstmStreamError(NOT_FOUND, ended, "SESSION_NOT_FOUND"))
        return again

    def _refused(self, ledger: Ledger, err: LstmStreamError) -> bool:
        """Whether the session must send again; otherwise its oldest chunk is refused."""
        if not ledger.doomed and (ledger.rewind(err) or is_retryable(err.code, err.reason)):
            return True
        chunk = ledger.refuse()
        self._deliver(chunk, err)
        if err.reason == "SESSION_NOT_FOUND" or chunk.end_session:
            self._drop(ledger.session_id, err)  # a later chunk starts a new session
        return False

    def _drop(self, session_id: str, err: LstmStreamError) -> None:
        """Forget a session that is gone; its chunks still unanswered get `err`."""
        ledger = self.ledgers.pop(session_id, None)
        for chunk in ledger.pending if ledger is not None else ():
            self._deliver(chunk, err)

    def _deliver(self, chunk: Chunk, answer: np.ndarray | LstmStreamError) -> None:
        owed = self._owed.pop(id(chunk), None)
        if owed is None:
            return
        result, session_id = owed
        if isinstance(answer, LstmStreamError):
            result.errors[session_id] = answer
        else:
            result.outputs[session_id] = answer

    @staticmethod
    def unanswered(results: list[BatchResult]) -> set[str]:
        """Sessions some result still waits for."""
        return {
            sid for r in results for sid in r.order if sid not in r.outputs and sid not in r.errors
        }
