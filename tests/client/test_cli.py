"""Each lstm-client command run as a subprocess against a real server, its output checked."""

import json
import re
import subprocess

import numpy as np
import pytest

from lstm_model.checkpoint import BUNDLED_MODEL_DIR
from lstm_stream.client import StreamingClient
from tests.equality import assert_equals_offline
from tests.factories import console_script, offline, random_steps


def lstm_client(*args: str, stdin: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [console_script("lstm-client"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def to_csv(rows: np.ndarray) -> str:
    return "".join(",".join(repr(float(v)) for v in row) + "\n" for row in rows)


def from_csv(text: str) -> np.ndarray:
    return np.array([[float(v) for v in line.split(",")] for line in text.splitlines()])


def test_info_describes_the_model(server):
    result = lstm_client("info", "--target", server.target)
    assert result.returncode == 0, result.stderr
    assert "basic-motions v1" in result.stdout
    assert "input 6, hidden 48 x 2 layers, output 4" in result.stdout
    assert "classification: badminton, running, standing, walking" in result.stdout


def test_health_is_serving(server, monkeypatch):
    monkeypatch.setenv("LSTM_CLIENT_TARGET", server.target)  # the env var names the target
    result = lstm_client("health")
    assert (result.returncode, result.stdout.strip()) == (0, "SERVING")


@pytest.mark.parametrize("chunk", ["1", "7"])
def test_stream_prints_one_output_row_per_timestep(server, bundled_model, chunk):
    steps = random_steps(20, 6, seed=90)
    result = lstm_client(
        "stream", "--target", server.target, "--chunk", chunk, stdin="# a comment\n" + to_csv(steps)
    )
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(from_csv(result.stdout), offline(bundled_model, steps), atol=1e-5)


def test_stream_from_a_file_then_resume_the_session(regression_server, regression_model, tmp_path):
    """A regression model: a step applied twice on the resume would show in its outputs."""
    steps = random_steps(12, 6, seed=91)
    (tmp_path / "first.csv").write_text(to_csv(steps[:5]))
    first = lstm_client(
        "stream", str(tmp_path / "first.csv"), "--keep", "--target", regression_server.target
    )
    assert first.returncode == 0, first.stderr
    resume_flag = re.search(r"resume with (--session=\S+)", first.stderr).group(1)
    rest = lstm_client(
        "stream", resume_flag, "--target", regression_server.target, stdin=to_csv(steps[5:])
    )
    assert rest.returncode == 0, rest.stderr
    assert f"session {resume_flag.removeprefix('--session=')} from step 5" in rest.stderr
    outputs = np.concatenate([from_csv(first.stdout), from_csv(rest.stdout)])
    assert_equals_offline(outputs, regression_model, steps)


def test_a_session_id_that_begins_with_a_dash_resumes_as_printed(
    regression_server, regression_model
):
    """One server-issued id in 64 begins with '-' (base64url); the printed --session=ID form
    must still resume it."""
    steps = random_steps(4, 6, seed=92)
    with StreamingClient(regression_server.target) as client:
        session = client.open_session("-starts-with-a-dash")
        first = session.send(steps[:2])
        session.detach()
    rest = lstm_client(
        "stream",
        "--session=-starts-with-a-dash",
        "--keep",
        "--target",
        regression_server.target,
        stdin=to_csv(steps[2:]),
    )
    assert rest.returncode == 0, rest.stderr
    assert "resume with --session=-starts-with-a-dash" in rest.stderr
    outputs = np.concatenate([first, from_csv(rest.stdout)])
    assert_equals_offline(outputs, regression_model, steps)


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        ("1,2,3\n", "line 1: expected 6 numbers (the model's input_size), got 3"),
        ("1,2,3,4,5,6\n1,2,x,4,5,6\n", "line 2: expected numbers, got '1,2,x,4,5,6'"),
    ],
)
def test_stream_refuses_bad_csv_with_one_clear_line(server, stdin, message):
    result = lstm_client("stream", "--target", server.target, stdin=stdin)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"lstm-client: {message}"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["info", "stream", "demo"])
