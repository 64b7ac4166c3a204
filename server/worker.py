"""The engine's worker: one thread that runs what it is handed, in the order handed, and answers
on the event loop. Lighter than a one-thread ThreadPoolExecutor behind run_in_executor, which
wraps every job in a concurrent Future (with its Condition) chained to an asyncio Future: the
hand-over happens once per batch, on the one-step path's every few messages."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")
# A job: the call, its arguments, and where its answer goes (the loop, or None for a thread).
Job = tuple[Callable[..., Any], tuple[Any, ...], asyncio.AbstractEventLoop | None, Any]


class Worker:
    def __init__(
        self, name: str, initializer: Callable[..., None], initargs: tuple[Any, ...] = ()
    ) -> None:
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, args=(initializer, initargs), name=name, daemon=True
        )
        self._thread.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Hand fn over now; a future on the running loop of what it returns (or raises)."""
        self._refuse_if_closed()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((fn, args, loop, future))
        return future

    def run(self, fn: Callable[[], T]) -> T:
        """Run fn on the worker and wait for it (from a thread with no event loop)."""
        self._refuse_if_closed()
        done: Future[T] = Future()
        self._jobs.put((fn, (), None, done))
        return done.result()

    def shutdown(self) -> None:
        """Finish what was handed over, then stop the thread."""
        if not self._closed:
            self._closed = True
            self._jobs.put(None)
        self._thread.join()

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise RuntimeError("the engine's worker is shut down")

    def _run(self, initializer: Callable[..., None], initargs: tuple[Any, ...]) -> None:
        initializer(*initargs)
        while (job := self._jobs.get()) is not None:
            fn, args, loop, future = job
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to whoever waits for it
                result, error = None, exc
            if loop is None:
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)
                continue
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
