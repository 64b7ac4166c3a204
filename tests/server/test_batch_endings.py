"""A chunk that ends its session, seen from the messages after it (server/steps.py): they
wait for the end and meet what follows it, whatever happens to the ending message's answer.
Driven on the server's own loop, where the interleavings can be forced."""

import asyncio

import numpy as np

from server.errors import ServiceError, SessionNotFound
from server.steps import ChunkRequest
from tests.factories import serve

STEP = np.zeros((1, 6), np.float32)


def chunk(end: bool = False, start: bool = False) -> ChunkRequest:
    """A one-step chunk of session S; `start`: reset (create_missing is the call's)."""
    return ChunkRequest("S", STEP, None, start, end)


async def answer(runtime, item: ChunkRequest, create: bool = False):
    (outcome,) = await asyncio.wait_for(
        await asyncio.wait_for(runtime.start_batch([item], "", create), 30), 30
    )
    return outcome


def test_an_ending_message_whose_answer_is_cancelled_leaves_no_end_pending():
    """The task answering a message that ends S is cancelled: the next message naming S must
    not wait for that end for ever (it once did, and stalled its whole stream)."""

    async def scenario(runtime):
        pending = await runtime.start_batch([chunk(end=True)], "", True)
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
        return await answer(runtime, chunk(start=True), create=True)

    with serve() as srv:
        outcome = srv.call(scenario(srv.server.runtime), timeout=90)
    assert not isinstance(outcome, ServiceError), outcome


def test_of_two_messages_ending_one_session_the_second_finds_it_ended():
    """A and B both find S, then queue on its lock; A ends it. B is refused (it does not step
    a session A ended), and C, after both, starts a new S from step 0."""

    async def scenario(runtime):
        await answer(runtime, chunk(), create=True)
        session = runtime.sessions.get("S", "")
        await session.lock.acquire()  # both messages find S before either plans
        a = asyncio.ensure_future(answer(runtime, chunk(end=True)))
        b = asyncio.ensure_future(answer(runtime, chunk(end=True)))
        for _ in range(10_000):
            if len(session.lock._waiters or ()) == 2:
                break
            await asyncio.sleep(0)
        session.lock.release()
        first, second = await asyncio.gather(a, b)
        third = await answer(runtime, chunk(start=True), create=True)
        return first, second, third

    with serve() as srv:
        first, second, third = srv.call(scenario(srv.server.runtime), timeout=90)
    assert not isinstance(first, ServiceError) and first.first == 1, first
    assert isinstance(second, SessionNotFound), second
    assert not isinstance(third, ServiceError) and third.first == 0, third
