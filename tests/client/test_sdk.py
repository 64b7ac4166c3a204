"""The SDK's own promises: a deadline bounds a call's retries, sessions are context managers in
both clients, detach hands back the id that attach continues."""

import asyncio

import grpc
import numpy as np
import pytest

from lstm_stream.client import (
    AsyncStreamingClient,
    ClientOptions,
    LstmStreamError,
    StreamingClient,
    policy,
)
from tests.equality import assert_equals_offline, assert_state_equals_offline
from tests.factories import free_port, offline, random_steps


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(policy.time, "monotonic", fake)
    return fake


def error(code=grpc.StatusCode.UNAVAILABLE, reason=""):
    return LstmStreamError(code, "details", reason)


def test_a_unary_call_is_retried_only_while_its_deadline_lasts(clock):
    retry = policy.UnaryRetry(ClientOptions(deadline_s=1.0, backoff_max_s=0.01), "GetSession")
    assert retry.timeout() == 1.0
    assert 0 <= retry.backoff_after(error()) <= 0.01
    clock.now += 0.75
    assert retry.timeout() == pytest.approx(0.25)
    clock.now += 0.25
    assert retry.backoff_after(error()) is None  # nothing left of the deadline


def test_only_idempotent_calls_after_retryable_errors_are_retried(clock):
    options = ClientOptions(deadline_s=None, max_retries=2)
    delete = policy.UnaryRetry(options, "DeleteSession")
    delete.timeout()
    assert delete.backoff_after(error()) is None
    get = policy.UnaryRetry(options, "GetSession")
    get.timeout()
    assert get.backoff_after(error(grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")) is None
    for _ in range(2):
        assert get.backoff_after(error()) is not None
        get.timeout()
    assert get.backoff_after(error()) is None  # max_retries spent


def test_a_deadline_error_says_it_covered_the_retries():
    retry = policy.UnaryRetry(ClientOptions(deadline_s=2.0), "GetModelInfo")
    final = retry.final(error(grpc.StatusCode.DEADLINE_EXCEEDED))
    assert final.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no answer within 2.0 s, retries included" in final.details
    refused = error(grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    assert retry.final(refused) is refused


def test_a_stream_reopens_at_most_max_retries_times_and_at_once_after_a_rewind():
    retry = policy.StreamRetry(ClientOptions(max_retries=2))
    assert retry.backoff_after(error(), rewound=True) == 0.0
    assert retry.backoff_after(error(), rewound=False) is not None
    assert retry.backoff_after(error(), rewound=False) is None
    fresh = policy.StreamRetry(ClientOptions())
    assert fresh.backoff_after(error(grpc.StatusCode.INVALID_ARGUMENT, "BAD_INPUT"), False) is None


def test_both_clients_give_up_on_an_unreachable_server_within_the_deadline():
    """Retries without end (they once ran on past the deadline for 13 s): only the deadline
    can end the call, and it does, with its own code."""
    options = ClientOptions(
        target=f"127.0.0.1:{free_port()}",
        deadline_s=1.0,
        max_retries=1_000_000,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
    )
    with StreamingClient(options=options) as client, pytest.raises(LstmStreamError) as sync_err:
        client.info()

    async def async_info():
        async with AsyncStreamingClient(options=options) as client:
            await client.info()

    with pytest.raises(LstmStreamError) as async_err:
        asyncio.run(async_info())
    for err in (sync_err, async_err):
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, err.value


def test_async_open_session_works_with_async_with_and_with_await(server, bundled_model):
    steps = random_steps(6, 6, seed=31)

    async def run():
        async with AsyncStreamingClient(server.target) as client:
            async with client.open_session() as session:
                first = await session.send(steps[:3])
                session_id = session.session_id
            with pytest.raises(LstmStreamError) as err:  # the block's end ended the session
                await client.get_session(session_id)
            assert err.value.reason == "SESSION_NOT_FOUND"
            session = await client.open_session()
            await session.send(steps[:3])
            kept = session.detach()
            async with client.attach(kept) as again:
                rest = await again.send(steps[3:])
            return first, rest

    first, rest = asyncio.run(run())
    expected = offline(bundled_model, steps)
    np.testing.assert_allclose(first, expected[:3], atol=1e-5, rtol=0)
    np.testing.assert_allclose(rest, expected[3:], atol=1e-5, rtol=0)


def test_detach_returns_the_id_that_attach_continues(client, bundled_model):
    steps = random_steps(8, 6, seed=32)
    session = client.open_session()
    first = session.send(steps[:5])
    session_id = session.detach()
    assert session_id == session.session_id
    with client.attach(session_id) as again:
        assert again.next_step == 5
        rest = again.send(steps[5:])
    outputs = np.concatenate([first, rest])
    np.testing.assert_allclose(outputs, offline(bundled_model, steps), atol=1e-5, rtol=0)


def test_a_with_block_ends_its_session_when_it_raises_and_keeps_a_detached_one(client):
    with pytest.raises(RuntimeError, match="the caller's own"), client.open_session() as session:
        session.send(random_steps(2, 6, seed=33))
        raise RuntimeError("the caller's own")
    with pytest.raises(LstmStreamError) as gone:
        client.get_session(session.session_id)
    assert (gone.value.code, gone.value.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    with client.open_session() as kept:
        kept.send(random_steps(3, 6, seed=34))
        kept_id = kept.detach()
    assert client.get_session(kept_id).next_step == 3
    with pytest.raises(KeyError), client.attach(kept_id) as again:  # detached, then raised
        again.detach()
        raise KeyError("kept all the same")
    assert client.get_session(kept_id).next_step == 3


def test_an_async_with_block_ends_its_session_when_it_raises_and_keeps_a_detached_one(server):
    async def run():
        async with AsyncStreamingClient(server.target) as client:
            with pytest.raises(RuntimeError, match="the caller's own"):
                async with client.open_session() as session:
                    await session.send(random_steps(2, 6, seed=35))
                    raise RuntimeError("the caller's own")
            with pytest.raises(LstmStreamError) as gone:
                await client.get_session(session.session_id)
            async with client.open_session() as kept:
                await kept.send(random_steps(3, 6, seed=36))
                kept_id = kept.detach()
            return gone.value, (await client.get_session(kept_id)).next_step

    gone, kept_step = asyncio.run(run())
    assert (gone.code, gone.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    assert kept_step == 3


def test_a_session_that_cannot_be_ended_leaves_the_blocks_own_exception():
    """The server gone: ending the session fails, and the caller sees their exception, with a
    note naming the session, not the failure to end it."""
    from tests.factories import ServeProcess

    def options(srv: ServeProcess) -> ClientOptions:
        return ClientOptions(target=srv.target, deadline_s=2.0, max_retries=1)

    with (
        ServeProcess() as srv,
        StreamingClient(options=options(srv)) as client,
        pytest.raises(RuntimeError) as sync_err,
        client.open_session() as session,
    ):
        session.send(random_steps(1, 6))
        srv.finish()
        raise RuntimeError("the caller's own")

    async def run(srv: ServeProcess):
        async with AsyncStreamingClient(options=options(srv)) as c, c.open_session() as session:
            await session.send(random_steps(1, 6))
            srv.finish()
            raise RuntimeError("the caller's own")

    with ServeProcess() as srv, pytest.raises(RuntimeError) as async_err:
        asyncio.run(run(srv))
    for err in (sync_err, async_err):
        assert str(err.value) == "the caller's own"
        (note,) = err.value.__notes__
        assert "was not ended" in note and "idle timeout" in note


WRONG_WIDTHS = [
    ([[0.0] * 5], "expected shape (num_steps, input_size=6), got (1, 5)"),
    ([0.0] * 7, "expected a multiple of input_size=6 values (num_steps * input_size), got 7"),
    ([[0.0] * 6, [0.0] * 5], "expected numbers in rows of input_size=6, got"),
]


def assert_bad_input(err: pytest.ExceptionInfo, message: str) -> None:
    assert isinstance(err.value, LstmStreamError)
    assert isinstance(err.value, ValueError)  # what the SDK raised before, still caught so
    assert (err.value.code, err.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "BAD_INPUT")
    assert message in err.value.details


@pytest.mark.parametrize(("inputs", "message"), WRONG_WIDTHS)
def test_a_wrong_input_width_is_bad_input_in_the_sync_sdk(client, inputs, message):
    with client.open_session() as session:
        with pytest.raises(LstmStreamError) as sent:
            session.send(inputs)
        assert_bad_input(sent, message)
        assert session.send(random_steps(1, 6)).shape == (1, 4)  # nothing was sent
        with pytest.raises(LstmStreamError) as stepped:
            session.step([0.0] * 5)
        assert_bad_input(stepped, "got (1, 5)")
    with pytest.raises(LstmStreamError) as predicted:
        client.predict(inputs)
    assert_bad_input(predicted, message)
    with pytest.raises(LstmStreamError) as batched:
        client.step_batch({f"width-{len(message)}": inputs})
    assert_bad_input(batched, message)
    assert f"session 'width-{len(message)}': " in batched.value.details


def test_a_wrong_input_width_is_bad_input_in_the_async_sdk(server):
    async def run():
        errors = []
        async with AsyncStreamingClient(server.target) as client, client.open_session() as s:
            for call in (
                s.send([[0.0] * 5]),
                s.step([0.0] * 5),
                client.predict([[0.0] * 5]),
                client.step_batch({"async-width": [[0.0] * 5]}),
            ):
                with pytest.raises(LstmStreamError) as err:
                    await call
                errors.append(err)
            assert (await s.send(random_steps(1, 6))).shape == (1, 4)
        return errors

    for err in asyncio.run(run()):
        assert_bad_input(err, "expected shape (num_steps, input_size=6), got (1, 5)")


def test_a_batch_with_one_wrong_width_feeds_none_of_its_sessions(client):
    with pytest.raises(LstmStreamError) as err:
        client.step_batch({"batch-good": random_steps(1, 6), "batch-bad": [[0.0] * 5]})
    assert_bad_input(err, "session 'batch-bad': ")
    result = client.step_batch({"batch-good": random_steps(2, 6)})
    assert result["batch-good"].shape == (2, 4)
    assert client.get_session("batch-good").next_step == 2  # the refused batch's chunk never went


def test_a_chunk_the_server_refuses_does_not_block_the_session(server, bundled_model):
    """NaN passes the SDK's width check and is refused by the server (BAD_INPUT): the session
    goes on from where the refused chunk began, in both SDKs, each good step applied once."""
    steps = random_steps(4, 6, seed=41)
    bad = np.full((2, 6), np.nan, np.float32)

    with StreamingClient(server.target) as client:
        session = client.open_session()
        first = session.send(steps[:2])
        with pytest.raises(LstmStreamError) as refused:
            session.send(bad)
        assert refused.value.reason == "BAD_INPUT"
        assert session.next_step == 2
        rest = session.send(steps[2:])
        sync_id = session.detach()
    assert_equals_offline(np.concatenate([first, rest]), bundled_model, steps)
    assert_state_equals_offline(server.target, sync_id, bundled_model, steps)

    async def run():
        async with AsyncStreamingClient(server.target) as client:
            session = await client.open_session()
            first = await session.send(steps[:2])
            with pytest.raises(LstmStreamError) as refused:
                await session.send(bad)
            assert refused.value.reason == "BAD_INPUT"
            rest = await session.send(steps[2:])
            return np.concatenate([first, rest]), session.detach()

    outputs, async_id = asyncio.run(run())
    assert_equals_offline(outputs, bundled_model, steps)
    assert_state_equals_offline(server.target, async_id, bundled_model, steps)