def test_unreachable_server_is_one_line_and_non_zero_within_the_deadline(command):
    """--deadline bounds the whole call, retries included (they once ran on past it for 13 s):
    the call ends DEADLINE_EXCEEDED, the deadline's own code, not with retries spent."""
    from tests.factories import free_port

    target = f"127.0.0.1:{free_port()}"
    result = lstm_client(command, "--target", target, "--deadline", "1", stdin="1,2,3,4,5,6\n")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"lstm-client: {target}: DEADLINE_EXCEEDED: no answer within")


def test_demo_reports_the_model_cards_accuracy_and_latency(server):
    result = lstm_client("demo", "--target", server.target, timeout=300)
    assert result.returncode == 0, result.stderr
    card = (BUNDLED_MODEL_DIR / "MODEL_CARD.md").read_text()
    table = [line for line in result.stdout.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(table) == 4
    for row in table:
        assert row in card  # equal to the model card, row by row
    assert re.search(r"p50 [\d.]+ ms, p95 [\d.]+ ms, p99 [\d.]+ ms", result.stdout)


def test_bench_prints_json_for_machines(server):
    result = lstm_client(
        "bench",
        "--target",
        server.target,
        "--sessions",
        "3",
        "--chunk",
        "4",
        "--duration",
        "1",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["sessions"], report["chunk_steps"], report["errors"]) == (3, 4, 0)
    assert report["timesteps"] == report["messages"] * 4 > 0
    assert report["latency_p99_s"] >= report["latency_p50_s"] > 0


def test_bench_feeds_sessions_by_batch_messages(server):
    """--sessions-per-message: StreamBatches streams of that many sessions' chunks."""
    flags = ["--sessions", "40", "--sessions-per-message", "16", "--chunk", "2"]
    result = lstm_client("bench", "--target", server.target, *flags, "--duration", "1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["sessions"], report["sessions_per_message"], report["errors"]) == (40, 16, 0)
    # Three streams of 16, 16 and 8 sessions: every counted message is one of them.
    per_message = {16 * 2, 8 * 2}
    assert report["timesteps"] > 0 and report["messages"] > 0
    assert min(per_message) * report["messages"] <= report["timesteps"]
    assert report["timesteps"] <= max(per_message) * report["messages"]
    bad = lstm_client("bench", "--target", server.target, "--sessions-per-message", "-1")
    assert bad.returncode == 2
    assert "--sessions-per-message must be >= 0" in bad.stderr


def test_bench_sends_the_token_it_is_given(tmp_path):
    from tests.factories import ServeProcess

    tokens = tmp_path / "tokens"
    tokens.write_text("bench-secret-token load\n")
    flags = ["--sessions", "2", "--chunk", "1", "--duration", "0.5", "--json"]
    with ServeProcess("--auth-tokens", str(tokens)) as srv:
        refused = lstm_client("bench", "--target", srv.target, *flags)
        allowed = lstm_client(
            "bench", "--target", srv.target, "--token", "bench-secret-token", *flags
        )
    assert refused.returncode == 1
    assert "UNAUTHENTICATED" in refused.stderr.strip().splitlines()[-1], refused.stderr
    assert allowed.returncode == 0, allowed.stderr
    report = json.loads(allowed.stdout)
    assert (report["errors"], report["messages"] > 0) == (0, True)


def test_stream_skips_a_header_row_of_column_names(server, bundled_model):
    steps = random_steps(5, 6, seed=93)
    result = lstm_client(
        "stream", "--target", server.target, stdin="ax,ay,az,gx,gy,gz\n" + to_csv(steps)
    )
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(from_csv(result.stdout), offline(bundled_model, steps), atol=1e-5)
    short = lstm_client("stream", "--target", server.target, stdin="ax,ay,az\n" + to_csv(steps))
    assert short.returncode == 2
    assert short.stderr.strip().splitlines()[-1] == (
        "lstm-client: line 1: expected 6 column names (the model's input_size), got 3"
    )


@pytest.mark.parametrize("first_row", ["1,2,x,4,5,6", "1,2,3"])
def test_a_bad_first_row_is_refused_before_a_session_is_created(first_row):
    from tests.factories import ServeProcess, free_port, metric_value

    metrics_port = free_port()
    with ServeProcess("--metrics-port", str(metrics_port)) as srv:
        result = lstm_client("stream", "--target", srv.target, stdin=first_row + "\n")
        created = metric_value(metrics_port, "lstm_sessions_created_total")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("lstm-client: line 1: expected")
    assert created == 0


def session_of(result: subprocess.CompletedProcess) -> str:
    return re.search(r"^session (\S+) from step", result.stderr, flags=re.M).group(1)


def test_a_bad_row_mid_stream_ends_the_session_unless_kept(server, bundled_model):
    from lstm_stream.client import LstmStreamError

    steps = random_steps(3, 6, seed=94)
    bad = to_csv(steps[:1]) + "1,2,x,4,5,6\n"
    ended = lstm_client("stream", "--target", server.target, stdin=bad)
    assert ended.returncode == 2
    assert ended.stderr.strip().splitlines()[-1] == (
        "lstm-client: line 2: expected numbers, got '1,2,x,4,5,6'"
    )
    with StreamingClient(server.target) as client, pytest.raises(LstmStreamError) as gone:
        client.get_session(session_of(ended))
    assert gone.value.reason == "SESSION_NOT_FOUND"

    kept = lstm_client("stream", "--keep", "--target", server.target, stdin=bad)
    assert kept.returncode == 2
    session_id = session_of(kept)
    *_, hint, error = kept.stderr.strip().splitlines()
    assert hint == (
        f"session {session_id} kept at step 1 after 1 rows of this input; resume with "
        f"--session={session_id}"
    )
    assert error == "lstm-client: line 2: expected numbers, got '1,2,x,4,5,6'"
    rest = lstm_client(
        "stream", f"--session={session_id}", "--target", server.target, stdin=to_csv(steps[1:])
    )
    assert rest.returncode == 0, rest.stderr
    outputs = np.concatenate([from_csv(kept.stdout), from_csv(rest.stdout)])
    np.testing.assert_allclose(outputs, offline(bundled_model, steps), atol=1e-5)


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        (
            "1;2;3;4;5;6\n",
            "line 1: expected 6 comma-separated numbers (the model's input_size), "
            "got 6 separated by ';'",
        ),
        (
            "ax;ay;az;gx;gy;gz\n1;2;3;4;5;6\n",
            "line 1: expected 6 comma-separated column names "
            "(the model's input_size), got 6 separated by ';'",
        ),
        (
            "1,2,3,4,5,6\n1\t2\t3\t4\t5\t6\n",
            "line 2: expected 6 comma-separated numbers (the "
            "model's input_size), got 6 separated by tabs",
        ),
    ],
)
def test_stream_names_the_delimiter_of_a_csv_that_is_not_comma_separated(server, stdin, message):
    result = lstm_client("stream", "--target", server.target, stdin=stdin)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"lstm-client: {message}"


@pytest.mark.parametrize("command", ["info", "health", "stream"])
def test_a_target_without_a_port_is_refused_at_once(server, command):
    """gRPC dials port 443 for a target with no port: the deadline passed without a word."""
    host = server.target.rsplit(":", 1)[0]
    # Refused before dialling: a dial would end DEADLINE_EXCEEDED (exit 1) after the deadline.
    result = lstm_client(command, "--target", host, "--deadline", "60", stdin="1,2,3,4,5,6\n")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"lstm-client: --target '{host}': expected HOST:PORT, got no port (gRPC would dial 443; "
        f"lstm-serve's default is 50051: --target {host}:50051)"
    )
