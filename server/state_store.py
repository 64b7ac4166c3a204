"""Durable sessions: a write-behind copy of every session's state in Redis (--state-store).

After each batch the batcher stages the sessions it changed here; one writer task reads the
state of all that are staged from the engine's pool (one gather), sends them in one call (one
round trip), off the response path, then waits --state-store-interval-ms. A session staged
again before its write goes out is written once, at its newest step, so the cost follows the
write rate, not the batch rate. A record holds
what ExportSession returns (h, c, step index, replay buffer, model fingerprint) and expires with
the idle timeout. Each response says `durable_step`: the step up to which the store holds its
session.

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

import numpy as np
import torch
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server import metrics, transfer
from server.errors import StoreUnavailable
from server.sessions import Session

log = logging.getLogger("lstm_serve")
KEY_PREFIX = "lstm-stream:session:"
# A record is a hash: transfer.to_fields (step, meta, state) and `born`, the session's create
# time, which tells one incarnation of an id from the next. Writes are ordered by (born, step):
# a write a lost replica had in flight cannot overwrite what its successor wrote since, nor
# bring back a session that ended (an end leaves a tombstone: born, step, ended).
#
# One call writes up to WRITES_PER_CALL sessions. KEYS[1] is this replica's marker, which
# exists while the store keeps what the replica wrote (a Redis restarted empty, or flushed, has
# none; it expires with the sessions' TTL and every write renews it). KEYS[2..] are the
# sessions; ARGV is the TTL, then 5 values per session: kind ("put" or "end"), born, step, meta,
# state. It returns {1 if the marker was missing, then 1 or 0 per session: applied}.
MARKER_PREFIX = "lstm-stream:replica-marker:"
WRITES_PER_CALL = 256
WRITE_IN_ORDER = """
local ttl = ARGV[1]
local result = {0}
if redis.call('SET', KEYS[1], '1', 'NX') then result[1] = 1 end
redis.call('PEXPIRE', KEYS[1], ttl)
for i = 2, #KEYS do
  local key, a = KEYS[i], 2 + (i - 2) * 5
  local kind, born, step = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local stored = redis.call('HMGET', key, 'born', 'step', 'ended')
  local stored_born = tonumber(stored[1])
  local stale = false
  if stored_born then
    if born < stored_born then
      stale = true
    elseif born == stored_born then
      stale = stored[3] ~= false or (kind == 'put' and tonumber(stored[2]) > step)
    end
  end
  if stale then
    result[i] = 0
  else
    redis.call('DEL', key)
    if kind == 'end' then
      redis.call('HSET', key, 'born', ARGV[a + 1], 'step', ARGV[a + 2], 'ended', '1')
    else
      redis.call('HSET', key, 'born', ARGV[a + 1], 'step', ARGV[a + 2],
                 'meta', ARGV[a + 3], 'state', ARGV[a + 4])
    end
    redis.call('PEXPIRE', key, ttl)
    result[i] = 1
  end
