"""Exactly-once resume: a TCP relay between client and server cuts every connection after a
number of bytes; every session's outputs still equal the model offline, none lost or repeated.

The relay cuts by bytes moved, never by the clock, so the number of cuts does not depend on how
fast the machine is: a session whose answers take more bytes than a connection's budget is cut
at least once, on an idle machine and on a loaded one alike.
"""

import asyncio
import random
import threading

import numpy as np

from lstm_stream.client import AsyncStreamingClient, ClientOptions, StreamingClient
from tests.equality import assert_equals_offline
from tests.factories import (
    ServeProcess,
    free_port,
    metric_value,
    random_chunks,
    random_steps,
    serve,
    wait_for,
)

# Patient: on a loaded machine a cut channel can take seconds to reconnect, and gRPC fails the
# calls made meanwhile at once, each of which counts as a retry. Giving up is not under test:
# 100 clients and the relay share one event loop, and under load (a Docker build beside it) a
# CreateSession once took over 10 s, retries included.
OPTIONS = dict(deadline_s=60.0, max_retries=2_000, backoff_initial_s=0.01, backoff_max_s=0.2)


class CuttingRelay:
    """Relays TCP to the server; each connection is cut (RST) once the server has sent it a
    budget of bytes, drawn per connection from [min_bytes, max_bytes]."""

    def __init__(self, upstream_port: int, min_bytes: int, max_bytes: int, seed: int = 0):
        self.upstream_port = upstream_port
        self.budget = (min_bytes, max_bytes)
        self.random = random.Random(seed)
        self.cuts = 0
        self.connections = 0
        self.port = 0
        self._relays: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._server.close()
        for task in self._relays:
            task.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)
        await self._server.wait_closed()

    def _accept(self, client_reader, client_writer) -> None:
        task = asyncio.create_task(self._relay(client_reader, client_writer))
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)

    async def _relay(self, client_reader, client_writer) -> None:
        self.connections += 1
        budget = self.random.randint(*self.budget)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self.upstream_port
            )
        except OSError:
            client_writer.transport.abort()
            return
        pipes = [
            asyncio.create_task(self._pipe(client_reader, upstream_writer)),
            asyncio.create_task(self._pipe(upstream_reader, client_writer, budget)),
        ]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            client_writer.transport.abort()
            upstream_writer.transport.abort()
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)

    async def _pipe(self, reader, writer, budget: int | None = None) -> None:
        """Copy until EOF; with a budget, stop (and count a cut) once it is spent."""
        try:
            while data := await reader.read(65536):
                if budget is not None and len(data) >= budget:
                    self.cuts += 1
                    return
                if budget is not None:
                    budget -= len(data)
                writer.write(data)
                await writer.drain()
        except OSError:
            return


def split(steps: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.split(steps, np.cumsum(sizes)[:-1])


def test_100_sessions_of_500_steps_through_a_connection_cutting_relay(
    regression_dir, regression_model
):
    """Each session has a channel of its own, so each session's connections are cut by its
    own bytes: 500 answers of 4 floats take more than 8 kB, the largest budget. A regression
    model: a resent step applied twice would show in every output after it."""
    sessions, steps_each = 100, 500
    inputs = [random_steps(steps_each, 6, seed=7000 + i) for i in range(sessions)]
    plans = [random_chunks(steps_each, 25, seed=7000 + i) for i in range(sessions)]

    async def one(i: int, relay: CuttingRelay):
        options = ClientOptions(target=f"127.0.0.1:{relay.port}", **OPTIONS)
        async with AsyncStreamingClient(options=options) as client:
            session = await client.open_session()
            outputs = [out async for out in session.stream(split(inputs[i], plans[i]), window=4)]
            await session.close()
            return np.concatenate(outputs), session.reconnects

    async def run(port: int):
        relay = CuttingRelay(port, min_bytes=2_000, max_bytes=8_000, seed=1)
        await relay.start()
        try:
            return await asyncio.gather(*(one(i, relay) for i in range(sessions))), relay.cuts
        finally:
            await relay.stop()

    metrics_port = free_port()  # a subprocess: this process's asyncio loop is the client's
    flags = ["--max-sessions", "256", "--metrics-port", str(metrics_port)]
    with ServeProcess(*flags, "--model", str(regression_dir)) as srv:
        results, cuts = asyncio.run(run(srv.port))
        wait_for(
            lambda: metric_value(metrics_port, "lstm_sessions_active") == 0,
            what="every ended session to be closed",
        )
    for steps, (outputs, reconnects) in zip(inputs, results, strict=True):
        assert outputs.shape == (steps_each, 4)  # none lost, none repeated
        assert_equals_offline(outputs, regression_model, steps)
        assert reconnects >= 1  # this session's connection was cut at least once
    assert cuts >= sessions


def test_sync_client_steps_through_cuts_exactly_once(regression_dir, regression_model):
    """300 one-step answers take well over 3 kB: the session is cut several times."""
    steps = random_steps(300, 6, seed=77)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    relay = None
    try:
        with serve(model=str(regression_dir)) as srv:
            relay = CuttingRelay(srv.port, min_bytes=1_000, max_bytes=3_000, seed=2)
            asyncio.run_coroutine_threadsafe(relay.start(), loop).result(10)
            options = ClientOptions(target=f"127.0.0.1:{relay.port}", **OPTIONS)
            with StreamingClient(options=options) as client, client.open_session() as session:
                outputs = np.stack([session.step(x) for x in steps])
                reconnects = session.reconnects
    finally:
        if relay is not None:
            asyncio.run_coroutine_threadsafe(relay.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    assert_equals_offline(outputs, regression_model, steps)
    assert reconnects >= 2
    assert relay.cuts >= 2
