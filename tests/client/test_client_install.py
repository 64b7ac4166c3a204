"""The client installs alone, as the README says (`pip install` of the project, no extra): a
fresh venv without torch, whose lstm-client streams to a live server and runs the demo."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lstm_model.checkpoint import BUNDLED_MODEL_DIR
from tests.equality import assert_equals_offline
from tests.factories import random_steps

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).parents[2]
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "node_modules", "__pycache__", "build", "*.egg-info", ".*_cache", ".hypothesis"
)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A new venv with `pip install <a copy of the project>` in it (the copy keeps build files
    out of the checkout); its bin/ folder."""
    work = tmp_path_factory.mktemp("client-only")
    source = work / "lstm-stream"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", str(work / "venv")], check=True, timeout=120)
    installed = subprocess.run(
        [str(work / "venv" / "bin" / "pip"), "install", "-q", str(source)],
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    return work / "venv" / "bin"


def run(command: list, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=300)


def test_the_client_install_has_no_torch(client_venv):
    result = run([str(client_venv / "python"), "-c", "import torch"])
    assert result.returncode != 0
    assert "No module named 'torch'" in result.stderr


def test_its_lstm_client_streams_to_a_live_server(client_venv, server, bundled_model):
    steps = random_steps(9, 6, seed=61)
    csv = "".join(",".join(repr(float(v)) for v in row) + "\n" for row in steps)
    result = run(
        [str(client_venv / "lstm-client"), "stream", "--target", server.target, "--chunk", "4"],
        stdin=csv,
    )
    assert result.returncode == 0, result.stderr
    outputs = np.array([[float(v) for v in line.split(",")] for line in result.stdout.splitlines()])
    assert_equals_offline(outputs, bundled_model, steps)


def test_its_demo_reports_the_model_cards_accuracy(client_venv, server):
    result = run([str(client_venv / "lstm-client"), "demo", "--target", server.target])
    assert result.returncode == 0, result.stderr
    card = (BUNDLED_MODEL_DIR / "MODEL_CARD.md").read_text()
    table = [line for line in result.stdout.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(table) == 4 and all(row in card for row in table), result.stdout


def test_its_server_commands_name_the_extra_they_need(client_venv):
    for program in ("lstm-serve", "lstm-model"):
        result = run([str(client_venv / program), "--help"])
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(
            f"{program}: needs the server extra (pip install 'lstm-stream[server]'); this "
            "install has no module '"
        ), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
