"""The SDK's own promises: a deadline bounds a call's retries, sessions are context managers in
both clients, detach hands back the id that attach continues."""

import asyncio
import time

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


# A ceiling far above the 1 s deadline and far below the 13 s that retries took before the
# deadline covered them all.
GIVE_UP_WITHIN_S = 6.0


def test_both_clients_give_up_on_an_unreachable_server_within_the_deadline():
    options = ClientOptions(target=f"127.0.0.1:{free_port()}", deadline_s=1.0)
    started = time.monotonic()
    with StreamingClient(options=options) as client, pytest.raises(LstmStreamError) as sync_err:
        client.info()
    sync_elapsed = time.monotonic() - started

    async def async_info():
        async with AsyncStreamingClient(options=options) as client:
            await client.info()

    started = time.monotonic()
    with pytest.raises(LstmStreamError) as async_err:
        asyncio.run(async_info())
    async_elapsed = time.monotonic() - started
    for err, elapsed in ((sync_err, sync_elapsed), (async_err, async_elapsed)):
        assert err.value.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        assert elapsed < GIVE_UP_WITHIN_S, f"gave up after {elapsed:.1f} s"


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
