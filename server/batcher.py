"""The batcher: what runs next. One loop takes the oldest waiting chunk of each session (at most
one per session), up to --max-batch-size of them, hands the batch to the engine as soon as the
engine is free, gives the outputs to the domain's commit (server/steps.py: replay, next_step,
the state store, the sessions' locks) and completes every chunk's future. When a batch fails,
every future in it gets the error and the commit is told, so no session's state or step index
moves. The batcher applies no rule of the domain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from server import metrics
from server.engine import Engine, StepOutputs, StepWork

if TYPE_CHECKING:
    from server.sessions import Session

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class Row:
    """One session's chunk: what the engine applies to one slot."""

    session: Session
    work: StepWork
    start: int  # step index of the chunk's first timestep


class Commit(Protocol):
    """What a finished batch changes (server/steps.py Commit): each row's result."""

    def __call__(
        self, rows: list[Row], outputs: StepOutputs
    ) -> list[np.ndarray | BaseException]: ...

    def failed(self, rows: list[Row]) -> None: ...


@dataclass(eq=False)
class Entry:
    """Chunks queued together (a stream message's one, or a batch message's many), answered by
    one future once all are committed: each row's outputs, or the exception that failed it.
    An entry larger than a batch's room is split across consecutive batches."""

    rows: list[Row]
    future: asyncio.Future[list[np.ndarray | BaseException]]
    enqueued: float = field(default_factory=time.perf_counter)
    taken: int = 0  # rows handed to batches so far
    results: list[np.ndarray | BaseException] = field(default_factory=list)

    def settle(self, results: list[np.ndarray | BaseException]) -> None:
        self.results.extend(results)
        if len(self.results) == len(self.rows) and not self.future.done():
            self.future.set_result(self.results)


class Batcher:
    def __init__(
        self,
        engine: Engine,
        commit: Commit,
        max_batch_size: int,
        max_batch_delay_us: int,
        model: str = "",  # the model version, for the metrics' labels
        version: int = 0,
    ) -> None:
        self._engine = engine
        self._commit = commit
        self._max_batch_size = max_batch_size
        self._max_delay_s = max_batch_delay_us / 1e6
        self._queue: deque[Entry] = deque()
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._full = asyncio.Event()  # a whole batch is waiting: no need to wait any longer
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._batch_size = metrics.BATCH_SIZE.labels(model)
        self._queue_wait = metrics.QUEUE_WAIT.labels(model)
        self._compute = metrics.BATCH_COMPUTE.labels(model)
        self._timesteps = metrics.TIMESTEPS.labels(model, str(version))

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

    def submit(self, rows: list[Row]) -> asyncio.Future[list[np.ndarray | BaseException]]:
        """Queue chunks of different sessions as one entry (each session's lock held by its
        plan, released by the commit whatever happens to the caller meanwhile); they run in
        one batch where they fit. The future gives each row's outputs or error."""
        entry = Entry(rows, asyncio.get_running_loop().create_future())
        self._queue.append(entry)
        self._queued_rows += len(rows)
        self._wakeup.set()
        if self._queued_rows >= self._max_batch_size:
            self._full.set()
        return entry.future

    def _take_batch(self) -> list[tuple[Entry, list[Row]]]:
        """The oldest rows, up to --max-batch-size, with the entries they belong to.

        A session holds its lock from submit to commit, so the queue never holds two chunks of
        one session: taking the oldest rows is taking at most one chunk per session."""
        room = self._max_batch_size
        taken: list[tuple[Entry, list[Row]]] = []
        while self._queue and room:
            entry = self._queue[0]
            rows = entry.rows[entry.taken : entry.taken + room]
            entry.taken += len(rows)
            room -= len(rows)
            taken.append((entry, rows))
            if entry.taken == len(entry.rows):
                self._queue.popleft()
        self._queued_rows -= self._max_batch_size - room
        return taken

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
            self._idle.clear()
            if self._max_delay_s and self._queued_rows < self._max_batch_size:
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

    async def _execute(self, batch: list[tuple[Entry, list[Row]]]) -> None:
        dispatched = time.perf_counter()
        rows = [row for _, entry_rows in batch for row in entry_rows]
        try:
            outputs = await self._engine.call(self._engine.step, [row.work for row in rows])
        except Exception as exc:
            log.exception("batch of %d failed", len(rows))
            self._commit.failed(rows)
            for entry, entry_rows in batch:
                entry.settle([exc] * len(entry_rows))
            return
        finished = time.perf_counter()
        results = self._commit(rows, outputs)
        done = 0
        for entry, entry_rows in batch:
            entry.settle(results[done : done + len(entry_rows)])
            done += len(entry_rows)
        self._batch_size.observe(len(rows))
        self._queue_wait.observe(dispatched - batch[0][0].enqueued)
        self._compute.observe(finished - dispatched)
        self._timesteps.inc(sum(len(r) for r in results if isinstance(r, np.ndarray)))
