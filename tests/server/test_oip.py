"""The Open Inference Protocol beside the native API (DESIGN 1.9), driven through stubs generated
from our proto against a real server: sequences are sessions, bad requests get clear refusals
(an error_message on a stream, which goes on), and the metadata a Triton tool reads.
tritonclient itself is tested from its own venv in tests/client/test_tritonclient.py."""

import grpc
import numpy as np
import pytest

from lstm_stream.client import LstmStreamError, StreamingClient
from lstm_stream.oip import grpc_service_pb2 as oip
from lstm_stream.oip import grpc_service_pb2_grpc as oip_grpc
from tests.equality import assert_equals_offline, assert_state_equals_offline
from tests.factories import ServeProcess, free_port, metric_value, random_steps
from tests.outcomes import outcome_of

WIDTH, OUTPUTS = 6, 4  # the bundled model


@pytest.fixture(scope="module")
def srv():
    metrics_port = free_port()
    with ServeProcess("--metrics-port", str(metrics_port), "--replay-steps", "16") as server:
        server.metrics_port = metrics_port
        yield server


@pytest.fixture(scope="module")
def stub(srv):
    with grpc.insecure_channel(srv.target) as channel:
        yield oip_grpc.GRPCInferenceServiceStub(channel)


def request(rows=None, request_id: str = "", batched: bool = False, **parameters):
    """A ModelInferRequest of the bundled model: `rows` (T, 6) as raw FP32 INPUT; parameters
    by their Python type (bool, int or str)."""
    rows = random_steps(1, WIDTH) if rows is None else np.asarray(rows, np.float32)
    message = oip.ModelInferRequest(model_name="basic-motions", id=request_id)
    shape = [1, *rows.shape] if batched else list(rows.shape)
    message.inputs.add(name="INPUT", datatype="FP32", shape=shape)
    message.raw_input_contents.append(rows.astype("<f4").tobytes())
    for name, value in parameters.items():
        kind = {bool: "bool_param", int: "int64_param", str: "string_param"}[type(value)]
        setattr(message.parameters[name], kind, value)
    return message


def outputs_of(response: oip.ModelInferResponse) -> np.ndarray:
    (tensor,) = response.outputs
    assert (tensor.name, tensor.datatype) == ("OUTPUT", "FP32")
    flat = np.frombuffer(response.raw_output_contents[0], "<f4")
    return flat.reshape(tensor.shape[-2], OUTPUTS)


def test_metadata_config_and_index_describe_a_sequence_model(srv, stub):
    assert stub.ServerLive(oip.ServerLiveRequest()).live
    assert stub.ServerReady(oip.ServerReadyRequest()).ready
    server = stub.ServerMetadata(oip.ServerMetadataRequest())
    assert server.name == "lstm-stream"
    assert {"sequence", "sequence(string_id)"} <= set(server.extensions)
    assert stub.ModelReady(oip.ModelReadyRequest(name="basic-motions", version="1")).ready
    assert not stub.ModelReady(oip.ModelReadyRequest(name="nope")).ready
    meta = stub.ModelMetadata(oip.ModelMetadataRequest(name="basic-motions"))
    assert (meta.name, list(meta.versions)) == ("basic-motions", ["1"])
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("INPUT", "FP32", [-1, 6])
    ]
    assert [(t.name, list(t.shape)) for t in meta.outputs] == [("OUTPUT", [-1, 4])]
    config = stub.ModelConfig(oip.ModelConfigRequest(name="basic-motions")).config
    assert config.WhichOneof("scheduling_choice") == "sequence_batching"
    assert config.sequence_batching.max_sequence_idle_microseconds == 600 * 10**6
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("INPUT", oip.TYPE_FP32, [-1, 6])
    ]
    index = stub.RepositoryIndex(oip.RepositoryIndexRequest())
    assert [(m.name, m.version, m.state) for m in index.models] == [("basic-motions", "1", "READY")]


