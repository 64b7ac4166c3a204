"""The one step path. However work arrives (a StreamSteps message, a StepBatch or StreamBatches
message, an Open Inference Protocol request), it is a message of chunks, each for one session,
and goes through three stages, each written once, here (a stateless Predict too: its plan is
the limits alone, and it commits nothing):

plan    Under the session's lock, taken here: the limits (draining, an ended session, a stream
        that lost its session to another, the rate limit) and the step rule (start_step: steps
        already applied are answered from the replay ring, a gap is refused). The result is a
        Row: the work for one slot.
run     The batcher (server/batcher.py) decides what runs next and the engine runs it; neither
        knows these rules.
commit  Called by the batcher when a batch is done, before anything else can run: the outputs
        go to the replay rings, `next_step` moves, the state store is told what changed, and
        the lock taken in plan is released. A failed batch changes nothing and releases too.

A StreamSteps message is a message of one chunk whose stream must still own its session. The
chunks of a batch message are planned together, their locks taken in (version, slot) order, and
queued as one batcher entry, so they run in one batch where they fit; a refused chunk gets its
own error and leaves the others alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from server import metrics
from server.batcher import Row
from server.engine import StepOutputs, StepWork
from server.errors import (
    BadInput,
    ServiceError,
    SessionExists,
    SessionNotFound,
    SessionTakenOver,
)
from server.sessions import NO_OUTPUTS, Attachment, ReplayPool, Session, plan_chunk

if TYPE_CHECKING:
    from server.models import ModelVersion
    from server.runtime import Runtime
    from server.state_store import StateStore

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class ChunkRequest:
    """A decoded chunk of one session; planning and applying it fill in the rest, and an
    answered chunk is its own answer (`outputs`, from step `first`)."""

    session_id: str
    inputs: np.ndarray  # (T, input_size) float32
    start_step: int | None = None
    reset: bool = False
    end_session: bool = False
    answered_step: int = 0  # the client has every output before this step (0: not said)
    index: int = 0  # position in the message
    session: Session | None = None
    stream: Attachment | None = None  # a StreamSteps chunk: the stream that must own the session
    first: int = 0  # step index of the first output row
    replayed: np.ndarray = field(default_factory=lambda: NO_OUTPUTS)  # (R, O) from replay
    row: Row | None = None  # the work to run, if any
    outputs: np.ndarray = field(default_factory=lambda: NO_OUTPUTS)  # (T, O) once answered
    ending: asyncio.Future[None] | None = None  # this chunk ends its session: done when over


Outcome = ChunkRequest | ServiceError


# Plan


def plan(runtime: Runtime, item: ChunkRequest) -> None:
    """Decide what the chunk does; its session's lock is held."""
    session = item.session
    assert session is not None
    runtime.refuse_if_draining()
    if session.closed or session.ending is not None:  # ended, or another message ends it
        raise SessionNotFound(session.session_id)
    if item.stream is not None and session.owner is not item.stream:
        raise SessionTakenOver(session.session_id)
    start = session.next_step
    if item.start_step is None or item.start_step == start:  # the usual: nothing replayed
        new, reset = item.inputs, item.reset  # (a batch plans a thousand of these a message)
    else:
        output_size = session.model.config.output_size
        chunk = plan_chunk(session, item.start_step, item.inputs, item.reset, output_size)
        new, start, reset, item.replayed = chunk.new, chunk.new_start, chunk.reset, chunk.replayed
    runtime.rate_limiter.take(session.principal, len(new))
    runtime.sessions.touch(session)
    session.note_answered(item.answered_step)
    item.first = start - len(item.replayed)
    if len(new) or reset:
        item.row = Row(session, StepWork(session.slot, new, reset), start)
    if item.end_session:
        item.ending = session.ending = asyncio.get_running_loop().create_future()


async def _lock_all(items: list[ChunkRequest]) -> None:
    """Take the items' sessions' locks in (version, slot) order: two messages naming the same
    sessions cannot each hold one the other waits for. Cancelled, it gives back what it took."""
    items.sort(key=_slot)
    taken: list[ChunkRequest] = []
    try:
        for item in items:
            await item.session.lock.acquire()  # type: ignore[union-attr]
            taken.append(item)
    except BaseException:
        for item in taken:
            item.session.lock.release()  # type: ignore[union-attr]
        raise


