"""The Node.js example (examples/node) run with node against a live server: its outputs equal
the Python SDK's and the model's offline, through a lost connection and a resend, and it reads
the ErrorInfo of a refused message."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lstm_stream.client import StreamingClient
from tests.equality import assert_equals_offline
from tests.factories import random_steps, require_binary

EXAMPLE = Path(__file__).parents[2] / "examples" / "node"
PROTO_DIR = Path(__file__).parents[2] / "proto"


@pytest.fixture(scope="module")
def node_example(tmp_path_factory) -> Path:
    return install_node_example(tmp_path_factory)


def install_node_example(tmp_path_factory) -> Path:
    """The example in a folder of its own, its packages installed from the committed lock."""
    require_binary("node")
    npm = require_binary("npm")
    work = tmp_path_factory.mktemp("node-example")
    for name in (
        "package.json",
        "package-lock.json",
        "lstm_stream.js",
        "example.js",
        "oip_example.js",
    ):
        shutil.copy(EXAMPLE / name, work / name)
    installed = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stderr
    return work


def run_example(work: Path, target: str, steps: np.ndarray, *flags: str) -> dict:
    result = subprocess.run(
        ["node", "example.js", "--target", target, *flags],
        cwd=work,
        input=json.dumps(steps.tolist()),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LSTM_STREAM_PROTO_DIR": str(PROTO_DIR)},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_node_example_streams_resumes_and_reads_error_info(
    node_example, regression_server, regression_model
):
    """A regression model: the step resent after the dropped connection, applied twice, would
    show in every later output."""
    steps = random_steps(20, 6, seed=51)
    report = run_example(node_example, regression_server.target, steps)
    with StreamingClient(regression_server.target) as client, client.open_session() as session:
        from_python = session.send(steps)
    outputs = np.asarray(report["outputs"], dtype=np.float32)
    np.testing.assert_allclose(outputs, from_python, atol=1e-6, rtol=0)
    assert_equals_offline(outputs, regression_model, steps)
    # The connection cut halfway cost one resend and no step twice.
    assert report["resends"] >= 1
    assert report["next_step"] == 20
    # The two steps resent with their start_step came back from the replay buffer, unchanged.
    np.testing.assert_allclose(np.asarray(report["replayed"]), outputs[18:], atol=0, rtol=0)
    refusal = report["refusal"]
    assert (refusal["code"], refusal["reason"]) == (3, "BAD_INPUT")  # INVALID_ARGUMENT
    assert "expected a multiple of input_size=6" in refusal["details"], refusal


def test_a_node_client_generated_from_the_oip_proto_streams_sequences(
    node_example, server, bundled_model
):
    """examples/node/oip_example.js: six sequences, int and string ids, interleaved and
    pipelined on one ModelStreamInfer stream from the .proto alone; a bad request among them
    is answered with an error_message and the stream goes on."""
    inputs = [random_steps(4, 6, seed=300 + i) for i in range(6)]
    result = subprocess.run(
        ["node", "oip_example.js", "--target", server.target],
        cwd=node_example,
        input=json.dumps([steps.tolist() for steps in inputs]),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LSTM_STREAM_PROTO_DIR": str(PROTO_DIR)},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    (error,) = report["errors"]
    assert error["id"] == "bad" and "INVALID_ARGUMENT (BAD_INPUT)" in error["message"]
    assert len(report["ids"]) == 6 * 4 + 1
    for steps, outputs in zip(inputs, report["outputs"], strict=True):
        assert_equals_offline(np.asarray(outputs, np.float32), bundled_model, steps)
