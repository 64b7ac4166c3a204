"""Every row of the error table (DESIGN Part 1.2): code, ErrorInfo reason, a message naming what
was expected and what arrived, and no change to the session."""

import math

import grpc
import pytest

from lstm_stream.client import LstmStreamError, StreamingClient
from lstm_stream.v1 import inference_pb2 as pb
from tests.equality import assert_equals_offline, assert_state_equals_offline
from tests.factories import RawStream, random_steps, serve

BAD = grpc.StatusCode.INVALID_ARGUMENT


def expect_error(code, reason, fn, *args, **kwargs) -> LstmStreamError:
    with pytest.raises(LstmStreamError) as err:
        fn(*args, **kwargs)
    assert (err.value.code, err.value.reason) == (code, reason), err.value
    return err.value


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([1.0] * 7, "expected a multiple of input_size=6 values (num_steps * input_size), got 7"),
        ([1.0] * 5 + [math.nan], "expected finite numbers, got nan at timestep 0, feature 5"),
        ([1.0] * 6 + [math.inf] * 6, "expected finite numbers, got inf at timestep 1, feature 0"),
        ([0.5] * 6 * 513, "expected at most max_chunk_steps=512 timesteps per message, got 513"),
    ],
    ids=["width", "nan", "inf", "too-many-steps"],
)
def test_bad_inputs_are_refused_and_change_nothing(server, bundled_model, inputs, message):
    good = random_steps(6, 6, seed=1)
    with RawStream(server.target) as stream:
        stream.send(good[:3])
        error = expect_error(BAD, "BAD_INPUT", stream.send, inputs)
    assert message in error.details
    # The stream ended with the error; the session is untouched: resume and compare.
    with RawStream(server.target, stream.session_id) as resumed:
        start, rest = resumed.send(good[3:], start_step=3)
    assert start == 3
    assert_equals_offline(rest, bundled_model, good, first=3)


def test_a_bad_first_message_creates_no_session():
    with serve() as srv:
        with RawStream(srv.target) as stream:
            expect_error(BAD, "BAD_INPUT", stream.send, [1.0] * 5)
        assert len(srv.server.runtime.sessions) == 0


def test_session_ids_that_disagree_are_refused(server, client):
    created = client.call("CreateSession", pb.CreateSessionRequest()).session
    metadata = (("x-session-id", "someone-else"),)
    with RawStream(server.target, created.session_id, metadata=metadata) as stream:
        error = expect_error(BAD, "BAD_INPUT", stream.send, [0.0] * 6)
    assert "session ids disagree" in error.details
    with RawStream(server.target, created.session_id) as stream:
        stream.send([0.0] * 6)
        error = expect_error(BAD, "BAD_INPUT", stream.send, [0.0] * 6, session_id="other")
    assert "this stream's session" in error.details


def test_malformed_session_id_is_refused(server):
    with RawStream(server.target, "bad id!") as stream:
        error = expect_error(BAD, "BAD_INPUT", stream.send, [0.0] * 6)
    assert "expected 1-128 characters" in error.details


def test_predict_with_a_wrong_num_steps_is_refused(client):
    error = expect_error(
        BAD, "BAD_INPUT", client.call, "Predict", pb.PredictRequest(inputs=[0.0] * 12, num_steps=3)
    )
    assert "num_steps: expected 2" in error.details


def test_unknown_and_deleted_sessions_are_not_found(server, client):
    not_found = (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    with RawStream(server.target, "no-such-session") as stream:
        expect_error(*not_found, stream.send, [0.0] * 6)
    with RawStream(server.target) as stream:
        stream.send([0.0] * 6)
    client.delete_session(stream.session_id)
    expect_error(*not_found, client.get_session, stream.session_id)
    expect_error(*not_found, client.delete_session, stream.session_id)
    expect_error(
        *not_found,
        client.call,
        "ExportSession",
        pb.ExportSessionRequest(session_id=stream.session_id),
    )
    with RawStream(server.target, stream.session_id) as again:
        expect_error(*not_found, again.send, [0.0] * 6)


def test_creating_an_id_in_use_is_already_exists(client):
    request = pb.CreateSessionRequest(session_id="chosen-by-client-1")
    created = client.call("CreateSession", request).session
    assert (created.session_id, created.next_step) == ("chosen-by-client-1", 0)
    expect_error(
        grpc.StatusCode.ALREADY_EXISTS, "SESSION_EXISTS", client.call, "CreateSession", request
    )
    expect_error(
        grpc.StatusCode.ALREADY_EXISTS, "SESSION_EXISTS", client.open_session, "chosen-by-client-1"
    )


def test_gap_is_refused_with_expected_step(server):
    with RawStream(server.target) as stream:
        stream.send(random_steps(4, 6))
        error = expect_error(
            grpc.StatusCode.FAILED_PRECONDITION,
            "STEP_OUT_OF_ORDER",
            stream.send,
            random_steps(2, 6),
            start_step=6,
        )
    assert error.metadata == {"expected_step": "4"}
    assert "expected at most the session's next step 4, got 6" in error.details


def test_resend_older_than_the_replay_buffer_is_refused(bundled_model):
    steps = random_steps(12, 6)
    with serve(replay_steps=5) as srv, RawStream(srv.target) as stream:
        stream.send(steps)
        error = expect_error(
            grpc.StatusCode.FAILED_PRECONDITION,
            "STEP_OUT_OF_ORDER",
            stream.send,
            random_steps(3, 6),
            start_step=6,
        )
        assert_state_equals_offline(srv.target, stream.session_id, bundled_model, steps)
    assert error.metadata == {"expected_step": "12", "oldest_step": "7"}
    assert "expected at least 7" in error.details


def test_capacity_is_resource_exhausted_and_frees_on_delete():
    exhausted = (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_CAPACITY")
    with serve(max_sessions=3) as srv, StreamingClient(srv.target) as client:
        ids = [
            client.call("CreateSession", pb.CreateSessionRequest()).session.session_id
            for _ in range(3)
        ]
        error = expect_error(*exhausted, client.open_session)
        assert "3 sessions are live" in error.details
        with RawStream(srv.target) as stream:
            expect_error(*exhausted, stream.send, [0.0] * 6)
        client.delete_session(ids[0])
        with client.open_session() as session:
            assert session.send([0.0] * 6).shape == (1, 4)


def test_takeover_aborts_the_older_stream(server, bundled_model):
    steps = random_steps(8, 6, seed=21)
    old = RawStream(server.target)
    old.send(steps[:4])
    with RawStream(server.target, old.session_id) as new:
        _, rest = new.send(steps[4:], start_step=4)
        assert_equals_offline(rest, bundled_model, steps, first=4)
        error = expect_error(grpc.StatusCode.ABORTED, "SESSION_TAKEN_OVER", old.send, steps[:1])
    assert "taken over" in error.details
    old.close()
    assert_state_equals_offline(server.target, old.session_id, bundled_model, steps)


def test_an_idle_older_stream_ends_aborted_at_once(server):
    """The displaced stream ends even while it is waiting for its client's next message."""
    old = RawStream(server.target)
    old.send([0.0] * 6)
    with RawStream(server.target, old.session_id) as new:
        new.send([0.0] * 6)
        with pytest.raises(grpc.RpcError) as err:
            next(old._responses)  # no request sent: the server ends the call by itself
    assert err.value.code() == grpc.StatusCode.ABORTED
    old.close()


def test_draining_server_is_not_serving_and_refuses_with_unavailable():
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    unavailable = (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")
    with serve() as srv, RawStream(srv.target) as live:
        live.send([0.0] * 6)
        srv.call(srv.server.begin_drain())
        with grpc.insecure_channel(srv.target) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with RawStream(srv.target) as fresh:
            expect_error(*unavailable, fresh.send, [0.0] * 6)
        with pytest.raises(grpc.RpcError) as err:
            next(live._responses)  # the idle live stream was ended by the drain
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