def _plan_locked(
    runtime: Runtime, held: list[ChunkRequest], outcomes: list[Outcome | None]
) -> list[Row]:
    """Plan each locked item (a refusal into outcomes); the rows to run. An item with nothing
    to run gives its lock back now; the others' go back at commit. No await in here: nothing
    can interleave between the plans and their hand-over to the batchers."""
    rows = []
    for item in held:
        try:
            plan(runtime, item)
        except ServiceError as err:
            outcomes[item.index] = err
        except Exception as exc:  # a bug: this chunk fails, its lock still goes back
            log.exception("planning a chunk of session %s failed", item.session_id[:6])
            outcomes[item.index] = ServiceError(
                f"planning this chunk failed: {type(exc).__name__}: {exc}"
            )
            item.row = None
        if item.row is None:
            item.session.lock.release()  # type: ignore[union-attr]
        else:
            rows.append(item.row)
    return rows


def _slot(item: ChunkRequest) -> tuple[object, int]:
    assert item.session is not None
    return item.session.model.key, item.session.slot


# Run: a message of one (StreamSteps, an Open Inference Protocol request of a held sequence)


async def step_one(runtime: Runtime, item: ChunkRequest) -> ChunkRequest:
    """Apply one chunk of `item.session` exactly once; the item, answered, or the refusal
    raised. Lean: StreamSteps sends one such message per timestep or few."""
    return await (await queue_one(runtime, item))


@dataclass(slots=True)
class QueuedChunk:
    """A queued chunk's answer, to await: the item, answered, or the batch's failure raised.
    Not a coroutine, so one dropped unawaited (its stream went away) leaves no warning; the
    batcher commits the chunk either way."""

    item: ChunkRequest
    queued: asyncio.Future[list[np.ndarray | BaseException]] | None  # None: all replayed

    def __await__(self) -> Generator[Any, None, ChunkRequest]:
        return _answer_one(self.item, self.queued).__await__()


async def queue_one(runtime: Runtime, item: ChunkRequest) -> QueuedChunk:
    """Plan one chunk of `item.session` and queue it (a refusal is raised). By the time this
    returns the chunk is queued, so the session's next chunk queues behind it: a stream can
    plan its next message while this one runs."""
    session = item.session
    assert session is not None
    assert not item.end_session, "a chunk that ends its session goes through start_batch"
    await session.lock.acquire()
    outcomes: list[Outcome | None] = [None]
    rows = _plan_locked(runtime, [item], outcomes)
    if outcomes[0] is not None:
        raise outcomes[0]  # type: ignore[misc]
    return QueuedChunk(item, session.model.batcher.submit(rows) if rows else None)


async def _answer_one(
    item: ChunkRequest, queued: asyncio.Future[list[np.ndarray | BaseException]] | None
) -> ChunkRequest:
    if queued is None:  # all of it was answered from replay
        item.outputs = item.replayed
        return item
    (result,) = await queued  # committed by the batcher whether or not this is awaited
    if isinstance(result, BaseException):
        raise as_service_error(result)
    _take(item, result)
    return item


def _take(item: ChunkRequest, result: np.ndarray) -> None:
    """A run chunk's outputs, after any replayed ones."""
    item.outputs = result if not len(item.replayed) else np.concatenate([item.replayed, result])


# Run: a batch message (StepBatch, StreamBatches, the Open Inference Protocol)


async def start_batch(
    runtime: Runtime,
    chunks: list[ChunkRequest | ServiceError],
    principal: str,
    create_missing: bool,
    model: ModelVersion,
) -> asyncio.Future[list[Outcome]]:
    """Plan the chunks and queue them as one batcher entry per model version; a future of
    every chunk's answer or refusal, in chunk order. `model`: the version the inputs were
    decoded for, on which create_missing creates. By the time this returns, each session's
    chunk is queued (or refused), so a later message's chunks for the same sessions queue
    behind it."""
    runtime.refuse_if_draining()
    outcomes: list[Outcome | None] = [
        chunk if isinstance(chunk, ServiceError) else None for chunk in chunks
    ]
    held = await _find_sessions(runtime, chunks, outcomes, principal, create_missing, model)
    await _lock_all(held)
    rows = _plan_locked(runtime, held, outcomes)
    applied = _submit(rows) if rows else None
    # A task, not a coroutine: sessions that end are closed even if nobody awaits the answer.
    answering = asyncio.ensure_future(_answers(runtime, held, outcomes, applied))
    # However it ends (cancelled even before it ran), no planned end is left pending.
    answering.add_done_callback(lambda _: [_ended(item) for item in held])
    return answering


