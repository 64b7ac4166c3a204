"""The SDK's batch calls: step_batch and stream_batches (sync and asyncio) give every session
its outputs equal to the model offline, once each, through lost connections; a refused chunk
is that session's error alone."""

import asyncio
import threading

import numpy as np
import pytest

from lstm_stream.client import (
    AsyncStreamingClient,
    ClientOptions,
    LstmStreamError,
    StreamingClient,
    partition_of,
)
from tests.client.test_resume_through_faults import OPTIONS, CuttingRelay
from tests.factories import offline, random_chunks, random_steps

INPUT_SIZE = 6


def feeds(sessions: int, total: int, seed: int = 0) -> tuple[list[np.ndarray], list[list[int]]]:
    inputs = [random_steps(total, INPUT_SIZE, seed=seed + i) for i in range(sessions)]
    plans = [random_chunks(total, 4, seed=seed + i) for i in range(sessions)]
    return inputs, plans


def batches_of(ids: list[str], inputs, plans):
    """One mapping per round: each session's next chunk, while it has one."""
    starts = [0] * len(ids)
    for round_ in range(max(len(p) for p in plans)):
        batch = {}
        for i, sid in enumerate(ids):
            if round_ < len(plans[i]):
                size = plans[i][round_]
                batch[sid] = inputs[i][starts[i] : starts[i] + size]
                starts[i] += size
        yield batch


def test_step_batch_and_stream_batches_equal_offline(server, bundled_model):
    ids = [f"sdk-{i}" for i in range(300)]
    inputs, plans = feeds(len(ids), 24, seed=100)
    outputs: dict[str, list[np.ndarray]] = {sid: [] for sid in ids}
    rounds = list(batches_of(ids, inputs, plans))
    with StreamingClient(server.target) as client:
        for batch in rounds[:2]:
            result = client.step_batch(batch)
            assert list(result) == list(batch)
            for sid in batch:
                outputs[sid].append(result[sid])
        for result in client.stream_batches(rounds[2:], window=4):
            for sid in result:
                outputs[sid].append(result[sid])
        ended = client.step_batch({sid: np.zeros((0, INPUT_SIZE)) for sid in ids}, end=ids)
        assert not ended.errors
    for i, sid in enumerate(ids):
        got = np.concatenate(outputs[sid])
        np.testing.assert_allclose(got, offline(bundled_model, inputs[i]), atol=1e-5, rtol=0)


def test_a_refused_chunk_is_that_sessions_error_and_the_session_goes_on(server, bundled_model):
    steps = random_steps(3, INPUT_SIZE, seed=5)
    with StreamingClient(server.target) as client:
        nan = np.full((1, INPUT_SIZE), np.nan, np.float32)
        result = client.step_batch({"ok": steps[:1], "bad": nan})
        with pytest.raises(LstmStreamError) as refused:
            result["bad"]
        assert (refused.value.reason, set(result.outputs)) == ("BAD_INPUT", {"ok"})
        assert "expected finite numbers, got nan" in refused.value.details
        result = client.step_batch({"ok": steps[1:], "bad": steps})  # numbered as if never sent
        assert not result.errors
        np.testing.assert_allclose(result["bad"], offline(bundled_model, steps), atol=1e-5, rtol=0)
        reset = client.step_batch({"ok": steps}, reset={"ok"})
        np.testing.assert_allclose(reset["ok"], offline(bundled_model, steps), atol=1e-5, rtol=0)