end
return result
"""
# Unreachable for longer than this: fail the command, serve from memory, retry later.
SOCKET_TIMEOUT_S = 2.0
STORE_CONNECTIONS = 64  # to Redis at once; more callers wait for one (at most SOCKET_TIMEOUT_S)
RETRY_INITIAL_S, RETRY_MAX_S = 0.1, 2.0
SHUTDOWN_FLUSH_S = 5.0
HEARTBEAT_S = 5.0  # with nothing to write, check this often that the store still answers
# Connection trouble: retried. A ResponseError (the store refusing the command) is not.
StoreFailure = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)


def session_key(principal: str, session_id: str) -> str:
    # Session ids have no ':' (codec.SESSION_ID_PATTERN), so the key splits unambiguously.
    return f"{KEY_PREFIX}{principal}:{session_id}"


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
    h: np.ndarray  # (L, H) float32
    c: np.ndarray  # (L, H) float32


# Reads the state of some sessions from their versions' pools: each one's h and c, (L, H) each.
# Runs after every batch already handed to the engines, and the batchers commit those before
# the read's result arrives, so the sessions' next_step values agree with the state read.
StateReader = Callable[[list[Session]], Awaitable[list[tuple[np.ndarray, np.ndarray]]]]


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
        # A blocking pool: a burst of look-ups (a gateway's first message names a thousand new
        # sessions) waits for a free connection instead of failing past the pool's size.
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=STORE_CONNECTIONS,
            timeout=SOCKET_TIMEOUT_S,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),  # the writer retries on its own schedule
        )
        self._redis = Redis.from_pool(pool)
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._interval_s = interval_s
        self._replay_steps = replay_steps
        self._staged: dict[str, Staged] = {}  # key -> the session's newest state, or its end
        self._writing: dict[str, Staged] = {}  # the batch being written
        self._marker = MARKER_PREFIX + secrets.token_hex(8)
        self._marked = False  # whether a write has set the marker yet
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self.up = True
        self._up_gauge = metrics.STATE_STORE_UP.labels(redacted(url))

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
        """The session changed (its state in the pool is newer than what is stored)."""
        key = session_key(session.principal, session.session_id)
        staged = self._staged.get(key)
        if staged is None or staged.session is not session or staged.ended:
            self._staged[key] = Staged(session)
            metrics.STATE_STORE_PENDING.set(len(self._staged))
        self._wakeup.set()

    def forget(self, session: Session) -> None:
        """The session ended: replace its record by a tombstone, so no replica brings it back."""
        key = session_key(session.principal, session.session_id)
        self._staged[key] = Staged(session, ended=True, end_step=session.next_step)
        self._wakeup.set()

    async def load(
        self, session_id: str, principal: str, newer_than: int = -1
    ) -> transfer.SessionRecord | None:
        """The stored session, if there is one past step `newer_than` (a held copy's step:
        then only the step is read, unless the store is ahead)."""
        key = session_key(principal, session_id)
        try:
            if newer_than >= 0:
                step, state = await self._redis.hmget(key, "step", "meta")
                if state is None or int(step) <= newer_than:
                    return None
            fields = await self._redis.hgetall(key)
        except RedisError as exc:
            raise StoreUnavailable(describe(exc)) from None
        return transfer.from_fields(fields) if b"state" in fields else None  # else: none, or ended

    def ending(self, session_id: str, principal: str) -> bool:
        """Whether the session's end is staged or being written: its record, until then still
        in the store, must not bring it back."""
        key = session_key(principal, session_id)
        staged = self._staged.get(key) or self._writing.get(key)
        return staged is not None and staged.ended

    async def holds(self, session_id: str, principal: str) -> bool:
        try:
            return bool(await self._redis.hexists(session_key(principal, session_id), "state"))
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
            self._writing, self._staged = self._staged, {}
            try:
                # The marker is missing at the first write, and after the store lost data.
                emptied = await self._write(self._writing) and self._marked
                self._marked = True
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
            if self._interval_s:  # let the next write gather what the batches stage meanwhile
                await asyncio.sleep(self._interval_s)

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
            key: Snapshot(session, session.next_step, h, c)
            for (key, session), (h, c) in zip(sessions.items(), states, strict=True)
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
        pipe = self._redis.pipeline(transaction=False)
        for first in range(0, max(len(items), 1), WRITES_PER_CALL):
            part = items[first : first + WRITES_PER_CALL]
            args: list[object] = [self._ttl_ms]
            for _, item in part:
                born = repr(item.session.create_time)
                if isinstance(item, Snapshot):
                    fields = self._fields(item)
                    args += ("put", born, item.next_step, fields["meta"], fields["state"])
                else:
                    args += ("end", born, item.end_step, "", "")
            keys = [self._marker, *(key for key, _ in part)]
            pipe.eval(WRITE_IN_ORDER, len(keys), *keys, *args)
        results = await pipe.execute()
        written = 0
        for first, result in zip(range(0, len(items), WRITES_PER_CALL), results, strict=False):
            for (_, item), applied in zip(items[first:], result[1:], strict=False):
                if applied and isinstance(item, Snapshot):
                    session = item.session
                    session.durable_step = max(session.durable_step, item.next_step)
                    written += 1
        metrics.STATE_STORE_WRITES.inc(written)
        metrics.STATE_STORE_FLUSH.observe(time.perf_counter() - started)
        metrics.STATE_STORE_PENDING.set(len(self._staged))
        return any(result[0] for result in results)

    def _fields(self, snapshot: Snapshot) -> dict[str, bytes | str | int]:
        session = snapshot.session
        model = session.model  # the version it lives on (server/models.py ModelVersion)
        # The replay rows still held for steps before the snapshot's next_step (the session
        # may have moved on since; the ring then holds fewer of them).
        oldest = max(
            session.replay.first_step(session.next_step),
            snapshot.next_step - self._replay_steps,
            0,
        )
        replay = session.replay.read(oldest, snapshot.next_step, model.config.output_size)  # (R, O)
        record = transfer.SessionRecord(
            session_id=session.session_id,
            next_step=snapshot.next_step,
            h=torch.from_numpy(snapshot.h),  # zero-copy views
            c=torch.from_numpy(snapshot.c),
            replay=torch.from_numpy(replay),
            fingerprint=model.fingerprint,
            create_time=session.create_time,
            principal=session.principal,
            model=model.key.name,
            model_version=model.key.version,
        )
        return transfer.to_fields(record)

    def _put_back(self, batch: dict[str, Staged]) -> None:
        """Return a failed batch to the staging area, behind anything staged since."""
        self._staged = {**batch, **self._staged}
        metrics.STATE_STORE_PENDING.set(len(self._staged))

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
            self.stage(session)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def redacted(url: str) -> str:
    """The URL without a password, for logs."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest
