"""StepBatch and StreamBatches (DESIGN 1.7) against a real server: each chunk follows the
StreamSteps rules, a refused chunk is refused alone and changes nothing, and outputs equal the
model offline."""

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2

from lstm_stream.v1 import inference_pb2 as pb
from lstm_stream.v1 import inference_pb2_grpc as pb_grpc
from tests.equality import assert_equals_offline, assert_state_equals_offline
from tests.factories import RawStream, ServeProcess, free_port, metric_value, offline, random_steps

INPUT_SIZE, OUTPUT_SIZE = 6, 4  # the bundled model


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.InferenceServiceStub(channel)


def chunk(session_id: str, rows: np.ndarray, start: int | None = None, **fields) -> pb.SessionChunk:
    return pb.SessionChunk(
        session_id=session_id,
        start_step=start,
        packed_inputs=rows.astype("<f4").tobytes(),
        **fields,
    )


def outputs_of(result: pb.ChunkResult) -> np.ndarray:
    assert not result.HasField("error"), result.error.message
    if result.packed_outputs:
        return np.frombuffer(result.packed_outputs, "<f4").reshape(result.num_steps, OUTPUT_SIZE)
    return np.asarray(result.outputs, np.float32).reshape(result.num_steps, OUTPUT_SIZE)


def reason_of(result: pb.ChunkResult) -> tuple[grpc.StatusCode, str, dict]:
    (detail,) = result.error.details
    info = error_details_pb2.ErrorInfo()
    detail.Unpack(info)
    code = next(c for c in grpc.StatusCode if c.value[0] == result.error.code)
    return code, info.reason, dict(info.metadata)


def test_1000_sessions_fed_by_batches_of_mixed_chunk_lengths_equal_offline(stub, bundled_model):
    sessions, total = 1000, 12
    inputs = [random_steps(total, INPUT_SIZE, seed=900 + i) for i in range(sessions)]
    rng = np.random.default_rng(3)
    cuts = [np.sort(rng.choice(np.arange(1, total), 2, replace=False)) for _ in range(sessions)]
    pieces = [np.split(x, c) for x, c in zip(inputs, cuts, strict=True)]  # 3 chunks each
    outputs: list[list[np.ndarray]] = [[] for _ in range(sessions)]
    for round_ in range(3):
        # Half the sessions as packed bytes, half as repeated floats: each answered in kind.
        request = pb.StepBatchRequest(create_missing=True)
        for i in range(sessions):
            rows = pieces[i][round_]
            start = sum(len(p) for p in pieces[i][:round_])
            if i % 2:
                request.chunks.append(chunk(f"mix-{i}", rows, start))
            else:
                request.chunks.add(session_id=f"mix-{i}", start_step=start, inputs=rows.ravel())
        response = stub.StepBatch(request)
        assert len(response.results) == sessions
        for i, result in enumerate(response.results):
            assert result.session_id == f"mix-{i}"
            assert bool(result.packed_outputs) == bool(i % 2) or not result.num_steps
            outputs[i].append(outputs_of(result))
    for i in range(sessions):
        got = np.concatenate(outputs[i])
        assert_equals_offline(got, bundled_model, inputs[i])
    stub.StepBatch(
        pb.StepBatchRequest(
            chunks=[pb.SessionChunk(session_id=f"mix-{i}", end_session=True) for i in range(1000)]
        )
    )