def test_a_sequence_is_a_session_from_start_to_end(srv, stub, bundled_model):
    """Started by sequence_start under an int id, continued by a unary request and by a
    native stream under its decimal id, ended by sequence_end."""
    steps = random_steps(9, WIDTH, seed=1)
    first = stub.ModelInfer(request(steps[:3], "a", sequence_id=41, sequence_start=True))
    assert first.id == "a" and (first.model_name, first.model_version) == ("basic-motions", "1")
    second = stub.ModelInfer(request(steps[3:5], "b", batched=True, sequence_id=41))
    assert list(second.outputs[0].shape) == [1, 2, 4]  # shaped as its input
    assert second.parameters["lstm_start_step"].int64_param == 3
    assert_state_equals_offline(srv.target, "41", bundled_model, steps[:5])
    with StreamingClient(srv.target) as client, client.attach("41") as native:
        middle = native.send(steps[5:7])
        native.detach()
    last = stub.ModelInfer(request(steps[7:], sequence_id=41, sequence_end=True))
    outputs = [outputs_of(r) for r in (first, second)] + [middle, outputs_of(last)]
    assert_equals_offline(np.concatenate(outputs), bundled_model, steps)
    with StreamingClient(srv.target) as client, pytest.raises(LstmStreamError) as ended:
        client.get_session("41")
    assert ended.value.reason == "SESSION_NOT_FOUND"


def test_a_request_of_a_sequence_never_started_is_refused_saying_so(stub):
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(request(sequence_id="never-started"))
    assert outcome_of(refused.value)[:2] == ("NOT_FOUND", "SESSION_NOT_FOUND")
    assert "expected sequence_start=true" in refused.value.details()


def test_sequence_start_restarts_a_live_sequence_from_zero_state(srv, stub, bundled_model):
    steps = random_steps(6, WIDTH, seed=2)
    stub.ModelInfer(request(steps[:4], sequence_id="restarted", sequence_start=True))
    again = stub.ModelInfer(request(steps[4:], sequence_id="restarted", sequence_start=True))
    assert_equals_offline(outputs_of(again), bundled_model, steps[4:])
    assert again.parameters["lstm_start_step"].int64_param == 4  # the step index counts on


def test_a_resent_request_with_lstm_start_step_is_answered_from_replay_not_applied(
    srv, stub, bundled_model
):
    steps = random_steps(8, WIDTH, seed=3)
    key = dict(sequence_id="resent")
    first = stub.ModelInfer(request(steps[:5], sequence_start=True, lstm_start_step=0, **key))
    again = stub.ModelInfer(request(steps[3:8], lstm_start_step=3, **key))  # 3, 4 replayed
    assert again.parameters["lstm_start_step"].int64_param == 3
    np.testing.assert_array_equal(outputs_of(again)[:2], outputs_of(first)[3:5])
    assert_equals_offline(outputs_of(again), bundled_model, steps, first=3)
    assert_state_equals_offline(srv.target, "resent", bundled_model, steps)
    with pytest.raises(grpc.RpcError) as gap:
        stub.ModelInfer(request(steps[:1], lstm_start_step=10, **key))
    assert outcome_of(gap.value) == ("FAILED_PRECONDITION", "STEP_OUT_OF_ORDER", "8")


def test_a_refused_and_an_all_replayed_request_leave_the_sequence_to_go_on_once(
    srv, stub, bundled_model
):
    """A continuing request is planned as a StreamSteps message is: a refusal gives the
    sequence back, a resend of applied steps runs nothing, and the next steps apply once."""
    steps = random_steps(6, WIDTH, seed=11)
    key = dict(sequence_id="refused-then-on")
    stub.ModelInfer(request(steps[:3], sequence_start=True, **key))
    with pytest.raises(grpc.RpcError) as gap:
        stub.ModelInfer(request(steps[3:4], lstm_start_step=5, **key))
    assert outcome_of(gap.value) == ("FAILED_PRECONDITION", "STEP_OUT_OF_ORDER", "3")
    replayed = stub.ModelInfer(request(steps[1:3], lstm_start_step=1, **key), timeout=30)
    assert replayed.parameters["lstm_start_step"].int64_param == 1
    assert_equals_offline(outputs_of(replayed), bundled_model, steps[:3], first=1)
    going_on = stub.ModelInfer(request(steps[3:], **key), timeout=30)
    assert going_on.parameters["lstm_start_step"].int64_param == 3
    assert_equals_offline(outputs_of(going_on), bundled_model, steps, first=3)
    assert_state_equals_offline(srv.target, "refused-then-on", bundled_model, steps)


def test_stateless_requests_equal_predict(stub, bundled_model):
    steps = random_steps(7, WIDTH, seed=4)
    response = stub.ModelInfer(request(steps))
    assert_equals_offline(outputs_of(response), bundled_model, steps)


