"""Exactly-once resume: a TCP relay between client and server cuts every connection at a random
moment; every session's outputs still equal the model offline, none lost or repeated."""

import asyncio
import random
import threading

import numpy as np

from client import AsyncStreamingClient, ClientOptions, StreamingClient
from tests.factories import (
    ServeProcess,
    free_port,
    metric_value,
    offline,
    random_chunks,
    random_steps,
    serve,
)

OPTIONS = dict(deadline_s=3.0, max_retries=100, backoff_initial_s=0.01, backoff_max_s=0.2)


class FlakyProxy:
    """Relays TCP to the server; each connection lives a random time, then is cut (RST)."""

    def __init__(self, upstream_port: int, min_life_s: float, max_life_s: float, seed: int = 0):
        self.upstream_port = upstream_port
        self.life = (min_life_s, max_life_s)
        self.random = random.Random(seed)
        self.cuts = 0
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._server.close()

    async def _relay(self, client_reader, client_writer) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self.upstream_port
        )
        pipes = asyncio.gather(
            self._pipe(client_reader, upstream_writer), self._pipe(upstream_reader, client_writer)
        )
        try:
            await asyncio.wait_for(pipes, self.random.uniform(*self.life))
        except TimeoutError:
            self.cuts += 1
        except OSError:
            pass
        finally:
            client_writer.transport.abort()
            upstream_writer.transport.abort()

    @staticmethod
    async def _pipe(reader, writer) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


def test_100_sessions_of_500_steps_through_a_connection_cutting_proxy(bundled_model):
    sessions, steps_each = 100, 500
    inputs = [random_steps(steps_each, 6, seed=7000 + i) for i in range(sessions)]
    plans = [random_chunks(steps_each, 25, seed=7000 + i) for i in range(sessions)]

    async def one(i, client):
        session = await client.open_session()
        chunks = np.split(inputs[i], np.cumsum(plans[i])[:-1])
        outputs = [out async for out in session.stream(chunks, window=4)]
        await session.close()
        return np.concatenate(outputs), session.reconnects

    async def run(port):
        proxy = FlakyProxy(port, 0.2, 0.6, seed=1)
        await proxy.start()
        options = ClientOptions(target=f"127.0.0.1:{proxy.port}", **OPTIONS)
        async with AsyncStreamingClient(options=options) as client:
            results = await asyncio.gather(*(one(i, client) for i in range(sessions)))
        await proxy.stop()
        return results, proxy.cuts

    metrics_port = free_port()  # a subprocess: this process's asyncio loop is the client's
    with ServeProcess("--max-sessions", "256", "--metrics-port", str(metrics_port)) as srv:
        results, cuts = asyncio.run(run(srv.port))
        assert metric_value(metrics_port, "lstm_sessions_active") == 0  # none leaked
    for steps, (outputs, reconnects) in zip(inputs, results, strict=True):
        assert outputs.shape == (steps_each, 4)  # none lost, none repeated
        np.testing.assert_allclose(outputs, offline(bundled_model, steps), atol=1e-5, rtol=0)
        assert reconnects >= 1  # this session's connection was cut at least once
    assert cuts >= 3


def test_sync_client_steps_through_cuts_exactly_once(bundled_model):
    steps = random_steps(300, 6, seed=77)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    with serve() as srv:
        proxy = FlakyProxy(srv.port, 0.1, 0.3, seed=2)
        asyncio.run_coroutine_threadsafe(proxy.start(), loop).result(10)
        options = ClientOptions(target=f"127.0.0.1:{proxy.port}", **OPTIONS)
        with StreamingClient(options=options) as client, client.open_session() as session:
            outputs = np.stack([session.step(x) for x in steps])
            reconnects = session.reconnects
        asyncio.run_coroutine_threadsafe(proxy.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    np.testing.assert_allclose(outputs, offline(bundled_model, steps), atol=1e-5, rtol=0)
    assert reconnects >= 1