def _submit(rows: list[Row]) -> asyncio.Future[list[np.ndarray | BaseException]]:
    """Each version's rows to its own batcher (batches never mix versions); one future of
    every row's result, in row order."""
    groups: dict[ModelVersion, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.session.model, []).append(i)
    if len(groups) == 1:
        (model,) = groups
        return model.batcher.submit(rows)
    parts = [(idx, m.batcher.submit([rows[i] for i in idx])) for m, idx in groups.items()]

    async def joined() -> list[np.ndarray | BaseException]:
        results: list[np.ndarray | BaseException] = [None] * len(rows)  # type: ignore[list-item]
        for indices, part in parts:
            for i, result in zip(indices, await part, strict=True):
                results[i] = result
        return results

    return asyncio.ensure_future(joined())


async def _answers(
    runtime: Runtime,
    held: list[ChunkRequest],
    outcomes: list[Outcome | None],
    applied: asyncio.Future[list[np.ndarray | BaseException]] | None,
) -> list[Outcome]:
    results = iter(await applied if applied is not None else ())
    for item in held:
        if outcomes[item.index] is None:
            outcomes[item.index] = await _answer(runtime, item, results)
        _ended(item)  # at once: a later message waiting for this end goes on
    return outcomes  # type: ignore[return-value]  # every chunk has its outcome now


async def _answer(
    runtime: Runtime, item: ChunkRequest, results: Iterator[np.ndarray | BaseException]
) -> Outcome:
    """One planned chunk's answer: its outputs (the replayed ones first), or its refusal."""
    if item.row is None:
        item.outputs = item.replayed
    elif isinstance(result := next(results), BaseException):
        return as_service_error(result)
    else:
        _take(item, result)
    if item.end_session:
        try:
            await runtime.close_session(item.session, "ended")  # type: ignore[arg-type]
        except Exception as exc:  # the others in the message are answered all the same
            return as_service_error(exc)
    return item


def _ended(item: ChunkRequest) -> None:
    """The chunk's planned end is over (its session closed, or the chunk failed): wake who
    waits for it."""
    if item.ending is None:
        return
    if not item.ending.done():
        item.ending.set_result(None)
    if item.session is not None and item.session.ending is item.ending:
        item.session.ending = None
    item.ending = None


def as_service_error(exc: BaseException) -> ServiceError:
    if isinstance(exc, ServiceError):
        return exc
    return ServiceError(f"the batch holding this chunk failed: {type(exc).__name__}: {exc}")


async def _find_sessions(
    runtime: Runtime,
    chunks: list[ChunkRequest | ServiceError],
    outcomes: list[Outcome | None],
    principal: str,
    create_missing: bool,
    model: ModelVersion,
) -> list[ChunkRequest]:
    """The session of each good chunk (created with create_missing on `model`); refusals into
    outcomes, among them a session on a version whose input size the inputs were not decoded
    for."""
    found: list[ChunkRequest] = []
    missing: list[ChunkRequest] = []
    seen: dict[str, int] = {}
    for index, chunk in enumerate(chunks):
        if isinstance(chunk, ServiceError):
            continue
        if chunk.session_id in seen:
            outcomes[index] = BadInput(
                f"chunks[{index}]: expected one chunk per session in a message, got a second "
                f"for session {chunk.session_id!r} (the first is chunks[{seen[chunk.session_id]}])"
            )
            continue
        seen[chunk.session_id] = index
        chunk.index = index
        try:
            chunk.session = runtime.sessions.get(chunk.session_id, principal)
        except SessionNotFound as err:
            if runtime.store is None and not create_missing:
                outcomes[index] = err
            else:
                missing.append(chunk)
            continue
        found.append(chunk)
    # Sessions held nowhere here are loaded from the store (or created) all at once, not one
    # round trip after another.
    loaded = await asyncio.gather(
        *(
            _load_or_create(runtime, c.session_id, principal, create_missing, model)
            for c in missing
        ),
        return_exceptions=True,
    )
    for chunk, result in zip(missing, loaded, strict=True):
        if isinstance(result, ServiceError):
            outcomes[chunk.index] = result
        elif isinstance(result, BaseException):
            raise result
        else:
            chunk.session = result
            found.append(chunk)
    await _after_endings(runtime, found, outcomes, principal, create_missing, model)
    width = model.config.input_size
    for chunk in list(found):
        lives_on = chunk.session.model  # type: ignore[union-attr]
        if chunk.session.closed:  # type: ignore[union-attr]  # closed during the await
            outcomes[chunk.index] = SessionNotFound(chunk.session_id)
            found.remove(chunk)
        elif lives_on.config.input_size != width:
            outcomes[chunk.index] = BadInput(
                f"chunks[{chunk.index}]: session {chunk.session_id!r} lives on {lives_on.key} "
                f"(input_size {lives_on.config.input_size}); this message's inputs are for "
                f"{model.key} (input_size {width}): send each model's sessions in messages "
                "naming that model"
            )
            found.remove(chunk)
    return found


