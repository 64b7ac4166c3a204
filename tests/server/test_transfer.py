"""ExportSession / ImportSession: a session moves between two running servers mid-stream."""

import grpc
import numpy as np
import pytest
from lstm_stream.v1 import inference_pb2 as pb

from client import LstmStreamError, StreamingClient
from lstm_model.cli import main as lstm_model_main
from tests.factories import offline, random_steps, serve


def test_a_session_moves_between_servers_mid_stream(bundled_model):
    steps = random_steps(40, 6, seed=60)
    with (
        serve(replay_steps=16) as a,
        serve() as b,
        StreamingClient(a.target) as on_a,
        StreamingClient(b.target) as on_b,
    ):
        session = on_a.open_session()
        first = session.send(steps[:25])
        state = on_a._call(
            on_a.stub.ExportSession, pb.ExportSessionRequest(session_id=session.session_id)
        ).state
        session.close()
        imported = on_b._call(on_b.stub.ImportSession, pb.ImportSessionRequest(state=state)).session
        assert (imported.session_id, imported.next_step) == (session.session_id, 25)
        assert imported.replay_start_step == 9
        with on_b.open_session(session.session_id) as moved:
            overlap = moved.send(steps[20:], start_step=20)  # a resend the replay buffer answers
    expected = offline(bundled_model, steps)
    np.testing.assert_allclose(first, expected[:25], atol=1e-5, rtol=0)
    np.testing.assert_allclose(overlap, expected[20:], atol=1e-5, rtol=0)


def test_import_refuses_another_models_state_and_garbage(tmp_path, client):
    lstm_model_main(
        [
            "init",
            "--input-size",
            "6",
            "--hidden-size",
            "48",
            "--num-layers",
            "2",
            "--output-size",
            "4",
            "--out",
            str(tmp_path / "other"),
        ]
    )
    with serve(model=str(tmp_path / "other")) as other, StreamingClient(other.target) as on_other:
        session = on_other.open_session()
        session.send(random_steps(3, 6))
        state = on_other._call(
            on_other.stub.ExportSession, pb.ExportSessionRequest(session_id=session.session_id)
        ).state
        session.close()
    with pytest.raises(LstmStreamError) as err:
        client._call(client.stub.ImportSession, pb.ImportSessionRequest(state=state))
    assert (err.value.code, err.value.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "MODEL_MISMATCH",
    )
    for garbage in (b"", b"\x00" * 3, b"\xff" * 64, state[: len(state) // 2]):
        with pytest.raises(LstmStreamError) as err:
            client._call(client.stub.ImportSession, pb.ImportSessionRequest(state=garbage))
        assert err.value.reason == "BAD_INPUT"
