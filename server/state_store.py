"""Durable sessions: a write-behind copy of every session's state in Redis (--state-store), one
Redis or a Redis Cluster (server/store_backend.py).

After each batch the batcher stages the sessions it changed here; one writer task reads the
state of all that are staged from the engine's pool (one gather) and sends them in one pipeline
(one round trip per shard), off the response path. Writes start at most once per
--state-store-interval-ms: a session staged again before its write goes out is written once, at
its newest step, so the cost follows the write rate, not the batch rate, and the store lags a
session by at most the interval plus one write. A record holds h, c, the step index, the model
and a tail of outputs, and expires with the idle timeout. Each response says `durable_step`:
the step up to which the store holds its session.

Why a short tail of outputs is enough. After a replica is lost, the one that loads the record
(stored at step S) meets the client's resends. A resend of steps from S on is applied anew. A
resend of a step s < S must be answered from the record, and a client resends such a step only
if it never received its output (SDK: client/ledger.py resends unanswered chunks; chunks it kept
only until durable are resent from S, the step the new replica names). A client that says
`answered_step = a` has received every output before a, and what it lacks only shrinks, so it
never again asks for a step before a: the record keeps the outputs of [a, S) and nothing older.
The server uses the highest `a` it has heard, never more than the client has. A client that says
nothing keeps the old bound, the last --replay-steps outputs. Either way the tail never exceeds
the replay ring (so the guarantee is the one the ring gave), and a resend older than the tail is
refused, as the ring refuses one, naming the oldest step it can answer. An SDK client streaming
one step at a time says a = S - 1 with the chunk of step S - 1, so its records hold h, c and one
output: the last, which the client may not have yet.

While Redis is unreachable the server keeps serving from memory (lstm_state_store_up 0, a
warning in the log) and retries; once Redis answers again, every live session is written anew,
since a restarted Redis may have lost them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server import metrics, transfer
from server.errors import StoreUnavailable
from server.sessions import Session
from server.store_backend import KeyLayout, connect, redacted, session_key
from server.store_script import WRITES_PER_CALL, WriteScript

__all__ = ["StateStore", "session_key"]
log = logging.getLogger(__name__)
# A record is a hash: transfer.to_fields (step, meta, state) and `born`, the session's create
# time, which tells one incarnation of an id from the next. Writes are ordered by (born, step):
# a write a lost replica had in flight cannot overwrite what its successor wrote since, nor
# bring back a session that ended (an end leaves a tombstone: born, step, ended).
#
# Unreachable for longer than this: fail the command, serve from memory, retry later.
SOCKET_TIMEOUT_S = 2.0
STORE_CONNECTIONS = 64  # to Redis at once; more callers wait for one (at most SOCKET_TIMEOUT_S)
RETRY_INITIAL_S, RETRY_MAX_S = 0.1, 2.0
SHUTDOWN_FLUSH_S = 5.0
HEARTBEAT_S = 5.0  # with nothing to write, check this often that the store still answers
# Connection trouble: retried. A ResponseError (the store refusing the command) is not.
StoreFailure = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)


@dataclass(frozen=True, slots=True)
class Staged:
    """A session to write (its state as of the write), or its end (a tombstone)."""

    session: Session
    ended: bool = False
    end_step: int = 0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one write stores of a session: read together, so step and state agree."""

    session: Session
    next_step: int
    state: tuple[np.ndarray, ...]  # the model's state tensors (h and c, or h): (L, H) float32


# Reads the state of some sessions from their versions' pools: each one's state tensors (h and
# c, or h), (L, H) each.
# Runs after every batch already handed to the engines, and the batchers commit those before
# the read's result arrives, so the sessions' next_step values agree with the state read.
StateReader = Callable[[list[Session]], Awaitable[list[tuple[np.ndarray, ...]]]]


