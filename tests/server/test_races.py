"""Races the contract must survive (Triton's sequence batcher failed several of them): expiry
against a resume, takeover against a batch in flight, delete against a stream, shutdown against
everything. The outcome may be a refusal; it is never a wrong output, a crash or a leak."""

import asyncio
import random
import signal
import time
import urllib.request

import grpc
import numpy as np

from lstm_stream.client import AsyncStreamingClient, LstmStreamError
from tests.equality import assert_equals_offline, assert_state_equals_offline
from tests.factories import (
    RawStream,
    ServeProcess,
    free_port,
    metric_value,
    offline,
    random_steps,
    serve,
    wait_for,
)


def test_expiry_racing_a_resume_gives_the_right_outputs_or_not_found(
    regression_dir, regression_model
):
    """Resumes at delays spread across the idle deadline, until both outcomes have been seen
    several times: a resume that wins gets the right outputs, one that loses gets NOT_FOUND."""
    timeout = 0.5
    outcomes = {"resumed": 0, "expired": 0}
    delays = random.Random(0)
    with serve(session_idle_timeout_s=timeout, model=str(regression_dir)) as srv:
        for i in range(300):
            if min(outcomes.values()) >= 3:
                break
            steps = random_steps(6, 6, seed=i)
            with RawStream(srv.target) as stream:
                stream.send(steps[:3])
            time.sleep(timeout * delays.uniform(0.0, 3.0))  # before, around or past expiry
            try:
                with RawStream(srv.target, stream.session_id) as again:
                    rest = again.outputs(steps[3:], start_step=3)
                assert_equals_offline(rest, regression_model, steps, first=3)
                outcomes["resumed"] += 1
            except LstmStreamError as err:
                assert (err.code, err.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
                outcomes["expired"] += 1
        runtime = srv.server.runtime
        # A session leaves the table first; its slot is zeroed on the engine, then freed.
        wait_for(
            lambda: len(runtime.sessions) == 0 and runtime.models.resolve().pool.in_use == 0,
            what="every session to expire and its slot to come back",
        )
    assert min(outcomes.values()) >= 3, outcomes


def test_takeover_racing_a_batch_in_flight_applies_each_step_once(bundled_model):
    steps = random_steps(1000, 6, seed=5)
    with serve(replay_steps=1024) as srv:  # holds all the old stream's steps for the replay
        for trial in range(5):
            old = RawStream(srv.target)
            old.send(steps[:10])
            # The old stream's 490-step chunk and the new stream's attach arrive together.
            old._requests.put(
                old._pb.StreamStepsRequest(inputs=steps[10:500].ravel(), start_step=10)
            )
            with RawStream(srv.target, old.session_id) as new:
                start, got = new.send(steps[10:520], start_step=10)
            # Whether the old chunk ran first (and is replayed) or not, every step is right.
            assert start == 10
            assert_equals_offline(got, bundled_model, steps, first=10, err_msg=f"trial {trial}")
            old.close()
            assert_state_equals_offline(
                srv.target, old.session_id, bundled_model, steps[:520], err_msg=f"trial {trial}"
            )


def test_a_message_waiting_for_its_session_when_a_new_stream_takes_it_over_is_not_applied(
    regression_dir, regression_model
):
    """One stream feeds a session at a time (DESIGN 1.1): the old stream's message, received
    but still waiting for the session (a chunk of it in flight), is refused once a new stream
    has taken the session over; the new stream's unnumbered chunk is the one applied at step
    2, once. A regression model, whose state shows a step applied twice."""
    from concurrent.futures import ThreadPoolExecutor

    steps = random_steps(3, 6, seed=71)

    async def owner(session):
        return session.owner, session.owner is not None and session.owner.busy

    with serve(model=str(regression_dir)) as srv, RawStream(srv.target) as old:
        old.send(steps[:2])
        session = srv.server.runtime.sessions.get(old.session_id)
        old_stream = srv.call(owner(session))[0]
        srv.call(session.lock.acquire())  # as if a chunk of the session were in flight
        old.write(steps[2:3])  # received; it waits for the session
        wait_for(lambda: srv.call(owner(session)) == (old_stream, True), what="old's message")
        with RawStream(srv.target, old.session_id) as new, ThreadPoolExecutor(1) as pool:
            answer = pool.submit(new.send, steps[2:3])  # attaches, then waits for the session
            wait_for(lambda: srv.call(owner(session))[0] is not old_stream, what="the takeover")
            srv.loop.call_soon_threadsafe(session.lock.release)
            start, got = answer.result(30)
            assert old.end_status() == grpc.StatusCode.ABORTED  # and no answer before it
        assert start == 2
        assert_equals_offline(got, regression_model, steps, first=2)
        assert_state_equals_offline(srv.target, old.session_id, regression_model, steps)


def test_delete_racing_a_stream_ends_it_not_found_and_frees_the_slot():
    async def run(target, srv):
        async with AsyncStreamingClient(target) as client:
            session = await client.open_session()
            session_id = session.session_id

            async def keep_streaming():
                for _ in range(10_000):
                    await session.send(np.zeros((1, 6), np.float32))

            streaming = asyncio.create_task(keep_streaming())
            while session.next_step < 5:  # the stream is under way
                await asyncio.sleep(0.01)
            await client.delete_session(session_id)
            try:
                await asyncio.wait_for(streaming, 10)
                raise AssertionError("the stream outlived its deleted session")
            except LstmStreamError as err:
                assert err.reason == "SESSION_NOT_FOUND"

    metrics_port = free_port()
    with ServeProcess("--metrics-port", str(metrics_port)) as srv:
        asyncio.run(run(srv.target, srv))
        wait_for(lambda: metric_value(metrics_port, "lstm_sessions_active") == 0, what="slot freed")


def test_shutdown_racing_everything_ends_cleanly(bundled_model):
    """Streams, creates and deletes in flight when the server drains and stops: every answer
    that arrived is right, every refusal is a drain's or a closed connection's, the server logs
    no error and exits 0."""
    srv = ServeProcess()  # a subprocess, stopped by SIGTERM as in production
    answered, refused = [], []

    async def stream_one(client, i):
        steps = random_steps(40, 6, seed=800 + i)
        try:
            session = await client.open_session()
            for t in range(40):
                out = await session.send(steps[t : t + 1])
                answered.append((steps[: t + 1], out))
        except LstmStreamError as err:
            refused.append(err)

    async def churn(client):
        for _ in range(50):
            try:
                session = await client.open_session()
                await client.delete_session(session.session_id)
            except LstmStreamError as err:
                refused.append(err)

    async def run():
        from lstm_stream.client import ClientOptions

        options = ClientOptions(target=srv.target, max_retries=0, deadline_s=5)
        async with AsyncStreamingClient(options=options) as client:
            tasks = [asyncio.create_task(stream_one(client, i)) for i in range(30)]
            tasks.append(asyncio.create_task(churn(client)))
            while len(answered) < 30 and not all(t.done() for t in tasks):  # under way
                await asyncio.sleep(0.01)
            srv.process.send_signal(signal.SIGTERM)
            await asyncio.gather(*tasks)

    asyncio.run(run())
    code, log = srv.finish(signalled=True)
    srv.__exit__()
    assert code == 0, log  # drained and exited cleanly
    assert "Traceback" not in log and " ERROR " not in log, log
    for history, out in answered:
        np.testing.assert_allclose(out[0], offline(bundled_model, history)[-1], atol=1e-5)
    assert refused, "nothing was in flight when the server stopped"
    for err in refused:
        assert is_a_shutdown_refusal(err), (err.code, err.reason, err.details)


def is_a_shutdown_refusal(err: LstmStreamError) -> bool:
    """The server's own refusals carry a reason; the others come from gRPC as the connection
    closes. A servicer that crashed would give UNKNOWN (and an ERROR in the server's log)."""
    if err.reason:
        return err.reason in ("SHUTTING_DOWN", "SESSION_NOT_FOUND")
    if err.code == grpc.StatusCode.INTERNAL:
        # grpc/grpc#36066: an asyncio client's write racing the end of its call reports this
        # instead of the status the server sent.
        return err.details == "Internal error from Core"
    return err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def test_2000_concurrent_sessions_without_an_error_or_a_lost_step(regression_dir, regression_model):

    sessions, steps_each = 2000, 10
    x = np.random.default_rng(11).standard_normal((sessions, steps_each, 6)).astype(np.float32)

    async def run(target):
        async with AsyncStreamingClient(target) as client:

            async def one(i):
                session = await client.open_session()
                outputs = [await session.send(x[i, t : t + 1]) for t in range(steps_each)]
                await session.close()
                return np.concatenate(outputs)

            return await asyncio.gather(*(one(i) for i in range(sessions)))

    # A subprocess: gRPC's asyncio layer serves one event loop per process best, and this is
    # the test that pushes it hardest.
    metrics_port = free_port()
    flags = ["--max-sessions", str(sessions), "--metrics-port", str(metrics_port)]
    with ServeProcess(*flags, "--model", str(regression_dir)) as p:
        results = asyncio.run(run(p.target))
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read()
        assert b"\nlstm_sessions_active 0.0\n" in metrics  # every session ended, none leaked
        assert p.finish()[0] == 0
    for i, got in enumerate(results):
        assert_equals_offline(got, regression_model, x[i], err_msg=f"session {i}")