def test_typed_contents_are_accepted_as_raw_bytes_are(stub, bundled_model):
    steps = random_steps(3, WIDTH, seed=9)
    typed = request(steps)
    del typed.raw_input_contents[:]
    typed.inputs[0].contents.fp32_contents.extend(steps.ravel().tolist())
    assert_equals_offline(outputs_of(stub.ModelInfer(typed)), bundled_model, steps)
    typed.raw_input_contents.append(steps.astype("<f4").tobytes())  # both: which one?
    with pytest.raises(grpc.RpcError) as both:
        stub.ModelInfer(typed)
    assert "expected raw_input_contents or contents, got both" in both.value.details()


BAD_REQUESTS = {
    "width": (lambda r: r.inputs[0].shape.__setitem__(1, 5), "expected [timesteps, 6]"),
    "datatype": (lambda r: setattr(r.inputs[0], "datatype", "FP64"), "expected 'FP32'"),
    "bytes": (lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 20), "expected 24 bytes"),
    "name": (lambda r: setattr(r.inputs[0], "name", "x"), "expected 'INPUT'"),
    "nan": (
        lambda r: r.raw_input_contents.__setitem__(0, np.full(6, np.nan, "<f4").tobytes()),
        "expected finite numbers",
    ),
    "output": (lambda r: r.outputs.add(name="PROBS"), "expected 'OUTPUT' only"),
    "id type": (lambda r: setattr(r.parameters["sequence_id"], "bool_param", True), "int64_param"),
    "version": (lambda r: setattr(r, "model_version", "v2"), "positive integer"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_a_bad_request_is_invalid_argument_naming_what_was_expected(stub, case):
    spoil, expected = BAD_REQUESTS[case]
    bad = request(sequence_id="bad-" + case.replace(" ", "-"), sequence_start=True)
    spoil(bad)
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(bad)
    assert outcome_of(refused.value)[:2] == ("INVALID_ARGUMENT", "BAD_INPUT")
    assert expected in refused.value.details()


def test_an_unknown_model_is_model_not_found(stub):
    bad = request()
    bad.model_name = "nope"
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(bad)
    assert outcome_of(refused.value)[:2] == ("NOT_FOUND", "MODEL_NOT_FOUND")


def test_one_stream_pipelines_40_sequences_and_a_bad_request_does_not_end_it(
    srv, stub, bundled_model
):
    """40 sequences, int and string ids, interleaved a step a request and all sent before any
    answer is read; a wrong-width request among them is answered with error_message and the
    stream goes on. Each answer echoes its request's id, each sequence equals offline and its
    state says every step was applied once."""
    sequences, length = 40, 5
    inputs = [random_steps(length, WIDTH, seed=100 + i) for i in range(sequences)]
    ids = [100 + i if i % 2 else f"s-{i}" for i in range(sequences)]
    requests = []
    for t in range(length):
        for i, sid in enumerate(ids):
            requests.append(
                request(inputs[i][t : t + 1], f"{i}/{t}", sequence_id=sid, sequence_start=t == 0)
            )
        if t == 2:
            bad = request(random_steps(1, WIDTH), "bad", sequence_id=ids[0])
            bad.inputs[0].shape[:] = [2, 6]  # 24 bytes for 48
            requests.append(bad)
    before = [stream_requests(srv.metrics_port, code) for code in ("OK", "INVALID_ARGUMENT")]
    answers = list(stub.ModelStreamInfer(iter(requests)))
    assert [a.infer_response.id for a in answers] == [r.id for r in requests]
    (refused,) = [a for a in answers if a.error_message]
    assert refused.infer_response.id == "bad" and "INVALID_ARGUMENT (BAD_INPUT)" in (
        refused.error_message
    )
    outputs = {i: [] for i in range(sequences)}
    for answer in answers:
        if not answer.error_message:
            i, _ = answer.infer_response.id.split("/")
            outputs[int(i)].append(outputs_of(answer.infer_response))
    for i, sid in enumerate(ids):
        assert_equals_offline(np.concatenate(outputs[i]), bundled_model, inputs[i])
        assert_state_equals_offline(srv.target, str(sid), bundled_model, inputs[i])
    after = [stream_requests(srv.metrics_port, code) for code in ("OK", "INVALID_ARGUMENT")]
    assert [a - b for a, b in zip(after, before, strict=True)] == [len(requests) - 1, 1]


def stream_requests(metrics_port: int, code: str) -> float:
    try:
        return metric_value(metrics_port, "lstm_requests_total", rpc="ModelStreamInfer", code=code)
    except KeyError:  # none counted yet
        return 0.0


def versions(index: oip.RepositoryIndexResponse, name: str = "m") -> list[tuple[str, str]]:
    return [(m.version, m.state) for m in index.models if m.name == name]


def test_a_live_sequence_keeps_its_version_through_a_rollout(tmp_path):
    """A sequence started on v1 goes on with v1's outputs after v2 arrives and after v1 left
    the repository (DRAINING); a new sequence starts on v2, and one naming v1 is refused."""
    import signal

    from lstm_model.checkpoint import load_model
    from tests.factories import make_model_dir, wait_for

    sizes = dict(input_size=WIDTH, hidden_size=8, num_layers=1, output_size=OUTPUTS)
    repo = tmp_path / "repo"
    make_model_dir(repo / "m" / "1", seed=1, **sizes)
    make_model_dir(repo / "other" / "1", seed=3, **sizes)  # the listing never goes empty
    steps = random_steps(6, WIDTH, seed=5)
    flags = ("--model-repository", str(repo), "--repository-poll-s", "0")
    with ServeProcess(*flags) as proc, grpc.insecure_channel(proc.target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)

        def infer(rows, **parameters):
            message = request(rows, **parameters)
            message.model_name = "m"
            return stub.ModelInfer(message)

        index_request = oip.RepositoryIndexRequest()
        first = infer(steps[:3], sequence_id=1, sequence_start=True)
        make_model_dir(repo / "m" / "2", seed=2, **sizes)
        proc.process.send_signal(signal.SIGHUP)
        wait_for(
            lambda: stub.ModelReady(oip.ModelReadyRequest(name="m", version="2")).ready,
            what="v2 ready",
        )
        middle = infer(steps[3:4], sequence_id=1)
        fresh = infer(steps, sequence_id=2, sequence_start=True)
        v1 = load_model(repo / "m" / "1").model
        (repo / "m" / "1").rename(tmp_path / "retired-v1")
        proc.process.send_signal(signal.SIGHUP)
        wait_for(
            lambda: (
                versions(stub.RepositoryIndex(index_request))
                == [("1", "UNLOADING"), ("2", "READY")]
            ),
            what="v1 draining",
        )
        rest = infer(steps[4:5], sequence_id=1)
        pinned = request(steps[:1], sequence_id=3, sequence_start=True)
        pinned.model_name, pinned.model_version = "m", "1"
        with pytest.raises(grpc.RpcError) as drained:
            stub.ModelInfer(pinned)
        elsewhere = request(steps[5:], sequence_id=1)
        elsewhere.model_name, elsewhere.model_version = "m", "2"
        with pytest.raises(grpc.RpcError) as misnamed:  # it lives on v1
            stub.ModelInfer(elsewhere)
        v2 = load_model(repo / "m" / "2").model
        (repo / "m" / "2").rename(tmp_path / "retired-v2")  # no version is READY now
        proc.process.send_signal(signal.SIGHUP)
        wait_for(
            lambda: (
                versions(stub.RepositoryIndex(index_request))
                == [("1", "UNLOADING"), ("2", "UNLOADING")]
            ),
            what="both draining",
        )
        last = infer(steps[5:], sequence_id=1)  # a live sequence goes on all the same
    assert (middle.model_version, rest.model_version, fresh.model_version) == ("1", "1", "2")
    assert outcome_of(drained.value)[:2] == ("NOT_FOUND", "MODEL_NOT_FOUND")
    assert outcome_of(misnamed.value)[:2] == ("INVALID_ARGUMENT", "BAD_INPUT")
    assert "lives on m v1" in misnamed.value.details()
    outputs = np.concatenate([outputs_of(r) for r in (first, middle, rest, last)])
    assert_equals_offline(outputs, v1, steps)
    assert_equals_offline(outputs_of(fresh), v2, steps)


def test_tokens_guard_inference_and_a_sequence_belongs_to_its_principal(tmp_path, bundled_model):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice-token alice\nbob-token bob\n")
    alice, bob = ((("authorization", f"Bearer {name}-token"),) for name in ("alice", "bob"))
    steps = random_steps(4, WIDTH, seed=6)
    with (
        ServeProcess("--auth-tokens", str(tokens)) as proc,
        grpc.insecure_channel(proc.target) as channel,
    ):
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(oip.ServerLiveRequest()).live  # a probe: open without a token
        with pytest.raises(grpc.RpcError) as anonymous:
            stub.ModelInfer(request(steps, sequence_id=5, sequence_start=True))
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        first = stub.ModelInfer(
            request(steps[:2], sequence_id=5, sequence_start=True), metadata=alice
        )
        with pytest.raises(grpc.RpcError) as other:
            stub.ModelInfer(request(steps[2:], sequence_id=5), metadata=bob)
        assert outcome_of(other.value)[:2] == ("NOT_FOUND", "SESSION_NOT_FOUND")
        rest = stub.ModelInfer(request(steps[2:], sequence_id=5), metadata=alice)
    assert_equals_offline(
        np.concatenate([outputs_of(first), outputs_of(rest)]), bundled_model, steps
    )


def test_the_servers_limits_hold_for_sequences_too():
    flags = ("--max-chunk-steps", "4", "--max-sessions", "1", "--max-message-bytes", "4096")
    with ServeProcess(*flags) as proc, grpc.insecure_channel(proc.target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as long:
            stub.ModelInfer(request(random_steps(5, WIDTH), sequence_id=1, sequence_start=True))
        assert outcome_of(long.value)[:2] == ("INVALID_ARGUMENT", "BAD_INPUT")
        assert "at most max_chunk_steps=4" in long.value.details()
        stub.ModelInfer(request(sequence_id=1, sequence_start=True))
        with pytest.raises(grpc.RpcError) as full:
            stub.ModelInfer(request(sequence_id=2, sequence_start=True))
        assert outcome_of(full.value)[:2] == ("RESOURCE_EXHAUSTED", "SESSION_CAPACITY")
        with pytest.raises(grpc.RpcError) as large:  # 200 timesteps: 4.8 kB of inputs
            stub.ModelInfer(request(random_steps(200, WIDTH)))
        assert large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def infer_on(target: str, rows, **parameters) -> np.ndarray:
    """One ModelInfer of the server's default model, on a channel of its own; its outputs."""
    message = request(rows, **parameters)
    message.model_name = ""
    with grpc.insecure_channel(target) as channel:
        return outputs_of(oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(message))


def test_a_sequence_survives_a_snapshot_restart(tmp_path, regression_dir, regression_model):
    """A regression model: a restored state a step off would show in the outputs after."""
    steps = random_steps(8, WIDTH, seed=7)
    flags = ("--snapshot-dir", str(tmp_path / "snapshots"), "--model", str(regression_dir))
    with ServeProcess(*flags) as first:
        head = infer_on(first.target, steps[:5], sequence_id=77, sequence_start=True)
        assert first.finish()[0] == 0
    with ServeProcess(*flags) as second:
        tail = infer_on(second.target, steps[5:], sequence_id=77, lstm_start_step=5)
    assert_equals_offline(np.concatenate([head, tail]), regression_model, steps)


def test_an_idle_sequence_expires_and_is_then_refused():
    from tests.factories import wait_for

    with ServeProcess("--session-idle-timeout-s", "0.5") as proc:
        infer_on(proc.target, random_steps(1, WIDTH), sequence_id="idle", sequence_start=True)
        with StreamingClient(proc.target) as client:

            def expired() -> bool:
                try:
                    client.get_session("idle")
                except LstmStreamError as err:
                    return err.reason == "SESSION_NOT_FOUND"
                return False

            wait_for(expired, what="the idle sequence to expire")
        with pytest.raises(grpc.RpcError) as refused:
            infer_on(proc.target, random_steps(1, WIDTH), sequence_id="idle")
    assert "expected sequence_start=true" in refused.value.details()


def test_a_sequence_goes_on_on_another_replica_after_its_replica_dies(
    regression_dir, regression_model
):
    """With the state store, the stored sequence continues on a second replica; the step the
    client resends with lstm_start_step is answered once."""
    from server.security import ANONYMOUS
    from server.state_store import session_key
    from tests.e2e.scale_parts import RedisServer
    from tests.factories import wait_for

    steps = random_steps(9, WIDTH, seed=8)
    with RedisServer() as redis:
        store = ("--state-store", redis.url, "--state-store-interval-ms", "0")
        model = ("--model", str(regression_dir))
        with ServeProcess(*store, *model) as a, ServeProcess(*store, *model) as b:
            head = infer_on(a.target, steps[:6], sequence_id=9, sequence_start=True)
            key = session_key(ANONYMOUS, "9")
            wait_for(lambda: redis.client().hget(key, "step") == b"6", what="step 6 stored")
            a.process.kill()
            # The client is unsure its last request arrived: it resends from step 4.
            tail = infer_on(b.target, steps[4:], sequence_id=9, lstm_start_step=4)
            assert_state_equals_offline(b.target, "9", regression_model, steps)
    np.testing.assert_array_equal(tail[:2], head[4:6])
    assert_equals_offline(np.concatenate([head, tail[2:]]), regression_model, steps)
