"""What a durable record keeps of a session's outputs, seen through real servers and a real
redis-server: the tail a client can still ask for, and the refusal of a resend older than it
after the replica is lost."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from lstm_stream.client import ClientOptions, StreamingClient
from lstm_stream.v1 import inference_pb2 as pb
from lstm_stream.v1 import inference_pb2_grpc as pb_grpc
from server.store_backend import KeyLayout
from tests.e2e.scale_parts import RedisServer
from tests.equality import assert_equals_offline, assert_state_equals_offline
from tests.factories import ServeProcess, random_steps, wait_for

LAYERS, HIDDEN, OUTPUTS = 2, 48, 4  # the bundled model
STATE_BYTES = 2 * LAYERS * HIDDEN * 4  # h and c, float32


def stored(redis: RedisServer, session_id: str) -> tuple[int, int]:
    """The stored record's step and how many outputs it keeps."""
    key = KeyLayout(redis.url, "").session("", session_id)
    step, state = redis.client().hmget(key, "step", "state")
    if step is None:
        return -1, 0
    return int(step), (len(state) - STATE_BYTES) // (4 * OUTPUTS)


def chunk(steps: np.ndarray, start: int, answered: int | None = None, **fields):
    return pb.StreamStepsRequest(
        start_step=start,
        packed_inputs=steps.astype("<f4").tobytes(),
        answered_step=answered,
        **fields,
    )


def stream(target: str, requests: list, create: str = "") -> list[pb.StreamStepsResponse]:
    """Send the requests on one stream (after creating session `create`); the responses."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        if create:
            stub.CreateSession(pb.CreateSessionRequest(session_id=create))
        return list(stub.StreamSteps(iter(requests), timeout=30))


def outputs_of(responses) -> np.ndarray:
    return np.concatenate(
        [np.frombuffer(r.packed_outputs, "<f4").reshape(r.num_steps, OUTPUTS) for r in responses]
    )


def test_a_resend_older_than_the_stored_tail_is_refused_naming_the_oldest_step(bundled_model):
    """The client said it had every output before step 7: the record at step 10 keeps outputs
    7..9. After the replica is lost, a resend from 5 is refused naming 7; one from 7 is
    answered from the record and goes on, each step applied once."""
    steps = random_steps(12, 6, seed=27)
    with RedisServer() as redis:
        store = ("--state-store", redis.url, "--state-store-interval-ms", "0")
        with ServeProcess(*store) as first:
            requests = [chunk(steps[i : i + 1], i, answered=min(i, 7)) for i in range(10)]
            requests[0].session_id = "tail"
            before = outputs_of(stream(first.target, requests, create="tail"))
            wait_for(lambda: stored(redis, "tail")[0] == 10, 30, what="the record at step 10")
            assert stored(redis, "tail") == (10, 3)
            first.process.kill()
        with ServeProcess(*store) as second:
            with pytest.raises(grpc.RpcError) as refused:
                stream(second.target, [chunk(steps[5:10], 5, session_id="tail")])
            resumed = stream(second.target, [chunk(steps[7:12], 7, session_id="tail")])
            assert_state_equals_offline(second.target, "tail", bundled_model, steps)
    error = refused.value
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "expected at least 7 (the oldest step whose output this server holds)" in error.details()
    assert "or the next step 10, got 5" in error.details()
    after = outputs_of(resumed)
    np.testing.assert_array_equal(after[:3], before[7:10])  # answered from the record
    assert_equals_offline(after, bundled_model, steps, first=7)


def test_the_sdk_says_what_it_has_so_a_record_keeps_one_output(bundled_model):
    """An SDK session stepping one timestep at a time says, with each step, that it has every
    output before it: its record holds h, c and the last output only (whose arrival nobody has
    confirmed). A client that says nothing gets the last --replay-steps outputs kept."""
    steps = random_steps(20, 6, seed=28)
    with (
        RedisServer() as redis,
        ServeProcess("--state-store", redis.url, "--replay-steps", "16") as proc,
    ):
        options = ClientOptions(target=proc.target)
        with (
            StreamingClient(options=options) as client,
            client.open_session(session_id="sdk") as session,
        ):
            outputs = np.stack([session.step(x) for x in steps])
            wait_for(lambda: stored(redis, "sdk")[0] == 20, 30, what="the SDK's record")
            sdk_record = stored(redis, "sdk")
        stream(proc.target, [chunk(steps, 0, session_id="quiet")], create="quiet")
        wait_for(lambda: stored(redis, "quiet")[0] == 20, 30, what="the silent client's record")
        quiet_record = stored(redis, "quiet")
    assert sdk_record == (20, 1)
    assert quiet_record == (20, 16)  # --replay-steps
    assert_equals_offline(outputs, bundled_model, steps)
