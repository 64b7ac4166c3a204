"""Durable sessions: a write-behind copy of every session's state in Redis (--state-store).

After each batch the batcher stages the changed sessions' state here; one writer task sends all
that is staged in one pipeline, off the response path. A session staged again before its write
goes out is written once, at its newest step, so the store's load follows the write rate Redis
sustains, not the batch rate. A record holds what ExportSession returns (h, c, step index,
replay buffer, model fingerprint) and expires with the idle timeout. Each response says
`durable_step`: the step up to which the store holds its session.

While Redis is unreachable the server keeps serving from memory (lstm_state_store_up 0, a
warning in the log) and retries; once Redis answers again, every live session is written anew,
since a restarted Redis may have lost them all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import torch
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from server import metrics, transfer
from server.errors import StoreUnavailable
from server.sessions import Session

log = logging.getLogger("lstm_serve")
KEY_PREFIX = "lstm-stream:session:"
# A record is a hash {step, state}. A write lands only if it is not older than what is stored:
# a write a lost replica had in flight cannot overwrite what its successor wrote since.
WRITE_IF_NEWER = """
local stored = redis.call('HGET', KEYS[1], 'step')
if stored and tonumber(stored) > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'step', ARGV[1], 'state', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
# Unreachable for longer than this: fail the command, serve from memory, retry later.
SOCKET_TIMEOUT_S = 2.0
RETRY_INITIAL_S, RETRY_MAX_S = 0.1, 2.0
SHUTDOWN_FLUSH_S = 5.0
StoreFailure = (RedisError, OSError, asyncio.TimeoutError)


def session_key(principal: str, session_id: str) -> str:
    # Session ids have no ':' (codec.SESSION_ID_PATTERN), so the key splits unambiguously.
    return f"{KEY_PREFIX}{principal}:{session_id}"


@dataclass(frozen=True, slots=True)
class Staged:
    """A session's state after a batch: to be written unless a newer one replaces it."""

    session: Session
    next_step: int
    h: torch.Tensor  # (L, H) float32, on the CPU
    c: torch.Tensor  # (L, H) float32, on the CPU


class StateStore:
    def __init__(
        self, url: str, ttl_s: float, fingerprint: str, output_size: int, replay_steps: int
    ) -> None:
        self.url = url
        self._redis = Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),  # the writer retries on its own schedule
        )
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._fingerprint = fingerprint
        self._output_size = output_size
        self._replay_steps = replay_steps
        self._staged: dict[str, Staged | None] = {}  # key -> newest state, or None: delete
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self.up = True
        self._up_gauge = metrics.STATE_STORE_UP.labels(redacted(url))
        # Set by the runtime: stage every live session (after an outage).
        self.stage_all: Callable[[], Awaitable[None]] | None = None

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

    def stage(self, session: Session, h: torch.Tensor, c: torch.Tensor) -> None:
        key = session_key(session.principal, session.session_id)
        self._staged[key] = Staged(session, session.next_step, h, c)
        metrics.STATE_STORE_PENDING.set(len(self._staged))
        self._wakeup.set()

    def forget(self, session: Session) -> None:
        """The session ended: delete its record, so no replica brings it back."""
        self._staged[session_key(session.principal, session.session_id)] = None
        self._wakeup.set()

    async def load(self, session_id: str, principal: str) -> transfer.SessionRecord | None:
        try:
            data = await self._redis.hget(session_key(principal, session_id), "state")
        except StoreFailure as exc:
            raise StoreUnavailable(describe(exc)) from None
        return None if data is None else transfer.decode(data)

    async def holds(self, session_id: str, principal: str) -> bool:
        try:
            return bool(await self._redis.exists(session_key(principal, session_id)))
        except StoreFailure as exc:
            raise StoreUnavailable(describe(exc)) from None

    # The writer

    async def _run(self) -> None:
        delay = RETRY_INITIAL_S
        while True:
            if not self._staged:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
            self._idle.clear()
            batch, self._staged = self._staged, {}
            try:
                await self._write(batch)
            except StoreFailure as exc:
                self._put_back(batch)
                self._went_down(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            except Exception:  # the writer must outlive any one record
                log.exception("state store: writing %d records failed", len(batch))
                continue
            delay = RETRY_INITIAL_S
            if not self.up:
                await self._came_back()

    async def _write(self, batch: dict[str, Staged | None]) -> None:
        started = time.perf_counter()
        pipe = self._redis.pipeline(transaction=False)
        for key, staged in batch.items():
            if staged is None:
                pipe.delete(key)
            else:
                pipe.eval(
                    WRITE_IF_NEWER, 1, key, staged.next_step, self._encode(staged), self._ttl_ms
                )
        await pipe.execute()
        written = 0
        for staged in batch.values():
            if staged is not None:
                staged.session.durable_step = max(staged.session.durable_step, staged.next_step)
                written += 1
        metrics.STATE_STORE_WRITES.inc(written)
        metrics.STATE_STORE_FLUSH.observe(time.perf_counter() - started)
        metrics.STATE_STORE_PENDING.set(len(self._staged))

    def _encode(self, staged: Staged) -> bytes:
        session = staged.session
        # The replay rows still held for steps before staged.next_step (the session may have
        # moved on since it was staged; the ring then holds fewer of them).
        oldest = max(
            session.replay.first_step(session.next_step), staged.next_step - self._replay_steps, 0
        )
        replay = session.replay.read(oldest, staged.next_step, self._output_size)  # (R, O)
        record = transfer.SessionRecord(
            session_id=session.session_id,
            next_step=staged.next_step,
            h=staged.h,
            c=staged.c,
            replay=torch.from_numpy(np.ascontiguousarray(replay)),
            fingerprint=self._fingerprint,
            create_time=session.create_time,
            principal=session.principal,
        )
        return transfer.encode(record)

    def _put_back(self, batch: dict[str, Staged | None]) -> None:
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

    async def _came_back(self) -> None:
        self.up = True
        self._up_gauge.set(1)
        log.info("state store %s reachable again: writing every live session", redacted(self.url))
        if self.stage_all is not None:
            await self.stage_all()


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def redacted(url: str) -> str:
    """The URL without a password, for logs."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest
