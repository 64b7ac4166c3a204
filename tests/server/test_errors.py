"""Every row of the error table (DESIGN Part 1.2): code, ErrorInfo reason, a message naming what
was expected and what arrived, and no change to the session."""

import math

import grpc
import numpy as np
import pytest

from client import LstmStreamError, StreamingClient
from tests.factories import offline, random_steps, serve


def expect_error(code, reason, fn, *args, **kwargs) -> LstmStreamError:
    with pytest.raises(LstmStreamError) as err:
        fn(*args, **kwargs)
    assert (err.value.code, err.value.reason) == (code, reason), err.value
    return err.value


BAD = grpc.StatusCode.INVALID_ARGUMENT


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
def test_bad_inputs_are_refused_and_change_nothing(client, bundled_model, inputs, message):
    good = random_steps(6, 6, seed=1)
    session = client.open_session()
    session.send(good[:3])
    session_id = session.session_id
    error = expect_error(BAD, "BAD_INPUT", session.send, np.asarray(inputs).reshape(1, -1))
    assert message in error.details
    # The stream ended with the error; the session is untouched: resume and compare.
    with client.open_session(session_id) as resumed:
        rest = resumed.send(good[3:], start_step=3)
    np.testing.assert_allclose(rest, offline(bundled_model, good)[3:], atol=1e-5, rtol=0)


def test_session_ids_that_disagree_are_refused(client):
    from lstm_stream.v1 import inference_pb2 as pb

    created = client.stub.CreateSession(pb.CreateSessionRequest()).session
    call = client.stub.StreamSteps(
        iter([pb.StreamStepsRequest(session_id=created.session_id)]),
        metadata=(("x-session-id", "someone-else"),),
    )
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == BAD
    assert "session ids disagree" in err.value.details()


def test_malformed_session_id_is_refused(client):
    error = expect_error(BAD, "BAD_INPUT", lambda: client.open_session("bad id!").send([0.0] * 6))
    assert "expected 1-128 characters" in error.details


def test_predict_with_a_wrong_num_steps_is_refused(client):
    from lstm_stream.v1 import inference_pb2 as pb

    with pytest.raises(grpc.RpcError) as err:
        client.stub.Predict(pb.PredictRequest(inputs=[0.0] * 12, num_steps=3))
    assert err.value.code() == BAD
    assert "num_steps: expected 2" in err.value.details()


def test_unknown_and_deleted_sessions_are_not_found(client):
    from lstm_stream.v1 import inference_pb2 as pb

    expect_error(
        grpc.StatusCode.NOT_FOUND,
        "SESSION_NOT_FOUND",
        lambda: client.open_session("no-such-session").send([0.0] * 6),
    )
    session = client.open_session()
    session.send([0.0] * 6)
    session.close()
    client._call(client.stub.DeleteSession, pb.DeleteSessionRequest(session_id=session.session_id))
    expect_error(
        grpc.StatusCode.NOT_FOUND,
        "SESSION_NOT_FOUND",
        client._call,
        client.stub.GetSession,
        pb.GetSessionRequest(session_id=session.session_id),
    )
    expect_error(
        grpc.StatusCode.NOT_FOUND,
        "SESSION_NOT_FOUND",
        lambda: client.open_session(session.session_id).send([0.0] * 6),
    )


def test_creating_an_id_in_use_is_already_exists(client):
    from lstm_stream.v1 import inference_pb2 as pb

    request = pb.CreateSessionRequest(session_id="chosen-by-client-1")
    created = client._call(client.stub.CreateSession, request).session
    assert created.session_id == "chosen-by-client-1"
    assert created.next_step == 0
    expect_error(
        grpc.StatusCode.ALREADY_EXISTS,
        "SESSION_EXISTS",
        client._call,
        client.stub.CreateSession,
        request,
    )


def test_gap_is_refused_with_expected_step(client):
    with client.open_session() as session:
        session.send(random_steps(4, 6))
        error = expect_error(
            grpc.StatusCode.FAILED_PRECONDITION,
            "STEP_OUT_OF_ORDER",
            session.send,
            random_steps(2, 6),
            start_step=6,
        )
    assert error.metadata == {"expected_step": "4"}
    assert "expected at most the session's next step 4, got 6" in error.details


def test_resend_older_than_the_replay_buffer_is_refused(tmp_path):
    with (
        serve(replay_steps=5) as srv,
        StreamingClient(srv.target) as client,
        client.open_session() as session,
    ):
        session.send(random_steps(12, 6))
        error = expect_error(
            grpc.StatusCode.FAILED_PRECONDITION,
            "STEP_OUT_OF_ORDER",
            session.send,
            random_steps(3, 6),
            start_step=6,
        )
    assert error.metadata == {"expected_step": "12"}
    assert "expected at least 7" in error.details


def test_capacity_is_resource_exhausted_and_frees_on_delete():
    from lstm_stream.v1 import inference_pb2 as pb

    with serve(max_sessions=3) as srv, StreamingClient(srv.target) as client:
        ids = [
            client._call(client.stub.CreateSession, pb.CreateSessionRequest()).session.session_id
            for _ in range(3)
        ]
        error = expect_error(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "SESSION_CAPACITY",
            client._call,
            client.stub.CreateSession,
            pb.CreateSessionRequest(),
        )
        assert "3 sessions are live" in error.details
        expect_error(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "SESSION_CAPACITY",
            lambda: client.open_session().send([0.0] * 6),
        )
        client._call(client.stub.DeleteSession, pb.DeleteSessionRequest(session_id=ids[0]))
        with client.open_session() as session:
            assert session.send([0.0] * 6).shape == (1, 4)


def test_takeover_aborts_the_older_stream(client, bundled_model):
    steps = random_steps(8, 6, seed=21)
    old = client.open_session()
    old.send(steps[:4])
    new = client.open_session(old.session_id)
    rest = new.send(steps[4:], start_step=4)
    np.testing.assert_allclose(rest, offline(bundled_model, steps)[4:], atol=1e-5, rtol=0)
    error = expect_error(grpc.StatusCode.ABORTED, "SESSION_TAKEN_OVER", old.send, steps[:1])
    assert "taken over" in error.details
    new.close()


def test_draining_server_is_not_serving_and_refuses_with_unavailable():
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with serve() as srv, StreamingClient(srv.target) as client:
        live = client.open_session()
        live.send([0.0] * 6)
        srv.call(srv.server.begin_drain())
        with grpc.insecure_channel(srv.target) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
        expect_error(
            grpc.StatusCode.UNAVAILABLE,
            "SHUTTING_DOWN",
            lambda: client.open_session().send([0.0] * 6),
        )
        expect_error(grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", live.send, [0.0] * 6)
