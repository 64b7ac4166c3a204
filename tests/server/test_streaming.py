"""Streaming through a real server equals the model run offline on the same inputs."""

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from lstm_model import load_model
from lstm_model.cli import main as lstm_model_main
from lstm_model.recordings import load_recordings
from lstm_stream.client import AsyncStreamingClient, ClientOptions, StreamingClient
from lstm_stream.v1 import inference_pb2 as pb
from tests.equality import assert_equals_offline, assert_state_equals_offline
from tests.factories import (
    RawStream,
    ServeProcess,
    free_port,
    metric_value,
    random_chunks,
    random_steps,
    serve,
)

ATOL = 1e-5


def stream_in_chunks(session, steps, sizes):
    outputs, start = [], 0
    for size in sizes:
        outputs.append(session.send(steps[start : start + size]))
        start += size
    return np.concatenate(outputs)


def test_bundled_model_streamed_equals_offline(client, bundled_model):
    recordings = load_recordings()
    for i in range(0, 40, 8):
        steps = recordings.inputs[i].numpy()  # (100, 6): a real held-out recording
        with client.open_session() as session:
            streamed = stream_in_chunks(session, steps, random_chunks(100, 7, seed=i))
            assert session.next_step == 100
        assert_equals_offline(streamed, bundled_model, steps)


def test_random_init_model_streamed_equals_offline(tmp_path):
    lstm_model_main(
        [
            "init",
            "--input-size",
            "32",
            "--hidden-size",
            "64",
            "--num-layers",
            "3",
            "--output-size",
            "5",
            "--seed",
            "11",
            "--out",
            str(tmp_path / "m"),
        ]
    )
    model = load_model(tmp_path / "m").model
    steps = random_steps(60, 32, seed=3)
    with serve(model=str(tmp_path / "m")) as srv, StreamingClient(srv.target) as client:
        assert client.info().input_size == 32
        with client.open_session() as session:
            streamed = stream_in_chunks(session, steps, random_chunks(60, 16, seed=5))
    assert_equals_offline(streamed, model, steps)


def test_one_timestep_per_message(client, bundled_model):
    steps = random_steps(30, 6, seed=8)
    with client.open_session() as session:
        streamed = np.stack([session.step(row) for row in steps])
    assert_equals_offline(streamed, bundled_model, steps)


def test_predict_equals_a_fresh_streamed_session(client, bundled_model):
    steps = random_steps(50, 6, seed=9)
    predicted = client.predict(steps)
    with client.open_session() as session:
        streamed = stream_in_chunks(session, steps, [1, 9, 40])
    np.testing.assert_allclose(predicted, streamed, atol=ATOL, rtol=0)
    assert_equals_offline(predicted, bundled_model, steps)


def test_predict_infers_num_steps_when_it_is_0(client, bundled_model):
    steps = random_steps(7, 6, seed=10)
    response = client.call("Predict", pb.PredictRequest(inputs=steps.ravel().tolist()))
    outputs = np.asarray(response.outputs, dtype=np.float32).reshape(7, 4)
    assert_equals_offline(outputs, bundled_model, steps)


def test_reset_zeroes_state_and_keeps_counting_steps(client, bundled_model):
    first, second = random_steps(10, 6, seed=1), random_steps(7, 6, seed=2)
    with client.open_session() as session:
        session.send(first)
        after_reset = session.send(second, reset=True)
        assert session.next_step == 17
    assert_equals_offline(after_reset, bundled_model, second)


async def _stream_many(target, sessions, steps_each, seed):
    rng = np.random.default_rng(seed)
    inputs = [random_steps(steps_each, 6, seed=seed * 1000 + i) for i in range(sessions)]
    plans = [random_chunks(steps_each, 12, seed=seed * 1000 + i) for i in range(sessions)]

    async def one(i, client):
        session = await client.open_session()
        outputs, start = [], 0
        for size in plans[i]:
            await asyncio.sleep(float(rng.random()) * 0.002)  # random interleaving
            outputs.append(await session.send(inputs[i][start : start + size]))
            start += size
        await session.close()
        return np.concatenate(outputs)

    async with AsyncStreamingClient(target) as client:
        results = await asyncio.gather(*(one(i, client) for i in range(sessions)))
    return inputs, results


def test_200_concurrent_sessions_each_equal_their_own_offline_result(server, bundled_model):
    inputs, results = asyncio.run(_stream_many(server.target, 200, 40, seed=4))
    for steps, streamed in zip(inputs, results, strict=True):
        assert_equals_offline(streamed, bundled_model, steps)


def test_sessions_share_batches_and_mixed_lengths_equal_offline(bundled_model):
    """48 sessions alternate 1-step and 32-step chunks in lockstep. The server waits (up to a
    minute) for a full batch of 48 and releases it as soon as it is full, so every round is
    exactly one batch that mixes both lengths: 4 rounds, 4 batches, 192 chunks."""
    sessions, plans = 48, ([1, 32, 1, 32], [32, 1, 32, 1])
    inputs = [random_steps(66, 6, seed=500 + i) for i in range(sessions)]
    options = ClientOptions(deadline_s=300.0)

    async def one(i, client):
        session = await client.open_session()
        chunks = np.split(inputs[i], np.cumsum(plans[i % 2])[:-1])
        out = [await session.send(chunk) for chunk in chunks]
        await session.close()
        return np.concatenate(out)

    async def run(target):
        async with AsyncStreamingClient(options=replace(options, target=target)) as client:
            return await asyncio.gather(*(one(i, client) for i in range(sessions)))

    metrics_port = free_port()
    flags = ["--max-batch-size", "48", "--max-batch-delay-us", "60000000"]
    with ServeProcess(*flags, "--metrics-port", str(metrics_port)) as srv:
        results = asyncio.run(run(srv.target))
        batches = metric_value(metrics_port, "lstm_batch_size_count")
        chunks = metric_value(metrics_port, "lstm_batch_size_sum")
        timesteps = metric_value(metrics_port, "lstm_timesteps_total")
    for steps, streamed in zip(inputs, results, strict=True):
        assert_equals_offline(streamed, bundled_model, steps)
    assert (batches, chunks, timesteps) == (4, 4 * sessions, 66 * sessions)


@pytest.mark.parametrize("chunk", [1, 5])
def test_replayed_overlap_returns_the_same_outputs(server, client, bundled_model, chunk):
    steps = random_steps(20, 6, seed=12)
    with RawStream(server.target) as stream:
        _, first = stream.send(steps[:15])
        start, again = stream.send(steps[10 : 10 + chunk], start_step=10)
        assert start == 10
        assert client.get_session(stream.session_id).next_step == 15  # nothing applied twice
        np.testing.assert_array_equal(again, first[10 : 10 + chunk])
        start, tail = stream.send(steps[12:20], start_step=12)  # 3 replayed, 5 new
        assert (start, len(tail)) == (12, 8)
        assert client.get_session(stream.session_id).next_step == 20
        np.testing.assert_array_equal(tail[:3], first[12:15])
    assert_equals_offline(tail, bundled_model, steps, first=12)
    # The softmax outputs can hide a step applied twice; the session's state cannot.
    assert_state_equals_offline(server.target, stream.session_id, bundled_model, steps)
