"""ExportSession / ImportSession: a session moves between two running servers mid-stream."""

import grpc
import pytest

from lstm_model.cli import main as lstm_model_main
from lstm_stream.client import LstmStreamError, StreamingClient
from lstm_stream.v1 import inference_pb2 as pb
from tests.equality import assert_equals_offline, assert_state_equals_offline
from tests.factories import RawStream, random_steps, serve


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
        session.detach()
        export = pb.ExportSessionRequest(session_id=session.session_id)
        state = on_a.call("ExportSession", export).state
        imported = on_b.call("ImportSession", pb.ImportSessionRequest(state=state)).session
        assert (imported.session_id, imported.next_step) == (session.session_id, 25)
        assert imported.replay_start_step == 9
        with RawStream(b.target, session.session_id) as moved:
            # A resend from step 20 on: the imported replay buffer answers 20..24.
            overlap = moved.outputs(steps[20:], start_step=20)
            assert_state_equals_offline(b.target, session.session_id, bundled_model, steps)
            # The exported copy left behind on a is untouched by what b applied.
            assert_state_equals_offline(a.target, session.session_id, bundled_model, steps[:25])
    assert_equals_offline(first, bundled_model, steps)
    assert_equals_offline(overlap, bundled_model, steps, first=20)


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
    with (
        serve(model=str(tmp_path / "other")) as other,
        StreamingClient(other.target) as on_other,
        on_other.open_session() as session,
    ):
        session.send(random_steps(3, 6))
        export = pb.ExportSessionRequest(session_id=session.session_id)
        state = on_other.call("ExportSession", export).state
    with pytest.raises(LstmStreamError) as err:
        client.call("ImportSession", pb.ImportSessionRequest(state=state))
    assert (err.value.code, err.value.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    assert "random v1" in err.value.details and "basic-motions v1" in err.value.details
    for garbage in (b"", b"\x00" * 3, b"\xff" * 64, state[: len(state) // 2]):
        with pytest.raises(LstmStreamError) as err:
            client.call("ImportSession", pb.ImportSessionRequest(state=garbage))
        assert err.value.reason == "BAD_INPUT"
