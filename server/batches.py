"""Many sessions in one message (DESIGN 1.7): the chunks of a StepBatch or StreamBatches message,
planned one by one and applied as one batcher entry, so they run in one engine batch where they
fit. Each chunk obeys the StreamSteps rules; a refused chunk gets its own error, changes nothing
and leaves the others alone. A batch call owns no session: it neither takes a session over from
a stream nor is interrupted by one attaching.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from server.batcher import Row
from server.engine import StepWork
from server.errors import BadInput, ServiceError, SessionExists, SessionNotFound
from server.sessions import NO_OUTPUTS, Session, plan_chunk

if TYPE_CHECKING:
    from server.models import ModelVersion
    from server.runtime import Runtime


@dataclass(eq=False, slots=True)
class ChunkRequest:
    """A decoded SessionChunk; planning and applying it fill in the rest, and an answered
    chunk is its own answer (`outputs`)."""

    session_id: str
    inputs: np.ndarray  # (T, input_size) float32
    start_step: int | None = None
    reset: bool = False
    end_session: bool = False
    answered_step: int = 0  # the client has every output before this step (0: not said)
    index: int = 0  # position in the message
    session: Session | None = None
    first: int = 0  # step index of the first output row
    replayed: np.ndarray = field(default_factory=lambda: NO_OUTPUTS)  # (R, O) from replay
    row: Row | None = None  # the work to run, if any
    outputs: np.ndarray = field(default_factory=lambda: NO_OUTPUTS)  # (T, O) once answered
    ending: asyncio.Future[None] | None = None  # this chunk ends its session: done when over


Outcome = ChunkRequest | ServiceError


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
    planned = await _find_sessions(runtime, chunks, outcomes, principal, create_missing, model)
    # Locks are taken in (version, slot) order: two messages naming the same sessions cannot
    # each hold one the other waits for.
    planned.sort(key=_slot)
    held: list[ChunkRequest] = []
    try:
        for item in planned:
            await item.session.lock.acquire()
            held.append(item)
    except BaseException:  # cancelled while waiting: give back what was taken
        for item in held:
            item.session.lock.release()
        raise
    rows = []
    for item in held:  # no await from here to the submit: nothing can interleave
        try:
            _plan(runtime, item)
        except ServiceError as err:
            outcomes[item.index] = err
        if item.row is None:
            item.session.lock.release()
        else:
            rows.append(item.row)
    applied = _submit(rows) if rows else None  # releases the locks
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
        return model.batcher.submit_rows(rows)
    parts = [(idx, m.batcher.submit_rows([rows[i] for i in idx])) for m, idx in groups.items()]

    async def joined() -> list[np.ndarray | BaseException]:
        results: list[np.ndarray | BaseException] = [None] * len(rows)  # type: ignore[list-item]
        for indices, part in parts:
            for i, result in zip(indices, await part, strict=True):
                results[i] = result
        return results

    return asyncio.ensure_future(joined())


def _slot(chunk: ChunkRequest) -> tuple[object, int]:
    assert chunk.session is not None
    return chunk.session.model.key, chunk.session.slot


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
    outputs = item.replayed
    if item.row is not None:
        result = next(results)
        if isinstance(result, BaseException):
            return _as_service_error(result)
        outputs = result if not len(outputs) else np.concatenate([outputs, result])
    item.outputs = outputs
    if item.end_session:
        try:
            await runtime.close_session(item.session, "ended")
        except Exception as exc:  # the others in the message are answered all the same
            return _as_service_error(exc)
    return item


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
        lives_on = chunk.session.model
        if chunk.session.closed:  # closed during the await (its version may be gone too)
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


def _plan(runtime: Runtime, item: ChunkRequest) -> None:
    """Decide what the chunk does, as a StreamSteps message would; the lock is held."""
    session, chunk = item.session, item
    assert session is not None
    runtime.refuse_if_draining()
    if session.closed or session.ending is not None:  # ended, or another message ends it
        raise SessionNotFound(session.session_id)
    next_step = session.next_step
    if chunk.start_step is None or chunk.start_step == next_step:  # the usual: no replay
        new, start, reset = chunk.inputs, next_step, chunk.reset
    else:
        plan = plan_chunk(
            session, chunk.start_step, chunk.inputs, chunk.reset, session.model.config.output_size
        )
        new, start, reset, item.replayed = plan.new, plan.new_start, plan.reset, plan.replayed
    runtime.rate_limiter.take(session.principal, len(new))
    runtime.sessions.touch(session)
    session.note_answered(chunk.answered_step)
    item.first = start - len(item.replayed)
    if len(new) or reset:
        item.row = Row(session, StepWork(session.slot, new, reset), start)
    if item.end_session:
        item.ending = session.ending = asyncio.get_running_loop().create_future()


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


def _as_service_error(exc: BaseException) -> ServiceError:
    if isinstance(exc, ServiceError):
        return exc
    return ServiceError(f"the batch holding this chunk failed: {type(exc).__name__}: {exc}")