async def _after_endings(
    runtime: Runtime,
    found: list[ChunkRequest],
    outcomes: list[Outcome | None],
    principal: str,
    create_missing: bool,
    model: ModelVersion,
) -> None:
    """A chunk naming a session that an earlier message ends (end_session, still being
    answered) is for what follows that end: it waits for the end, then finds the session gone,
    or (create_missing) a new one under the id."""
    ending = [c for c in found if c.session is not None and c.session.ending is not None]
    if not ending:
        return
    await asyncio.gather(*(asyncio.shield(c.session.ending) for c in ending))  # type: ignore[union-attr]
    for chunk in ending:
        found.remove(chunk)
        try:
            chunk.session = await _load_or_create(
                runtime, chunk.session_id, principal, create_missing, model
            )
        except ServiceError as err:
            outcomes[chunk.index] = err
            continue
        found.append(chunk)


async def _load_or_create(
    runtime: Runtime, session_id: str, principal: str, create: bool, model: ModelVersion
) -> Session:
    """A session this replica does not hold: from the state store, else (create_missing) new."""
    try:
        return await runtime.get_session(session_id, principal)
    except SessionNotFound:
        if not create:
            raise
    try:
        key = model.key
        return await runtime.open_session(session_id, principal, key.name, key.version)
    except SessionExists:  # created meanwhile by another call
        return runtime.sessions.get(session_id, principal)


# Run: a stateless message (Predict, an Open Inference Protocol request with no sequence)


async def predict(
    runtime: Runtime, inputs: np.ndarray, model: ModelVersion, principal: str
) -> np.ndarray:
    """Outputs (T, O) of `inputs` (T, I) from zero state. Its plan is the limits alone (no
    session, no step rule); the version is pinned while it runs; nothing to commit."""
    runtime.refuse_if_draining()
    runtime.rate_limiter.take(principal, len(inputs))
    with runtime.rollout.pinned(model):
        outputs = await model.engine.call(model.engine.predict, inputs)
    metrics.TIMESTEPS.labels(model.key.name, str(model.key.version)).inc(len(inputs))
    return outputs


# Commit


class Commit:
    """What a finished batch changes, called by a version's batcher with the batch's rows (each
    session's lock held since its plan) and the engine's outputs: the replay rings, each
    session's next_step, the state store's staging; every lock released. `failed`: the batch
    raised, nothing moves, the locks are released."""

    def __init__(self, replay: ReplayPool | None = None, store: StateStore | None = None) -> None:
        self._replay = replay  # the version's rings, written a whole uniform batch at a time
        self._store = store

    def __call__(self, rows: list[Row], outputs: StepOutputs) -> list[np.ndarray | BaseException]:
        recorded = self._record(rows, outputs)
        store = self._store
        results: list[np.ndarray | BaseException] = []
        for row, out in zip(rows, outputs.rows, strict=True):
            result = _commit_row(row, out, recorded)
            if store is not None and result is out:  # committed: the store has a change
                store.stage(row.session)
            results.append(result)
        return results

    @staticmethod
    def failed(rows: list[Row]) -> None:
        for row in rows:
            row.session.lock.release()

    def _record(self, rows: list[Row], outputs: StepOutputs) -> bool:
        """Write a uniform batch's outputs to the replay rings in one go; False: each row's
        commit records its own."""
        if self._replay is None or outputs.uniform is None:
            return False
        try:
            slots = [row.session.slot for row in rows]
            self._replay.write(slots, [row.start for row in rows], outputs.uniform)
        except Exception:
            log.exception("recording a batch of %d in the replay rings failed", len(rows))
            return False
        return True


def _commit_row(row: Row, out: np.ndarray, recorded: bool) -> np.ndarray | BaseException:
    """Commit one chunk; a failure here fails that chunk alone."""
    try:
        row.session.commit(row.start, out, recorded)
    except Exception as exc:
        log.exception("committing a chunk of session %s failed", row.session.session_id[:6])
        return exc
    finally:
        row.session.lock.release()
    return out
