"""A GRU model served as an LSTM is: every way a session can be fed, moved or kept, held to
nn.GRU run offline (outputs and the exported state h). A regression GRU shaped like the bundled
model (6 in, 48 hidden, 2 layers, 4 out), whose outputs show a step applied twice or lost."""

from __future__ import annotations

import asyncio
import signal

import grpc
import numpy as np
import pytest

from lstm_model import load_model
from lstm_stream.client import AsyncStreamingClient, LstmStreamError, StreamingClient
from lstm_stream.v1 import inference_pb2 as pb
from lstm_stream.v1 import inference_pb2_grpc as pb_grpc
from server.store_backend import KeyLayout
from tests.e2e.scale_parts import RedisServer
from tests.equality import assert_equals_offline, assert_state_equals_offline
from tests.factories import (
    RawStream,
    ServeProcess,
    free_port,
    make_model_dir,
    metric_value,
    random_chunks,
    random_steps,
    wait_for,
)


@pytest.fixture(scope="module")
def gru_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gru") / "model"
    return make_model_dir(path, input_size=6, hidden_size=48, output_size=4, cell="gru")


@pytest.fixture(scope="module")
def gru_model(gru_dir):
    return load_model(gru_dir).model


@pytest.fixture(scope="module")
def gru_server(gru_dir):
    metrics_port = free_port()
    flags = ("--model", str(gru_dir), "--metrics-port", str(metrics_port))
    with ServeProcess(*flags, "--max-sessions", "1024") as proc:
        proc.metrics_port = metrics_port
        yield proc


def test_a_gru_is_a_gru_offline(gru_model):
    """The fixture really is a GRU: one state tensor, nn.GRU inside."""
    assert gru_model.config.state_names == ("h",)
    assert type(gru_model.rnn).__name__ == "GRU"


def test_streams_in_any_chunking_equal_nn_gru_offline(gru_server, gru_model):
    inputs = [random_steps(30, 6, seed=500 + i) for i in range(20)]

    async def one(client, i):
        chunks = np.split(inputs[i], np.cumsum(random_chunks(30, 7, seed=i))[:-1])
        session = await client.open_session()
        outputs = np.concatenate([await session.send(chunk) for chunk in chunks])
        session.detach()
        return session.session_id, outputs

    async def run():
        async with AsyncStreamingClient(gru_server.target) as client:
            return await asyncio.gather(*(one(client, i) for i in range(20)))

    for (session_id, outputs), steps in zip(asyncio.run(run()), inputs, strict=True):
        assert_equals_offline(outputs, gru_model, steps)
        assert_state_equals_offline(gru_server.target, session_id, gru_model, steps)


def test_predict_equals_offline(gru_server, gru_model):
    steps = random_steps(25, 6, seed=501)
    with StreamingClient(gru_server.target) as client:
        assert_equals_offline(client.predict(steps), gru_model, steps)


def test_batch_calls_equal_offline(gru_server, gru_model):
    """StepBatch and StreamBatches, 50 sessions, 2 steps a chunk."""
    ids = [f"gru-batch-{i}" for i in range(50)]
    inputs = {sid: random_steps(12, 6, seed=600 + i) for i, sid in enumerate(ids)}
    with StreamingClient(gru_server.target) as client:
        first = client.step_batch({sid: steps[:4] for sid, steps in inputs.items()})
        rounds = [{sid: steps[t : t + 2] for sid, steps in inputs.items()} for t in (4, 6, 8, 10)]
        streamed = list(client.stream_batches(rounds))
    for sid, steps in inputs.items():
        outputs = np.concatenate([first[sid], *(result[sid] for result in streamed)])
        assert_equals_offline(outputs, gru_model, steps, err_msg=sid)
        assert_state_equals_offline(gru_server.target, sid, gru_model, steps)


def test_a_resumed_session_is_answered_from_replay_and_steps_each_input_once(gru_server, gru_model):
    steps = random_steps(20, 6, seed=502)
    with RawStream(gru_server.target) as first:
        before = first.outputs(steps[:12])
        session_id = first.session_id
    with RawStream(gru_server.target, session_id) as resumed:
        start, after = resumed.send(steps[8:], start_step=8)  # 8..11 applied already
    assert start == 8
    np.testing.assert_array_equal(after[:4], before[8:12])  # from the replay buffer
    assert_equals_offline(after, gru_model, steps, first=8)
    assert_state_equals_offline(gru_server.target, session_id, gru_model, steps)


def test_a_session_moves_between_servers_and_an_lstm_server_refuses_it(gru_dir, gru_model):
    steps = random_steps(30, 6, seed=503)
    with (
        ServeProcess("--model", str(gru_dir)) as a,
        ServeProcess("--model", str(gru_dir)) as b,
        ServeProcess() as lstm,  # the bundled LSTM, same sizes
        StreamingClient(a.target) as on_a,
        StreamingClient(b.target) as on_b,
        StreamingClient(lstm.target) as on_lstm,
    ):
        session = on_a.open_session()
        first = session.send(steps[:18])
        session.detach()
        export = pb.ExportSessionRequest(session_id=session.session_id)
        state = on_a.call("ExportSession", export).state
        imported = on_b.call("ImportSession", pb.ImportSessionRequest(state=state)).session
        assert imported.next_step == 18
        with RawStream(b.target, session.session_id) as moved:
            rest = moved.outputs(steps[18:], start_step=18)
        assert_state_equals_offline(b.target, session.session_id, gru_model, steps)
        with pytest.raises(LstmStreamError) as refused:
            on_lstm.call("ImportSession", pb.ImportSessionRequest(state=state))
    assert_equals_offline(np.concatenate([first, rest]), gru_model, steps)
    assert refused.value.reason == "MODEL_NOT_FOUND"  # another model: never stepped as an LSTM


def test_a_snapshot_restart_resumes_gru_sessions(tmp_path, gru_dir, gru_model):
    inputs = [random_steps(16, 6, seed=700 + i) for i in range(10)]
    flags = ("--model", str(gru_dir), "--snapshot-dir", str(tmp_path / "snapshots"))
    with ServeProcess(*flags) as first:
        with StreamingClient(first.target) as client:
            heads = []
            for steps in inputs:
                session = client.open_session()
                heads.append((session.session_id, session.send(steps[:9])))
                session.detach()
        code, log = first.finish(signal.SIGTERM)
    assert code == 0 and "wrote 10 sessions" in log, log
    with ServeProcess(*flags) as second:
        with StreamingClient(second.target) as client:
            tails = []
            for (session_id, _), steps in zip(heads, inputs, strict=True):
                session = client.attach(session_id)
                assert session.next_step == 9
                tails.append(session.send(steps[9:]))
                session.detach()
        for (session_id, _), steps in zip(heads, inputs, strict=True):
            assert_state_equals_offline(second.target, session_id, gru_model, steps)
    for (_, head), tail, steps in zip(heads, tails, inputs, strict=True):
        assert_equals_offline(np.concatenate([head, tail]), gru_model, steps)


def test_a_durable_gru_session_survives_its_killed_replica(gru_dir, gru_model):
    """Redis holds the session's h; the replica that took the steps is SIGKILLed; another
    loads it and goes on from the stored step."""
    steps = random_steps(20, 6, seed=504)
    with RedisServer() as redis:
        store = ("--model", str(gru_dir), "--state-store", redis.url)
        with ServeProcess(*store, "--state-store-interval-ms", "0") as a:
            with RawStream(a.target) as stream:
                head = stream.outputs(steps[:12])
                session_id = stream.session_id
            key = KeyLayout(redis.url, "").session("", session_id)
            wait_for(lambda: redis.client().hget(key, "step") == b"12", 30, what="stored")
            a.process.kill()
        with ServeProcess(*store) as b, RawStream(b.target, session_id) as moved:
            tail = moved.outputs(steps[12:], start_step=12)
            assert_state_equals_offline(b.target, session_id, gru_model, steps)
    assert_equals_offline(np.concatenate([head, tail]), gru_model, steps)


def test_model_info_listing_and_metrics_name_the_cell(gru_server):
    with grpc.insecure_channel(gru_server.target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest())
        listing = stub.ListModels(pb.ListModelsRequest())
    assert (info.cell, info.hidden_size, info.num_layers) == ("gru", 48, 2)
    assert [v.cell for m in listing.models for v in m.versions] == ["gru"]
    assert metric_value(gru_server.metrics_port, "lstm_model_info", cell="gru") == 1
