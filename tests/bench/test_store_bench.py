"""make bench-store's two programs end to end on small settings: every cell ran against a real
store (a three-master Redis Cluster for bench/store.py), every session continued after the
server was killed, and the reports are well formed. Timings are reported, never compared."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(*args: str, timeout: float) -> None:
    result = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_the_store_bench_survives_a_kill_of_every_cluster_session(tmp_path):
    run(
        "bench.store", "--sessions", "300", "--stores", "cluster", "--window-s", "2",
        "--rate", "600", "--trials", "0", "--out-dir", str(tmp_path), timeout=300,
    )  # fmt: skip
    doc = json.loads((tmp_path / "store.json").read_text())
    (cell,) = doc["cells"]
    assert (cell["store"], cell["sessions"]) == ("cluster", 300)
    assert cell["feed_errors"] == 0 and cell["timesteps"] > 0
    assert cell["store_net_input_bytes"] > 0 and cell["record_within_budget"]
    assert cell["record"]["state_field_bytes_max"] <= 2 * 2 * 256 * 4 + 1024
    recovery = cell["recovery"]
    assert (recovery["continued"], recovery["failed"]) == (300, 0), recovery
    assert "Redis Cluster" in (tmp_path / "store.md").read_text()


def test_the_store_cost_bench_writes_a_row_per_setting(tmp_path):
    run(
        "bench.store_cost", "--warmup-s", "0.5", "--window-s", "1",
        "--out-dir", str(tmp_path), timeout=300,
    )  # fmt: skip
    doc = json.loads((tmp_path / "store_cost.json").read_text())
    rows = doc["rows"]
    assert len(rows) == 7
    for row in rows:
        assert row["timesteps_per_s"] > 0 and row["redis_bytes_per_s"] > 0, row
        assert row["lag_steps_max"] >= row["lag_steps_median"] >= 0, row
    told, silent = rows[0], rows[4]
    assert told["says_answered"] and not silent["says_answered"]
    # h and c are 4,096 bytes; a client that says what it has keeps the record near that,
    # one that says nothing has every output of the last 256 steps (32 B each) stored with it.
    assert told["record_bytes"] <= 4096 + 1024 < silent["record_bytes"] - 1024
    markdown = (tmp_path / "store_cost.md").read_text()
    assert markdown.count("says answered") == 6 and markdown.count("| silent |") == 1