class StateStore:
    def __init__(
        self,
        url: str,
        ttl_s: float,
        replay_steps: int,
        read_states: StateReader,
        live_sessions: Callable[[], Iterable[Session]],
        interval_s: float = 0.0,
    ) -> None:
        """read_states reads sessions' h and c from the engine's pool; live_sessions lists the
        sessions to write again after the store lost data."""
        self.url = url
        self._read_states = read_states
        self._live_sessions = live_sessions
        self._redis = connect(url, STORE_CONNECTIONS, SOCKET_TIMEOUT_S)
        # A gateway's first message names a thousand new sessions: their look-ups go out
        # together, in one pipeline, not on a connection each.
        self._lookups = Lookups(self._redis)
        self._keys = KeyLayout(url, secrets.token_hex(8))
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._interval_s = interval_s
        self._replay_steps = replay_steps
        self._staged: dict[str, Staged] = {}  # key -> the session's newest state, or its end
        self._writing: dict[str, Staged] = {}  # the batch being written
        self._marked: set[int] = set()  # the buckets whose marker a write has set
        self._script = WriteScript()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self.up = True
        self._up_gauge = metrics.STATE_STORE_UP.labels(redacted(url))
        # Read when scraped: staging, once per row of every batch, sets nothing.
        metrics.STATE_STORE_PENDING.set_function(lambda: len(self._staged))

    async def start(self) -> None:
        self._up_gauge.set(1)
        self._task = asyncio.create_task(self._run(), name="state-store-writer")

    async def stop(self) -> None:
        """Write what is staged (for a few seconds at most), then close the connection."""
        try:
            await asyncio.wait_for(self.flush(), SHUTDOWN_FLUSH_S)
        except TimeoutError:
            log.warning("state store: %d sessions not written at shutdown", len(self._staged))
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._redis.aclose()

    async def flush(self) -> None:
        """Wait until everything staged so far has been written."""
        while self._staged or not self._idle.is_set():
            self._wakeup.set()
            await self._idle.wait()
            await asyncio.sleep(0)

    # Called on the event loop by the batcher and the runtime

    def stage(self, session: Session) -> None:
        """The session changed (its state in the pool is newer than what is stored). Called for
        every row of every batch: kept to a dict look-up."""
        key = session.store_key
        if not key:
            key = session.store_key = self._keys.session(session.principal, session.session_id)
        staged = self._staged.get(key)
        if staged is None or staged.session is not session or staged.ended:
            self._staged[key] = Staged(session)
        self._wakeup.set()

    def forget(self, session: Session) -> None:
        """The session ended: replace its record by a tombstone, so no replica brings it back."""
        key = self._keys.session(session.principal, session.session_id)
        self._staged[key] = Staged(session, ended=True, end_step=session.next_step)
        self._wakeup.set()

    async def load(
        self, session_id: str, principal: str, newer_than: int = -1
    ) -> transfer.SessionRecord | None:
        """The stored session, if there is one past step `newer_than` (a held copy's step:
        then only the step is read, unless the store is ahead)."""
        key = self._keys.session(principal, session_id)
        try:
            if newer_than >= 0:
                step, state = await self._lookups.run("hmget", key, "step", "meta")
                if state is None or int(step) <= newer_than:
                    return None
            fields = await self._lookups.run("hgetall", key)
        except RedisError as exc:
            raise StoreUnavailable(describe(exc)) from None
        return transfer.from_fields(fields) if b"state" in fields else None  # else: none, or ended

    def ending(self, session_id: str, principal: str) -> bool:
        """Whether the session's end is staged or being written: its record, until then still
        in the store, must not bring it back."""
        key = self._keys.session(principal, session_id)
        staged = self._staged.get(key) or self._writing.get(key)
        return staged is not None and staged.ended

    async def holds(self, session_id: str, principal: str) -> bool:
        try:
            key = self._keys.session(principal, session_id)
            return bool(await self._lookups.run("hexists", key, "state"))
        except RedisError as exc:
            raise StoreUnavailable(describe(exc)) from None

    # The writer

    async def _run(self) -> None:
        delay = RETRY_INITIAL_S
        while True:
            if not self._staged:
                self._idle.set()
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):  # a quiet while: write nothing, check
                    await asyncio.wait_for(self._wakeup.wait(), HEARTBEAT_S)
            self._idle.clear()
            started = time.monotonic()
            self._writing, self._staged = self._staged, {}
            try:
                emptied = await self._write(self._writing)
                if emptied or not self.up:
                    await self._came_back(emptied)
            except StoreFailure as exc:
                self._put_back(self._writing)
                self._went_down(exc)
                self._writing = {}
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            except Exception:  # ResponseError or a bug: retrying the same batch cannot help
                metrics.STATE_STORE_ERRORS.inc()
                log.exception("state store: %d records not written", len(self._writing))
            self._writing = {}
            delay = RETRY_INITIAL_S
            # Let the next write gather what the batches stage meanwhile: writes start at most
            # once per interval, so each session is written at most that often.
            pause = self._interval_s - (time.monotonic() - started)
            if pause > 0:
                await asyncio.sleep(pause)

    async def _snapshots(self, batch: dict[str, Staged]) -> dict[str, Snapshot]:
        """The staged sessions' state, read from the pool now (the closed ones left out)."""
        # A closed session's slot (and, once drained, its whole model version) is gone.
        sessions = {
            key: s.session for key, s in batch.items() if not s.ended and not s.session.closed
        }
        if not sessions:
            return {}
        states = await self._read_states(list(sessions.values()))
        return {
            key: Snapshot(session, session.next_step, state)
            for (key, session), state in zip(sessions.items(), states, strict=True)
            if not session.closed  # closed meanwhile: its slot may be another's now
        }

    async def _write(self, batch: dict[str, Staged]) -> bool:
        """Write a batch; whether the store had lost everything before (its marker was gone)."""
        started = time.perf_counter()
        snapshots = await self._snapshots(batch)
        items: list[tuple[str, Staged | Snapshot]] = [
            (key, snapshots.get(key, staged))
            for key, staged in batch.items()
            if staged.ended or key in snapshots
        ]
        calls = self._calls(items)
        commands = []
        for bucket, part in calls:
            header: list[str] = []
            values: list[bytes] = []  # each session's meta and state (store_script.py)
            for _, item in part:
                born = repr(item.session.create_time)
                if isinstance(item, Snapshot):
                    header.append(f"put {born} {item.next_step}\n")
                    meta, state = self._fields(item)
                    # As a memoryview, redis-py sends the state as it is; bytes it would copy
                    # into one buffer per call (hiredis's packer: 7 us a 4.4 KB record, against
                    # 2 us so).
                    values += (meta, memoryview(state))
                else:
                    header.append(f"end {born} {item.end_step}\n")
                    values += (b"", b"")
            keys = [self._keys.marker(bucket), *(key for key, _ in part)]
            commands.append((len(keys), *keys, self._ttl_ms, "".join(header), *values))
        results = await self._script.run(self._redis, commands)
        written, emptied = 0, False
        for (bucket, part), result in zip(calls, results, strict=True):
            # A marker is missing at the first write to its bucket, and after the store (or
            # the bucket's shard) lost data.
            emptied |= bool(result[0]) and bucket in self._marked
            self._marked.add(bucket)
            for (_, item), applied in zip(part, result[1:], strict=True):
                if not isinstance(item, Snapshot):
                    continue
                session = item.session
                if applied == 1:
                    session.durable_step = max(session.durable_step, item.next_step)
                    session.meta_stored = True
                    written += 1
                elif applied == 2:  # the record was gone (or another's): write it whole
                    session.meta_stored = False
                    self.stage(session)
        metrics.STATE_STORE_WRITES.inc(written)
        metrics.STATE_STORE_FLUSH.observe(time.perf_counter() - started)
        return emptied

    def _calls(
        self, items: list[tuple[str, Staged | Snapshot]]
    ) -> list[tuple[int, list[tuple[str, Staged | Snapshot]]]]:
        """The write calls for these items: (bucket, up to WRITES_PER_CALL items of it). With
        nothing to write, a call per bucket written before, with its marker only: a heartbeat
        that still notices a store (or shard) that lost data."""
        if not items:
            return [(bucket, []) for bucket in sorted(self._marked or {0})]
        by_bucket: dict[int, list[tuple[str, Staged | Snapshot]]] = {}
        for key, item in items:
            bucket = self._keys.bucket(item.session.principal, item.session.session_id)
            by_bucket.setdefault(bucket, []).append((key, item))
        return [
            (bucket, part[first : first + WRITES_PER_CALL])
            for bucket, part in by_bucket.items()
            for first in range(0, len(part), WRITES_PER_CALL)
        ]

    def _fields(self, snapshot: Snapshot) -> tuple[bytes, bytes]:
        """What a write sends of a session: its meta (JSON; empty for an update of a stored
        record) and its state field (the state tensors, then the output tail, as raw float32:
        transfer.state_bytes)."""
        session = snapshot.session
        model = session.model  # the version it lives on (server/models.py ModelVersion)
        # The replay rows still held for steps before the snapshot's next_step (the session
        # may have moved on since; the ring then holds fewer of them), from the first step the
        # client may still ask for (the module's docstring says why).
        oldest = max(
            session.replay.first_step(session.next_step),
            snapshot.next_step - self._replay_steps,
            min(session.answered_step, snapshot.next_step),
            0,
        )
        replay = session.replay.read(oldest, snapshot.next_step, model.config.output_size)  # (R, O)
        if session.meta_stored:  # the usual write, after every batch: no record object
            return b"", transfer.state_bytes(snapshot.state, replay)
        record = transfer.SessionRecord(
            session_id=session.session_id,
            next_step=snapshot.next_step,
            state={  # zero-copy views
                name: torch.from_numpy(array)
                for name, array in zip(model.config.state_names, snapshot.state, strict=True)
            },
            replay=torch.from_numpy(replay),
            fingerprint=model.fingerprint,
            create_time=session.create_time,
            principal=session.principal,
            model=model.key.name,
            model_version=model.key.version,
        )
        fields = transfer.to_fields(record)
        return str(fields["meta"]).encode(), bytes(fields["state"])

    def _put_back(self, batch: dict[str, Staged]) -> None:
        """Return a failed batch to the staging area, behind anything staged since."""
        self._staged = {**batch, **self._staged}

    def _went_down(self, exc: BaseException) -> None:
        metrics.STATE_STORE_ERRORS.inc()
        if self.up:
            self.up = False
            self._up_gauge.set(0)
            log.warning(
                "state store %s unreachable (%s): serving from memory, %d sessions waiting "
                "to be written; retrying",
                redacted(self.url),
                describe(exc),
                len(self._staged),
            )

    async def _came_back(self, emptied: bool) -> None:
        """The store answers again, or answers but has lost what it held: write every live
        session again."""
        if not self.up:
            self.up = True
            self._up_gauge.set(1)
            log.info("state store %s reachable again", redacted(self.url))
        if emptied:
            log.warning("state store %s holds nothing written before", redacted(self.url))
        log.info("state store: writing every live session again")
        for session in self._live_sessions():
            session.meta_stored = False
            self.stage(session)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Lookups:
    """Reads issued in one turn of the event loop go out together, in one pipeline: a burst of
    look-ups costs one round trip (per shard) and one connection, not one each."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._pending: list[tuple[str, tuple[object, ...], asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()  # held: the loop keeps weak references

    async def run(self, command: str, *args: object) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((command, args, future))
        if len(self._pending) == 1:
            loop.call_soon(self._start_sending)
        return await future

    def _start_sending(self) -> None:
        task = asyncio.ensure_future(self._send())
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self) -> None:
        pending, self._pending = self._pending, []
        pipe = self._redis.pipeline(transaction=False)
        for command, args, _ in pending:
            getattr(pipe, command)(*args)
        try:
            results = await pipe.execute(raise_on_error=False)
        except BaseException as exc:  # the connection: every read in it failed alike
            results = [exc] * len(pending)
        for (_, _, future), result in zip(pending, results, strict=True):
            if future.done():  # its caller was cancelled
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