def test_a_bad_chunk_amid_good_ones_is_refused_alone_and_changes_nothing(stub, bundled_model):
    good = random_steps(3, INPUT_SIZE, seed=1)
    for name in ("good-a", "good-b", "gap", "twice"):
        stub.CreateSession(pb.CreateSessionRequest(session_id=name))
    nan = good.copy()
    nan[1, 2] = np.nan
    request = pb.StepBatchRequest(
        chunks=[
            chunk("good-a", good, 0),
            pb.SessionChunk(session_id="width", inputs=[1.0] * (INPUT_SIZE + 1)),
            chunk("nan", nan),
            chunk("gap", good, 5),
            chunk("unknown", good, 0),
            chunk("twice", good, 0),
            chunk("twice", good, 3),
            pb.SessionChunk(
                session_id="good-b", inputs=[1.0] * INPUT_SIZE, packed_inputs=good[0].tobytes()
            ),
            chunk("", good),
            chunk("good-b", good, 0),
        ]
    )
    results = stub.StepBatch(request).results
    expected = offline(bundled_model, good)
    np.testing.assert_allclose(outputs_of(results[0]), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(outputs_of(results[9]), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(outputs_of(results[5]), expected, atol=1e-5, rtol=0)
    bad = {i: reason_of(results[i]) for i in (1, 2, 3, 4, 6, 7, 8)}
    assert bad[1][:2] == (grpc.StatusCode.INVALID_ARGUMENT, "BAD_INPUT")
    assert "expected a multiple of input_size=6 values" in results[1].error.message
    assert "chunks[2].inputs: expected finite numbers, got nan at timestep 1, feature 2" in (
        results[2].error.message
    )
    assert bad[3] == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "STEP_OUT_OF_ORDER",
        {"expected_step": "0"},
    )
    assert bad[4][:2] == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    assert bad[6][:2] == (grpc.StatusCode.INVALID_ARGUMENT, "BAD_INPUT")
    assert "got a second for session 'twice' (the first is chunks[5])" in results[6].error.message
    assert "either inputs or packed_inputs, got both" in results[7].error.message
    assert "chunks[8].session_id: expected the session's id" in results[8].error.message
    # Refused chunks changed nothing: the gap's session is still at 0, nothing was created.
    assert stub.GetSession(pb.GetSessionRequest(session_id="gap")).session.next_step == 0
    assert stub.GetSession(pb.GetSessionRequest(session_id="twice")).session.next_step == 3
    for missing in ("width", "nan", "unknown"):
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetSession(pb.GetSessionRequest(session_id=missing))
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND


def test_nan_in_a_message_of_packed_chunks_only_is_refused_alone(server, stub, bundled_model):
    """Every chunk packed (the decoder's one-array path): the NaN chunk is refused and
    creates nothing; the others step as if it were not there."""
    steps = random_steps(2, INPUT_SIZE, seed=6)
    bad = steps.copy()
    bad[1, 3] = np.nan
    ids = ("packed-a", "packed-nan", "packed-b")
    request = pb.StepBatchRequest(
        create_missing=True, chunks=[chunk(ids[0], steps), chunk(ids[1], bad), chunk(ids[2], steps)]
    )
    results = stub.StepBatch(request).results
    assert reason_of(results[1])[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "BAD_INPUT")
    assert "got nan at timestep 1, feature 3" in results[1].error.message
    for i in (0, 2):
        assert_equals_offline(outputs_of(results[i]), bundled_model, steps)
        assert_state_equals_offline(server.target, ids[i], bundled_model, steps)
    with pytest.raises(grpc.RpcError) as refused:
        stub.GetSession(pb.GetSessionRequest(session_id=ids[1]))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_resent_batch_is_answered_from_replay_and_applied_once(server, stub, bundled_model):
    steps = random_steps(4, INPUT_SIZE, seed=2)
    request = pb.StepBatchRequest(
        create_missing=True,
        chunks=[chunk("replay-1", steps[:2], 0, reset=True), chunk("replay-2", steps, 0)],
    )
    first = stub.StepBatch(request).results
    again = stub.StepBatch(request).results  # as a client resends after a lost answer
    for a, b in zip(first, again, strict=True):
        assert (a.start_step, a.num_steps) == (b.start_step, b.num_steps)
        np.testing.assert_array_equal(outputs_of(a), outputs_of(b))
    nxt = stub.StepBatch(pb.StepBatchRequest(chunks=[chunk("replay-1", steps[2:], 2)])).results
    assert_equals_offline(
        np.concatenate([outputs_of(first[0]), outputs_of(nxt[0])]), bundled_model, steps
    )
    # Both sessions applied each step once: replay-1 stepped on after the resend, replay-2
    # was wholly answered from replay (its state must not have moved).
    for name in ("replay-1", "replay-2"):
        assert_state_equals_offline(server.target, name, bundled_model, steps, err_msg=name)


def test_stream_batches_answers_every_message_in_order_and_ends_sessions(stub, bundled_model):
    steps = random_steps(6, INPUT_SIZE, seed=3)
    ids = [f"streamed-{i}" for i in range(50)]

    def requests():
        for t in range(6):
            yield pb.StepBatchRequest(
                create_missing=True,
                chunks=[chunk(sid, steps[t : t + 1], t, end_session=t == 5) for sid in ids],
            )

    responses = list(stub.StreamBatches(requests()))
    assert [r.results[0].start_step for r in responses] == list(range(6))
    for i in range(len(ids)):
        got = np.concatenate([outputs_of(r.results[i]) for r in responses])
        assert_equals_offline(got, bundled_model, steps)
    with pytest.raises(grpc.RpcError) as ended:
        stub.GetSession(pb.GetSessionRequest(session_id=ids[0]))
    assert ended.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_message_after_one_that_ends_a_session_meets_what_follows_the_end(
    server, stub, bundled_model
):
    """StreamBatches plans a message while the one before is still answered: a chunk naming a
    session the previous message ends waits for that end, then creates a new session under the
    id (create_missing), from zero state, rather than stepping the old one."""
    first, second = random_steps(2, INPUT_SIZE, seed=7), random_steps(3, INPUT_SIZE, seed=8)
    messages = [
        pb.StepBatchRequest(
            create_missing=True, chunks=[chunk("reborn", first, 0, end_session=True)]
        ),
        pb.StepBatchRequest(create_missing=True, chunks=[chunk("reborn", second, 0)]),
    ]
    ended, reborn = (r.results[0] for r in stub.StreamBatches(iter(messages)))
    assert_equals_offline(outputs_of(ended), bundled_model, first)
    assert reborn.start_step == 0
    assert_equals_offline(outputs_of(reborn), bundled_model, second)
    assert_state_equals_offline(server.target, "reborn", bundled_model, second)


def test_a_batch_call_takes_no_session_over_from_a_stream(server, stub, bundled_model):
    """Batch calls own no session: the stream feeding one carries on, live, after a batch
    stepped it, and each of them applied its own steps once."""
    steps = random_steps(4, INPUT_SIZE, seed=4)
    with RawStream(server.target) as stream:
        first = stream.outputs(steps[:1])
        result = stub.StepBatch(
            pb.StepBatchRequest(chunks=[chunk(stream.session_id, steps[1:3], 1)])
        )
        (start, last) = stream.send(steps[3:], start_step=3)  # still this stream's session
        assert start == 3
        assert stream.half_close() == grpc.StatusCode.OK  # ended by the client, not ABORTED
    outputs = np.concatenate([first, outputs_of(result.results[0]), last])
    assert_equals_offline(outputs, bundled_model, steps)
    assert_state_equals_offline(server.target, stream.session_id, bundled_model, steps)


def test_too_many_chunks_or_bytes_refuse_the_whole_message():
    port = free_port()
    with (
        ServeProcess(
            "--max-batch-chunks", "3", "--max-message-bytes", "4096", "--metrics-port", str(port)
        ) as srv,
        grpc.insecure_channel(srv.target) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)
        four = pb.StepBatchRequest(
            create_missing=True, chunks=[chunk(f"c{i}", np.ones((1, 6))) for i in range(4)]
        )
        with pytest.raises(grpc.RpcError) as many:
            stub.StepBatch(four)
        assert many.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "expected at most max_batch_chunks=3 chunks per message, got 4" in (
            many.value.details()
        )
        big = pb.StepBatchRequest(create_missing=True, chunks=[chunk("big", np.ones((200, 6)))])
        with pytest.raises(grpc.RpcError) as large:
            stub.StepBatch(big)
        assert large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "4096" in large.value.details()
        three = pb.StepBatchRequest(
            create_missing=True, chunks=[chunk(f"c{i}", np.ones((2, 6))) for i in range(3)]
        )
        assert len(stub.StepBatch(three).results) == 3
        list(stub.StreamBatches(iter([three])))
        text = (
            __import__("urllib.request")
            .request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)
            .read()
            .decode()
        )
        assert 'lstm_batch_chunks_count{rpc="StepBatch"} 1.0' in text  # the refused one not
        assert 'lstm_batch_chunks_sum{rpc="StreamBatches"} 3.0' in text
        assert 'lstm_requests_total{code="INVALID_ARGUMENT",rpc="StepBatch"} 1.0' in text
        assert 'lstm_requests_total{code="OK",rpc="StreamBatches"} 1.0' in text
        assert metric_value(port, "lstm_timesteps_total") == 12.0  # 6 + 6 (replayed: none)
        # Each message's chunks ran as one engine batch: two batches of three sessions.
        assert metric_value(port, "lstm_batch_size_count", model="basic-motions") == 2
        assert metric_value(port, "lstm_batch_size_sum", model="basic-motions") == 6


