"""A session outlives its stream, expires when idle, and its freed slot starts from zero."""

import grpc
import numpy as np
import pytest
import torch

from lstm_stream.client import LstmStreamError, StreamingClient
from lstm_stream.v1 import inference_pb2 as pb
from tests.equality import assert_equals_offline, assert_state_equals_offline
from tests.factories import RawStream, random_steps, serve, wait_for


def test_disconnect_then_resume_loses_and_repeats_nothing(server, client, bundled_model):
    steps = random_steps(30, 6, seed=31)
    stream = RawStream(server.target)
    got = [stream.outputs(steps[:10]), stream.outputs(steps[10:17])]
    stream.close()  # the connection drops with the stream

    # The client last saw step 16's output; it resends from 14 (a replayed overlap) on.
    with RawStream(server.target, stream.session_id) as resumed:
        start, overlap = resumed.send(steps[14:22], start_step=14)
        assert start == 14
        got.append(overlap[3:])
        got.append(resumed.outputs(steps[22:], start_step=22))
    assert client.get_session(stream.session_id).next_step == 30
    assert_equals_offline(overlap[:3], bundled_model, steps, first=14)
    assert_equals_offline(np.concatenate(got), bundled_model, steps)
    assert_state_equals_offline(server.target, stream.session_id, bundled_model, steps)


def test_get_session_reports_steps_and_times(client):
    with client.open_session() as session:
        session.send(random_steps(5, 6))
        info = client.get_session(session.session_id)
    assert info.next_step == 5
    assert info.create_time.seconds > 1_700_000_000
    assert info.last_active_time.ToNanoseconds() >= info.create_time.ToNanoseconds()


def test_end_session_deletes_after_answering(server, client):
    with RawStream(server.target) as stream:
        outputs = stream.outputs(random_steps(2, 6), end_session=True)
    assert outputs.shape == (2, 4)
    with pytest.raises(LstmStreamError) as err:
        client.get_session(stream.session_id)
    assert err.value.reason == "SESSION_NOT_FOUND"


def test_messages_after_end_session_are_not_read(server, client):
    """The server ends the stream (OK) once end_session is answered; a message written after
    it gets no answer and is applied nowhere."""
    with RawStream(server.target) as stream:
        stream.outputs(random_steps(2, 6), end_session=True)
        stream.write(random_steps(3, 6))
        assert stream.end_status() == grpc.StatusCode.OK
    with pytest.raises(LstmStreamError) as err:
        client.get_session(stream.session_id)
    assert err.value.reason == "SESSION_NOT_FOUND"


def test_idle_sessions_expire_and_their_slot_is_zeroed():
    with serve(session_idle_timeout_s=0.3) as srv:
        stream = RawStream(srv.target)
        stream.send(random_steps(5, 6, scale=10))
        slot = srv.server.runtime.sessions.get(stream.session_id).slot
        model = srv.server.runtime.models.resolve()  # the default model's newest version
        h, c = srv.call(model.engine.call(model.pool.read, [slot]))
        assert h.abs().sum() > 0
        stream.close()
        wait_for(lambda: len(srv.server.runtime.sessions) == 0, what="the session to expire")
        with (
            pytest.raises(LstmStreamError) as err,
            RawStream(srv.target, stream.session_id) as again,
        ):
            again.send([0.0] * 6)
        assert (err.value.code, err.value.reason) == (
            grpc.StatusCode.NOT_FOUND,
            "SESSION_NOT_FOUND",
        )
        h, c = srv.call(model.engine.call(model.pool.read, [slot]))
        assert torch.count_nonzero(h) == 0 and torch.count_nonzero(c) == 0


def test_expiry_takes_idle_sessions_and_spares_active_ones_created_before_them(bundled_model):
    """The sweeper walks sessions in order of last activity: sessions kept active, though
    created first, must neither expire nor hide the idle ones created after them."""
    timeout = 2.0
    steps = random_steps(400, 6, seed=21)
    with serve(session_idle_timeout_s=timeout) as srv, StreamingClient(srv.target) as client:
        active = [RawStream(srv.target) for _ in range(3)]
        outputs = [[stream.outputs(steps[:1])] for stream in active]
        idle = []
        for _ in range(6):
            with RawStream(srv.target) as stream:
                stream.send(steps[:1])
            idle.append(stream.session_id)

        def all_idle_expired() -> bool:
            for i, stream in enumerate(active):  # each message keeps its session active
                t = len(outputs[i])
                outputs[i].append(stream.outputs(steps[t : t + 1]))
            return not any(_exists(client, session_id) for session_id in idle)

        wait_for(all_idle_expired, timeout=60, interval=0.1, what="the idle sessions to expire")
        for i, stream in enumerate(active):
            sent = len(outputs[i])
            assert client.get_session(stream.session_id).next_step == sent
            assert_equals_offline(np.concatenate(outputs[i]), bundled_model, steps[:sent])
            stream.close()
        assert len(srv.server.runtime.sessions) == len(active)


def _exists(client, session_id: str) -> bool:
    try:
        client.get_session(session_id)
    except LstmStreamError as err:
        assert err.reason == "SESSION_NOT_FOUND"
        return False
    return True


def test_a_reused_slot_never_leaks_state_into_its_next_owner(bundled_model):
    """Triton issue 7117: state leaking through a reused slot. One slot, used in turn."""
    with serve(max_sessions=1) as srv, StreamingClient(srv.target) as client:
        for seed in range(3):
            steps = random_steps(10, 6, seed=seed, scale=8)
            session = client.open_session()
            outputs = session.send(steps)
            session.detach()
            client.delete_session(session.session_id)
            assert_equals_offline(outputs, bundled_model, steps)


def test_health_and_reflection_are_served(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "lstm_stream.v1.InferenceService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(reflection.ServerReflectionInfo(iter([request])))
        names = {s.name for s in response.list_services_response.service}
        assert {"lstm_stream.v1.InferenceService", "grpc.health.v1.Health"} <= names


def test_model_info_describes_the_bundled_model(client):
    info = client.info()
    assert (info.name, info.input_size, info.output_size, info.num_layers) == (
        "basic-motions",
        6,
        4,
        2,
    )
    assert info.hidden_size == 48
    assert info.output_kind == pb.OUTPUT_KIND_CLASSIFICATION
    assert list(info.labels) == ["badminton", "running", "standing", "walking"]
    assert (info.device, info.dtype, info.max_chunk_steps) == ("cpu", "float32", 512)
