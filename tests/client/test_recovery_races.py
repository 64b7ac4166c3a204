"""Recovery races, forced: the connection drops after the SDK has decided to write to a stream
and before it writes, so the write meets a call that has already finished. That is a dropped
connection like any other: the SDK reopens and sends again, and no session loses or repeats a
step; the user never sees the call's state (asyncio's `InvalidStateError: RPC already
finished`).

The interleaving is ordered, not hoped for: a wrapped call cuts the relay at the chosen write
and waits for the call to finish (its status) before passing the write on. The sync client
queues its writes, so a finished call cannot refuse one; its tests hold it to that."""

import asyncio
import threading
from typing import Any

import numpy as np
import pytest

from lstm_stream.client import (
    AsyncStreamingClient,
    ClientOptions,
    StreamingClient,
    sync,
    sync_batches,
)
from lstm_stream.client.call_stream import CallStream
from tests.client.test_resume_through_faults import OPTIONS
from tests.equality import assert_equals_offline, assert_state_equals_offline
from tests.factories import random_steps

INPUT_SIZE = 6


class Relay:
    """Relays TCP to the server until `cut`, which aborts every connection open then; later
    connections are relayed again."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.cuts = 0
        self._open: set[asyncio.Transport] = set()
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._server.close()
        self.cut()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def cut(self) -> None:
        self.cuts += 1
        for transport in self._open:
            transport.abort()
        self._open.clear()

    def _accept(self, reader, writer) -> None:
        task = asyncio.create_task(self._relay(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._open |= {writer.transport, up_writer.transport}
        pipes = [self._pipe(reader, up_writer), self._pipe(up_reader, writer)]
        await asyncio.gather(*pipes, return_exceptions=True)
        writer.transport.abort()
        up_writer.transport.abort()

    @staticmethod
    async def _pipe(reader, writer) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


class FinishedBeforeWrite:
    """A streaming call whose `nth` write first cuts the relay and waits until the call has
    finished, then writes: the write meets a finished call, every time."""

    def __init__(self, call: Any, relay: Relay, nth: int) -> None:
        self._call, self._relay, self._left = call, relay, nth
        self.finished_before_write = False

    async def write(self, request: Any) -> None:
        self._left -= 1
        if self._left == 0:
            self._relay.cut()
            await self._call.code()  # returns once the call has finished
            self.finished_before_write = self._call.done()
        await self._call.write(request)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class Stub:
    """The client's stub, but the first call of `method` is wrapped (FinishedBeforeWrite)."""

    def __init__(self, stub: Any, method: str, relay: Relay, nth: int) -> None:
        self._stub, self._method, self._relay, self._nth = stub, method, relay, nth
        self.wrapped: list[FinishedBeforeWrite] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)
        if name != self._method or self.wrapped:
            return method

        def first_call(*args: Any, **kwargs: Any) -> FinishedBeforeWrite:
            call = FinishedBeforeWrite(method(*args, **kwargs), self._relay, self._nth)
            self.wrapped.append(call)
            return self.wrapped[0]

        return first_call


async def through_relay(server, method: str, nth: int, use) -> Any:
    """Run `use(client, stub)` with a client behind a relay whose first `method` call finishes
    just before its `nth` write; what `use` returns."""
    relay = Relay(server.port)
    await relay.start()
    try:
        options = ClientOptions(target=f"127.0.0.1:{relay.port}", **OPTIONS)
        async with AsyncStreamingClient(options=options) as client:
            await client.info()  # the model's sizes, before any cut
            client.stub = stub = Stub(client.stub, method, relay, nth)
            used = await use(client)
            assert [call.finished_before_write for call in stub.wrapped] == [True]
            return used
    finally:
        await relay.stop()


