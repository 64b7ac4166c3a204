"""The batcher: what runs next. One loop takes the oldest waiting chunk of each session (at most
one per session), up to --max-batch-size of them, hands the batch to the engine as soon as the
engine is free, and completes every chunk's future. When a batch fails, every future in it gets
the error and no session's state or step index moves. With a state store, each session a batch
changed is staged for the store's write-behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from server import metrics
from server.engine import Engine, StepWork
from server.sessions import Session
from server.state_store import StateStore

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Pending:
    session: Session
    work: StepWork
    start: int  # step index of the chunk's first timestep
    future: asyncio.Future[np.ndarray]
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(
        self,
        engine: Engine,
        max_batch_size: int,
        max_batch_delay_us: int,
        store: StateStore | None = None,
    ) -> None:
        self._engine = engine
        self._store = store
        self._max_batch_size = max_batch_size
        self._max_delay_s = max_batch_delay_us / 1e6
        self._queue: deque[Pending] = deque()
        self._wakeup = asyncio.Event()
        self._full = asyncio.Event()  # a whole batch is waiting: no need to wait any longer
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        """Finish what is queued, then stop."""
        await self.wait_idle()
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def wait_idle(self) -> None:
        while self._queue or not self._idle.is_set():
            await self._idle.wait()
            await asyncio.sleep(0)

    def submit(self, session: Session, work: StepWork, start: int) -> asyncio.Future[np.ndarray]:
        """Queue a chunk. The caller holds session.lock; the batcher releases it once the chunk
        is committed (or failed), whatever happens to the caller meanwhile."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append(Pending(session, work, start, future))
        self._wakeup.set()
        if len(self._queue) >= self._max_batch_size:
            self._full.set()
        return future

    def _take_batch(self) -> list[Pending]:
        # A session holds its lock from submit to commit, so the queue never holds two chunks
        # of one session: taking the oldest N is taking at most one chunk per session.
        count = min(len(self._queue), self._max_batch_size)
        return [self._queue.popleft() for _ in range(count)]

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
            self._idle.clear()
            if self._max_delay_s and len(self._queue) < self._max_batch_size:
                await self._wait_for_a_full_batch()
            batch = self._take_batch()
            try:
                await self._execute(batch)
            except Exception:  # the loop must outlive any one batch: every stream waits on it
                log.exception("batcher: unexpected failure; carrying on")

    async def _wait_for_a_full_batch(self) -> None:
        """Up to --max-batch-delay-us for more sessions' chunks; a full batch goes at once."""
        self._full.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._full.wait(), self._max_delay_s)

    async def _execute(self, batch: list[Pending]) -> None:
        dispatched = time.perf_counter()
        try:
            outputs = await self._engine.call(self._engine.step, [p.work for p in batch])
        except Exception as exc:
            log.exception("batch of %d failed", len(batch))
            for pending in batch:
                pending.session.lock.release()
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        finished = time.perf_counter()
        steps = 0
        for pending, out in zip(batch, outputs, strict=True):
            if not self._complete(pending, out):
                continue
            steps += len(out)
            if self._store is not None:
                self._store.stage(pending.session)
        metrics.BATCH_SIZE.observe(len(batch))
        metrics.QUEUE_WAIT.observe(dispatched - batch[0].enqueued)
        metrics.BATCH_COMPUTE.observe(finished - dispatched)
        metrics.TIMESTEPS.inc(steps)

    @staticmethod
    def _complete(pending: Pending, out: np.ndarray) -> bool:
        """Commit one chunk and answer its caller; a failure here fails that chunk alone."""
        try:
            pending.session.commit(pending.start, out)
        except Exception as exc:
            log.exception("committing a chunk of session %s failed", pending.session.session_id[:6])
            if not pending.future.done():
                pending.future.set_exception(exc)
            return False
        finally:
            pending.session.lock.release()
        if not pending.future.done():  # a caller that went away still had its chunk applied
            pending.future.set_result(out)
        return True