def test_stream_batches_through_a_connection_cutting_relay(server, bundled_model):
    """Cut by bytes, never by the clock: 80 sessions' answers are far more than a budget."""
    ids = [f"cut-{i}" for i in range(80)]
    inputs, plans = feeds(len(ids), 60, seed=300)
    loop = asyncio.new_event_loop()
    relay = CuttingRelay(server.port, min_bytes=20_000, max_bytes=60_000, seed=2)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(relay.start(), loop).result(30)
    outputs: dict[str, list[np.ndarray]] = {sid: [] for sid in ids}
    try:
        options = ClientOptions(target=f"127.0.0.1:{relay.port}", **OPTIONS)
        with StreamingClient(options=options) as client:
            for result in client.stream_batches(batches_of(ids, inputs, plans), window=4):
                assert not result.errors, result.errors
                for sid in result:
                    outputs[sid].append(result[sid])
            recoveries = client.batches.recoveries
    finally:
        asyncio.run_coroutine_threadsafe(relay.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
    assert relay.cuts >= 2 and recoveries >= 1
    for i, sid in enumerate(ids):
        got = np.concatenate(outputs[sid])
        assert got.shape == (60, 4)  # none lost, none repeated
        np.testing.assert_allclose(got, offline(bundled_model, inputs[i]), atol=1e-5, rtol=0)


def test_asyncio_step_batch_and_stream_batches_equal_offline(server, bundled_model):
    ids = [f"aio-{i}" for i in range(100)]
    inputs, plans = feeds(len(ids), 16, seed=500)

    async def run():
        outputs: dict[str, list[np.ndarray]] = {sid: [] for sid in ids}
        rounds = list(batches_of(ids, inputs, plans))
        async with AsyncStreamingClient(server.target) as client:
            first = await client.step_batch(rounds[0])
            for sid in first:
                outputs[sid].append(first[sid])
            async for result in client.stream_batches(rounds[1:], window=3):
                for sid in result:
                    outputs[sid].append(result[sid])
        return outputs

    outputs = asyncio.run(run())
    for i, sid in enumerate(ids):
        got = np.concatenate(outputs[sid])
        np.testing.assert_allclose(got, offline(bundled_model, inputs[i]), atol=1e-5, rtol=0)


def test_partitions_split_a_batch_and_name_each_message_partition():
    """With partitions, a batch message holds one partition's sessions and says which."""
    from lstm_stream.client.batching import BatchBook
    from lstm_stream.v1 import inference_pb2 as pb

    info = pb.GetModelInfoResponse(input_size=2, output_size=1, max_batch_chunks=3)
    book = BatchBook(ClientOptions(partitions=4), info)
    ids = [f"dev-{i}" for i in range(20)]
    _, items = book.add({sid: np.zeros((1, 2)) for sid in ids})
    messages = book.requests(items)
    assert all(len(group) <= 3 for _, group in messages)
    for key, group in messages:
        assert {partition_of(sid, 4) for sid, _ in group} == {int(key)}
    assert sorted(sid for _, group in messages for sid, _ in group) == sorted(ids)
    assert partition_of("dev-1", 4) == __import__("zlib").crc32(b"dev-1") % 4
    metadata = dict(ClientOptions(partitions=4).metadata("dev-1"))
    assert metadata["x-lstm-partition"] == str(partition_of("dev-1", 4))


def test_asyncio_stream_batches_through_a_connection_cutting_relay(server, bundled_model):
    ids = [f"aio-cut-{i}" for i in range(60)]
    inputs, plans = feeds(len(ids), 50, seed=700)

    async def run():
        relay = CuttingRelay(server.port, min_bytes=20_000, max_bytes=50_000, seed=3)
        await relay.start()
        outputs: dict[str, list[np.ndarray]] = {sid: [] for sid in ids}
        try:
            options = ClientOptions(target=f"127.0.0.1:{relay.port}", **OPTIONS)
            async with AsyncStreamingClient(options=options) as client:
                async for result in client.stream_batches(batches_of(ids, inputs, plans)):
                    assert not result.errors, result.errors
                    for sid in result:
                        outputs[sid].append(result[sid])
                recoveries = (await client.batches()).recoveries
        finally:
            await relay.stop()
        return outputs, relay.cuts, recoveries

    outputs, cuts, recoveries = asyncio.run(run())
    assert cuts >= 2 and recoveries >= 1
    for i, sid in enumerate(ids):
        got = np.concatenate(outputs[sid])
        assert got.shape == (50, 4)  # none lost, none repeated
        np.testing.assert_allclose(got, offline(bundled_model, inputs[i]), atol=1e-5, rtol=0)


def test_a_session_found_gone_fails_its_chunks_in_flight_not_the_client():
    """Two chunks of one session in flight, the first answered SESSION_NOT_FOUND: the second
    gets that error too (nothing waits for it forever), and a new chunk starts at step 0."""
    from lstm_stream.client.batching import BatchBook
    from lstm_stream.v1 import inference_pb2 as pb
    from server.errors import SessionNotFound

    book = BatchBook(ClientOptions(), pb.GetModelInfoResponse(input_size=2, output_size=1))
    first, items_1 = book.add({"gone": np.zeros((1, 2)), "kept": np.zeros((1, 2))})
    second, _ = book.add({"gone": np.zeros((1, 2))})
    refused = pb.StepBatchResponse()
    refused.results.add(session_id="gone", error=SessionNotFound("gone").status_message())
    refused.results.add(session_id="kept", start_step=0, num_steps=1, outputs=[0.5])
    assert book.settle(items_1, refused) == {}
    assert first.errors["gone"].reason == second.errors["gone"].reason == "SESSION_NOT_FOUND"
    assert first["kept"].tolist() == [[0.5]]
    assert book.unanswered([first, second]) == set()
    _, again = book.add({"gone": np.zeros((1, 2))})
    assert again[0][1].start == 0