def test_another_principals_session_is_not_found_in_that_chunk(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("token-a alice\ntoken-b bob\n")
    with (
        ServeProcess("--auth-tokens", str(tokens)) as srv,
        grpc.insecure_channel(srv.target) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)
        alice = (("authorization", "Bearer token-a"),)
        bob = (("authorization", "Bearer token-b"),)
        stub.StepBatch(
            pb.StepBatchRequest(create_missing=True, chunks=[chunk("alices", np.ones((1, 6)))]),
            metadata=alice,
        )
        no_create = stub.StepBatch(
            pb.StepBatchRequest(
                chunks=[chunk("alices", np.ones((1, 6)), 1), chunk("bobs", np.ones((1, 6)))]
            ),
            metadata=bob,
        ).results
        assert reason_of(no_create[0])[:2] == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
        assert reason_of(no_create[1])[:2] == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
        created = stub.StepBatch(
            pb.StepBatchRequest(create_missing=True, chunks=[chunk("alices", np.ones((1, 6)))]),
            metadata=bob,
        ).results
        # Bob's create_missing makes a session of his own under that id, never Alice's.
        assert (created[0].start_step, created[0].num_steps) == (0, 1)
        session = stub.GetSession(pb.GetSessionRequest(session_id="alices"), metadata=alice)
        assert session.session.next_step == 1  # Bob's chunk went to his own session
        with pytest.raises(grpc.RpcError) as anonymous:
            stub.StepBatch(pb.StepBatchRequest(chunks=[chunk("alices", np.ones((1, 6)))]))
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