def test_asyncio_stream_batches_resend_after_a_write_meets_a_finished_call(server, bundled_model):
    """The second batch's write meets the finished StreamBatches call; batches 1-4 are all in
    flight when the first read finds the drop, and recovery answers each once."""
    ids = [f"race-batch-{i}" for i in range(5)]
    inputs = [random_steps(12, INPUT_SIZE, seed=40 + i) for i in range(len(ids))]
    batches = [{sid: inputs[i][3 * n : 3 * n + 3] for i, sid in enumerate(ids)} for n in range(4)]

    async def use(client):
        got = [result async for result in client.stream_batches(batches, window=4)]
        return got, (await client.batches()).recoveries

    results, recoveries = asyncio.run(through_relay(server, "StreamBatches", 2, use))
    assert recoveries == 1 and not any(result.errors for result in results)
    for i, sid in enumerate(ids):
        got = np.concatenate([result[sid] for result in results])
        assert got.shape == (12, 4)  # none lost, none repeated
        assert_equals_offline(got, bundled_model, inputs[i])
        assert_state_equals_offline(server.target, sid, bundled_model, inputs[i])


def test_asyncio_session_resends_after_a_write_meets_a_finished_call(server, bundled_model):
    """StreamSteps: the second chunk's write meets the finished call; the session reopens and
    sends it again."""
    steps = random_steps(6, INPUT_SIZE, seed=60)

    async def use(client):
        session = await client.open_session()
        outputs = [await session.send(steps[:3]), await session.send(steps[3:])]
        return np.concatenate(outputs), session.reconnects, session.detach()

    outputs, reconnects, session_id = asyncio.run(through_relay(server, "StreamSteps", 2, use))
    assert reconnects >= 1
    assert_equals_offline(outputs, bundled_model, steps)
    assert_state_equals_offline(server.target, session_id, bundled_model, steps)


@pytest.fixture
def sync_relay(server):
    """A Relay on an event loop of its own, for the sync client."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    relay = Relay(server.port)
    asyncio.run_coroutine_threadsafe(relay.start(), loop).result(30)
    relay.loop = loop
    yield relay
    asyncio.run_coroutine_threadsafe(relay.stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)


@pytest.fixture
def finished_before_second_write(sync_relay, monkeypatch):
    """The sync client's first CallStream finishes (relay cut) just before its second write;
    a list that holds, once it has happened, whether the call had finished."""
    seen: list[bool] = []

    class Finishing(CallStream):
        writes = 0

        def write(self, request: Any) -> None:
            self.writes += 1
            if self.writes == 2 and not seen:
                sync_relay.loop.call_soon_threadsafe(sync_relay.cut)
                self._call.code()  # returns once the call has finished
                seen.append(self._call.done())
            super().write(request)

    monkeypatch.setattr(sync, "CallStream", Finishing)
    monkeypatch.setattr(sync_batches, "CallStream", Finishing)
    return seen


def test_sync_stream_batches_resend_after_a_write_meets_a_finished_call(
    server, sync_relay, finished_before_second_write, bundled_model
):
    ids = [f"race-sync-batch-{i}" for i in range(5)]
    inputs = [random_steps(12, INPUT_SIZE, seed=80 + i) for i in range(len(ids))]
    batches = [{sid: inputs[i][3 * n : 3 * n + 3] for i, sid in enumerate(ids)} for n in range(4)]
    options = ClientOptions(target=f"127.0.0.1:{sync_relay.port}", **OPTIONS)
    with StreamingClient(options=options) as client:
        results = list(client.stream_batches(batches, window=4))
        assert client.batches_on().recoveries == 1
    assert finished_before_second_write == [True]
    assert not any(result.errors for result in results)
    for i, sid in enumerate(ids):
        got = np.concatenate([result[sid] for result in results])
        assert got.shape == (12, 4)  # none lost, none repeated
        assert_equals_offline(got, bundled_model, inputs[i])
        assert_state_equals_offline(server.target, sid, bundled_model, inputs[i])


def test_sync_session_resends_after_a_write_meets_a_finished_call(
    server, sync_relay, finished_before_second_write, bundled_model
):
    steps = random_steps(6, INPUT_SIZE, seed=90)
    options = ClientOptions(target=f"127.0.0.1:{sync_relay.port}", **OPTIONS)
    with StreamingClient(options=options) as client:
        session = client.open_session()
        outputs = np.concatenate([session.send(steps[:3]), session.send(steps[3:])])
        assert session.reconnects >= 1
        session_id = session.detach()
    assert finished_before_second_write == [True]
    assert_equals_offline(outputs, bundled_model, steps)
    assert_state_equals_offline(server.target, session_id, bundled_model, steps)
