"""Triton's own client, `tritonclient.grpc`, against lstm-serve's Open Inference Protocol
endpoint (DESIGN 1.9), run as an app has it: from a venv of its own, since tritonclient pins
protobuf<7 and its generated `inference.*` modules clash with the project's in one process.
Each test hands tests/client/triton_app.py a JSON job and checks the values it reports, and
what the native API sees of the same sessions. The README's example runs here verbatim."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from lstm_stream.client import ClientOptions, LstmStreamError, StreamingClient
from tests.equality import assert_equals_offline, assert_state_equals_offline
from tests.factories import ServeProcess, random_steps

pytestmark = pytest.mark.timeout(900)  # the first test builds the app's venv (pip)

ROOT = Path(__file__).resolve().parents[2]
APP = Path(__file__).with_name("triton_app.py")
MODEL = "basic-motions"
ALICE, BOB = "alice-oip-token-4d1e", "bob-oip-token-9c7a"
NO_SEQUENCE = "expected sequence_start=true on a sequence's first request"


def unavailable(message: str):
    """What cannot be set up here: skip locally (no network, say), fail under CI."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def app_python(tmp_path_factory) -> str:
    """The python of a venv holding tritonclient[grpc] and numpy (and the protobuf<7 it pins),
    built once per module."""
    venv = tmp_path_factory.mktemp("tritonclient") / "venv"
    python = venv / "bin" / "python"
    steps = [
        [getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "-q", "tritonclient[grpc]", "numpy"],
    ]
    for command in steps:
        try:
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
        except subprocess.CalledProcessError as err:
            unavailable(f"building tritonclient's venv: {command} failed:\n{err.stderr}")
        except subprocess.TimeoutExpired:
            unavailable(f"building tritonclient's venv: {command} took over 600 s")
    resolved = subprocess.run(
        [str(python), "-c", "import tritonclient.grpc, google.protobuf as p; print(p.__version__)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resolved.returncode == 0, f"tritonclient.grpc does not import:\n{resolved.stderr}"
    return str(python)


def run_app(python: str, target: str, scenario: str, **job) -> dict:
    job = {"target": target, "model": MODEL, "scenario": scenario, **job}
    done = subprocess.run(
        [python, str(APP)], input=json.dumps(job), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"triton_app.py {scenario} failed:\n{done.stderr}"
    return json.loads(done.stdout)


def rows_of(steps: np.ndarray) -> list[list[float]]:
    return steps.tolist()  # float32 -> float is exact; the app turns them back into float32


def outputs(answer: dict) -> np.ndarray:
    """An answer's OUTPUT as (T, output_size), its leading batch dimension of 1 dropped."""
    assert "error" not in answer, answer
    assert answer["datatype"] == "float32", answer
    values = np.asarray(answer["output"], dtype=np.float32)
    assert list(values.shape) == answer["shape"]
    return values.reshape(-1, values.shape[-1])


def assert_answered(answer: dict, request_id: str, first_step: int, steps: int) -> None:
    """An answer that echoes its request's id, names the model, and says where its rows are."""
    assert answer.get("error") is None, answer
    assert (answer["id"], answer["model_name"]) == (request_id, MODEL)
    assert answer["parameters"] == {"lstm_start_step": first_step, "durable_step": 0}, answer
    assert outputs(answer).shape == (steps, 4)


def assert_refused(answer: dict, *texts: str, status: str | None = None) -> None:
    """A refusal whose message holds `texts`; `status` None: a stream's error_message (the
    stream went on), else the unary call's gRPC status."""
    assert "error" in answer, f"answered, expected a refusal: {answer}"
    assert answer["status"] == status, answer
    for text in texts:
        assert text in answer["error"], answer


def assert_ended(target: str, session_id: str, token: str | None = None) -> None:
    """The native API has no such session: ended, or never created."""
    options = ClientOptions(target=target, token=token, deadline_s=10, max_retries=0)
    with StreamingClient(options=options) as client, pytest.raises(LstmStreamError) as refused:
        client.get_session(session_id)
    assert (refused.value.code, refused.value.reason) == (
        grpc.StatusCode.NOT_FOUND,
        "SESSION_NOT_FOUND",
    )


def test_health_metadata_and_model_config(server, app_python, bundled_model):
    config = bundled_model.config
    report = run_app(app_python, server.target, "probe")
    assert {k: report[k] for k in ("server_live", "server_ready", "model_ready")} == {
        "server_live": {"value": True},
        "server_ready": {"value": True},
        "model_ready": {"value": True},
    }
    assert report["unknown_model_ready"] == {"value": False}
    metadata = report["server_metadata"]["value"]
    assert metadata["name"] == "lstm-stream"
    assert {"sequence", "sequence(string_id)"} <= set(metadata["extensions"])
    model = report["model_metadata"]["value"]
    assert (model["name"], model["versions"]) == (MODEL, ["1"])
    assert model["inputs"] == [
        {"name": "INPUT", "datatype": "FP32", "shape": ["-1", str(config.input_size)]}
    ]
    assert model["outputs"] == [
        {"name": "OUTPUT", "datatype": "FP32", "shape": ["-1", str(config.output_size)]}
    ]
    model_config = report["model_config"]["value"]["config"]
    assert model_config["name"] == MODEL
    assert model_config["input"] == [
        {"name": "INPUT", "data_type": "TYPE_FP32", "dims": ["-1", str(config.input_size)]}
    ]
    assert model_config["output"] == [
        {"name": "OUTPUT", "data_type": "TYPE_FP32", "dims": ["-1", str(config.output_size)]}
    ]
    batching = model_config["sequence_batching"]
    assert int(batching["max_sequence_idle_microseconds"]) > 0
    assert batching["oldest"]["max_candidate_sequences"] == 4096  # the server's --max-sessions


def test_forty_sequences_interleaved_on_one_stream(server, app_python, bundled_model):
    """Half with int ids, half with string ids, one step per request, every request sent
    before any answer is awaited; half of them ended, the rest kept live."""
    sequences = []
    for n in range(40):
        sequence_id = 10_000 + n if n % 2 == 0 else f"tc-interleaved-{n}"
        steps = random_steps(3 + n % 5, 6, seed=n)
        sequences.append({"id": sequence_id, "steps": steps, "end": n % 4 in (0, 1)})
    job = [{**s, "steps": rows_of(s["steps"])} for s in sequences]
    report = run_app(app_python, server.target, "interleaved", sequences=job)

    assert (report["complete"], report["send_error"]) == (True, None)
    answers = report["answers"]
    assert [a for a in answers if "error" in a] == []
    assert len(report["sent"]) == sum(len(s["steps"]) for s in sequences)
    assert sorted(a.get("id") for a in answers) == sorted(report["sent"]), "ids not echoed once"
    for n, sequence in enumerate(sequences):
        mine = [a for a in answers if a["id"].split("/")[0] == str(n)]
        for step, answer in enumerate(mine):  # in the order the sequence's requests were sent
            assert_answered(answer, f"{n}/{step}", step, 1)
        got = np.concatenate([outputs(a) for a in mine])
        assert_equals_offline(got, bundled_model, sequence["steps"], err_msg=f"sequence {n}")
        session_id = str(sequence["id"])
        if sequence["end"]:
            assert_ended(server.target, session_id)
        else:  # each step applied exactly once, as the native API exports the session
            assert_state_equals_offline(
                server.target, session_id, bundled_model, sequence["steps"], err_msg=session_id
            )


def test_unary_infer_continues_a_sequence_of_the_stream_exactly_once(
    server, app_python, bundled_model
):
    """Started on a stream with an int id; continued by a unary infer ([1, T, 6], with
    lstm_start_step) sent twice; then by the native API under the id's string; ended by a
    unary infer naming it as a string id."""
    sequence_id, steps = 20_001, random_steps(10, 6, seed=101)
    report = run_app(
        app_python,
        server.target,
        "continue",
        sequence_id=sequence_id,
        stream_steps=rows_of(steps[:4]),
        unary_steps=rows_of(steps[4:7]),
        resend=True,
    )
    streamed = report["stream"]
    assert streamed["complete"] and len(streamed["answers"]) == 4
    for step, answer in enumerate(streamed["answers"]):
        assert_answered(answer, f"s{step}", step, 1)
    got = np.concatenate([outputs(a) for a in streamed["answers"]])
    assert_equals_offline(got, bundled_model, steps)
    first, again = report["unary"]
    assert_answered(first, "u0", 4, 3)
    assert_answered(again, "u1", 4, 3)
    assert first["shape"] == [1, 3, 4], "shaped as its input, [1, T, input_size]"
    assert_equals_offline(outputs(first), bundled_model, steps, first=4)
    np.testing.assert_array_equal(outputs(again), outputs(first))  # replayed, not recomputed
    assert_state_equals_offline(server.target, str(sequence_id), bundled_model, steps[:7])

    with StreamingClient(server.target) as client:
        session = client.attach(str(sequence_id))  # the sequence is the session "20001"
        assert_equals_offline(session.send(steps[7:8]), bundled_model, steps, first=7)
        session.detach()

    end = {"sequence_id": str(sequence_id), "steps": rows_of(steps[8:]), "end": True}
    (last,) = run_app(app_python, server.target, "unary", requests=[{**end, "id": "end"}])[
        "answers"
    ]
    assert_answered(last, "end", 8, 2)
    assert_equals_offline(outputs(last), bundled_model, steps, first=8)
    assert_ended(server.target, str(sequence_id))


def test_a_native_session_is_continued_by_a_string_id(server, app_python, bundled_model):
    steps = random_steps(5, 6, seed=102)
    with StreamingClient(server.target) as client:
        session = client.open_session("tc-native-1")
        assert_equals_offline(session.send(steps[:3]), bundled_model, steps)
        session.detach()
    request = {"sequence_id": "tc-native-1", "steps": rows_of(steps[3:]), "start_step": 3}
    (answer,) = run_app(app_python, server.target, "unary", requests=[request])["answers"]
    assert_answered(answer, "u0", 3, 2)
    assert_equals_offline(outputs(answer), bundled_model, steps, first=3)
    assert_state_equals_offline(server.target, "tc-native-1", bundled_model, steps)


def test_a_wrong_width_request_gets_one_error_and_the_sequence_goes_on(
    server, app_python, bundled_model
):
    steps = random_steps(6, 6, seed=103)
    report = run_app(
        app_python,
        server.target,
        "bad_request",
        sequence_id="tc-bad-width",
        steps=rows_of(steps),
        bad_at=3,
        bad_width=5,
    )
    assert report["sent"] == ["s0", "s1", "s2", "bad", "s3", "s4", "s5"]
    assert report["complete"], report
    errors = [a for a in report["answers"] if "error" in a]
    answered = [a for a in report["answers"] if "error" not in a]
    assert len(errors) == 1, errors
    assert_refused(
        errors[0],
        "INVALID_ARGUMENT (BAD_INPUT)",
        "INPUT.shape: expected [timesteps, 6] or [1, timesteps, 6], got [1, 5]",
    )
    assert report["answers"].index(errors[0]) == 3, "answered in the order sent"
    for step, answer in enumerate(answered):
        assert_answered(answer, f"s{step}", step, 1)
    got = np.concatenate([outputs(a) for a in answered])
    assert_equals_offline(got, bundled_model, steps)  # the bad request applied nothing
    assert_ended(server.target, "tc-bad-width")


def test_a_sequence_never_started_is_refused(server, app_python):
    ids = [30_001, "tc-never-started"]
    report = run_app(app_python, server.target, "unstarted", sequence_ids=ids)
    streamed = report["stream"]
    assert (streamed["complete"], len(streamed["answers"])) == (True, 2), "the stream went on"
    for sequence_id, on_stream, unary in zip(
        ids, streamed["answers"], report["unary"], strict=True
    ):
        named = f"sequence_id '{sequence_id}': no such sequence"
        assert_refused(on_stream, "NOT_FOUND (SESSION_NOT_FOUND)", named, NO_SEQUENCE)
        assert_refused(unary, named, NO_SEQUENCE, status="StatusCode.NOT_FOUND")
        assert_ended(server.target, str(sequence_id))  # and none was created


def test_a_request_after_sequence_end_is_refused(server, app_python, bundled_model):
    steps = random_steps(3, 6, seed=104)
    report = run_app(
        app_python, server.target, "after_end", sequence_id=30_101, steps=rows_of(steps)
    )
    streamed = report["stream"]
    assert streamed["sent"] == ["s0", "s1", "s2", "again"]
    assert streamed["complete"], streamed
    *answers, again = streamed["answers"]
    for step, answer in enumerate(answers):
        assert_answered(answer, f"s{step}", step, 1)
    assert_equals_offline(np.concatenate([outputs(a) for a in answers]), bundled_model, steps)
    assert_refused(again, "NOT_FOUND (SESSION_NOT_FOUND)", "'30101'", NO_SEQUENCE)
    assert_refused(report["unary"], "'30101'", NO_SEQUENCE, status="StatusCode.NOT_FOUND")
    assert_ended(server.target, "30101")


def test_an_id_ended_and_reused_on_one_pipelined_stream(server, app_python, bundled_model):
    """As Triton's clients reuse ids: a sequence ends, a request without sequence_start for its
    id is refused, and a new sequence under the same id starts from zero, all sent before any
    answer is awaited."""
    steps, reused = random_steps(2, 6, seed=105), random_steps(3, 6, seed=106)
    report = run_app(
        app_python,
        server.target,
        "reuse_after_end",
        sequence_id="tc-reused",
        steps=rows_of(steps),
        new_steps=rows_of(reused),
    )
    assert report["sent"] == ["s0", "s1", "again", "n0", "n1", "n2"]
    assert report["complete"], report
    s0, s1, again, *new = report["answers"]
    assert_answered(s0, "s0", 0, 1)
    assert_answered(s1, "s1", 1, 1)
    assert_refused(again, "NOT_FOUND (SESSION_NOT_FOUND)", NO_SEQUENCE)
    for step, answer in enumerate(new):
        assert_answered(answer, f"n{step}", step, 1)
    assert_equals_offline(np.concatenate([outputs(a) for a in new]), bundled_model, reused)
    assert_ended(server.target, "tc-reused")


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    path = tmp_path_factory.mktemp("oip-auth") / "tokens"
    path.write_text(f"# token principal\n{ALICE} alice\n{BOB} bob\n")
    with ServeProcess("--auth-tokens", str(path)) as proc:
        yield proc


def test_tokens(secured, app_python, bundled_model):
    """Without a token: the probes answer, everything else is UNAUTHENTICATED (unary and
    stream). With one: served, and a token's sequences are its own."""
    unauthenticated = "StatusCode.UNAUTHENTICATED"
    probes = run_app(app_python, secured.target, "probe")
    assert (probes["server_live"], probes["server_ready"]) == ({"value": True}, {"value": True})
    for name in ("model_ready", "server_metadata", "model_metadata", "model_config"):
        assert probes[name]["status"] == unauthenticated, (name, probes[name])

    steps = random_steps(4, 6, seed=107)
    start = {"sequence_id": 40_001, "steps": rows_of(steps[:2]), "start": True}
    (refused,) = run_app(app_python, secured.target, "unary", requests=[start])["answers"]
    assert_refused(refused, status=unauthenticated)
    sequences = [{"id": "tc-token", "steps": rows_of(steps), "end": True}]
    streamed = run_app(app_python, secured.target, "interleaved", sequences=sequences)
    assert not streamed["complete"]
    assert [a["status"] for a in streamed["answers"]] == [unauthenticated], streamed

    probes = run_app(app_python, secured.target, "probe", token=ALICE)
    assert all("value" in probes[name] for name in probes), probes
    assert probes["model_ready"] == {"value": True}
    (started,) = run_app(app_python, secured.target, "unary", token=ALICE, requests=[start])[
        "answers"
    ]
    assert_answered(started, "u0", 0, 2)
    assert_equals_offline(outputs(started), bundled_model, steps)
    go_on = {"sequence_id": 40_001, "steps": rows_of(steps[2:]), "end": True}
    (bobs,) = run_app(app_python, secured.target, "unary", token=BOB, requests=[go_on])["answers"]
    assert_refused(bobs, NO_SEQUENCE, status="StatusCode.NOT_FOUND")  # alice's, not bob's
    (ended,) = run_app(app_python, secured.target, "unary", token=ALICE, requests=[go_on])[
        "answers"
    ]
    assert_answered(ended, "u0", 2, 2)
    assert_equals_offline(outputs(ended), bundled_model, steps, first=2)
    assert_ended(secured.target, "40001", token=ALICE)

    streamed = run_app(app_python, secured.target, "interleaved", sequences=sequences, token=BOB)
    assert streamed["complete"], streamed
    got = np.concatenate([outputs(a) for a in streamed["answers"]])
    assert_equals_offline(got, bundled_model, steps)


def readme_example() -> str:
    """The python block of the README's section on Triton's and KServe's clients."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Calling from Triton's and KServe's clients\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)
    assert len(blocks) == 1, "expected one python example in the section"
    return blocks[0]


def test_the_readme_example_runs_as_written(server, app_python, bundled_model):
    code = readme_example()
    assert code.count('"localhost:50051"') == 1
    code = code.replace('"localhost:50051"', json.dumps(server.target))
    done = subprocess.run(
        [app_python, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and all(re.fullmatch(r"\[\[[^\[\]]+\]\]", x) for x in lines), lines
    number = r"[-+]?\d+\.?\d*(?:e[-+]?\d+)?"
    printed = np.array([[float(v) for v in re.findall(number, x)] for x in lines])
    rows = (ROOT / "examples" / "sample.csv").read_text().splitlines()
    rows = [r for r in rows if r and not r.startswith("#")][1:]  # a header, then timesteps
    steps = np.array([[float(v) for v in r.split(",")] for r in rows], dtype=np.float32)
    assert_equals_offline(printed, bundled_model, steps[:3])  # printed to 8 digits
    assert_ended(server.target, "42")
