"""The engine's worker thread: jobs run in the order handed over, answers and errors reach the
loop, a cancelled waiter is skipped, and a shut-down worker refuses new work."""

import asyncio
import threading

import pytest

from server.worker import Worker


def make_worker(initialized: list | None = None) -> Worker:
    return Worker("test-worker", (initialized if initialized is not None else []).append, ("up",))


def test_jobs_run_in_order_on_one_thread_and_answer_on_the_loop():
    seen: list[tuple[int, str]] = []
    initialized: list[str] = []
    worker = make_worker(initialized)

    def job(i: int) -> int:
        seen.append((i, threading.current_thread().name))
        return i * i

    async def run():
        futures = [worker.submit(job, i) for i in range(50)]  # handed over before any awaits
        return await asyncio.gather(*futures)

    assert asyncio.run(run()) == [i * i for i in range(50)]
    assert [i for i, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {"test-worker"}
    assert initialized == ["up"]
    assert worker.run(lambda: "sync") == "sync"
    worker.shutdown()


def test_an_error_reaches_its_waiter_and_a_cancelled_waiter_is_skipped():
    worker = make_worker()
    release = threading.Event()
    loop_errors: list[dict] = []

    def fail() -> None:
        raise ValueError("bad batch")

    async def run():
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: loop_errors.append(ctx))
        blocked = worker.submit(release.wait)
        cancelled = worker.submit(lambda: "never read")
        cancelled.cancel()
        failing = worker.submit(fail)
        release.set()
        assert await blocked is True
        with pytest.raises(ValueError, match="bad batch"):
            await failing
        return await worker.submit(lambda: "after")  # the worker goes on

    assert asyncio.run(run()) == "after"
    assert loop_errors == []  # the cancelled waiter's answer was dropped, not forced on it
    with pytest.raises(ValueError, match="bad batch"):
        worker.run(fail)
    worker.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        worker.run(lambda: None)
