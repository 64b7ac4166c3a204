"""bench/oip.py end to end on its quick setting: every cell ran against one server, without
errors, and the report says so. Timings are reported, never compared here: a noisy machine
can put either cell ahead."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CELLS = ("native StreamSteps", "OIP ModelStreamInfer", "OIP, a stream per sequence")


def test_quick_run_writes_a_well_formed_report(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench.oip", "--quick", "--out-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads((tmp_path / "oip.json").read_text())

    assert list(doc["runs"]) == list(CELLS)
    assert doc["errors"] == 0, doc["runs"]
    for name in CELLS:
        (row,) = doc["runs"][name]
        assert row["errors"] == 0 and not row["error_sample"], row
        assert row["sessions"] == doc["sequences"] == 64, row
        assert row["timesteps"] > 0 and row["timesteps"] == row["messages"], row
        assert row["latency_p99_s"] >= row["latency_p50_s"] > 0, row
        assert doc["medians"][name]["timesteps_per_s"] > 0
    assert doc["medians"][CELLS[0]]["ratio_to_native"] == 1.0
    assert doc["ratio_oip_to_native"] > 0 and doc["ratio_oip_stream_each_to_native"] > 0
    assert doc["machine"]["cores"] > 0 and doc["machine"]["date"]

    markdown = (tmp_path / "oip.md").read_text()
    table = [line.split("|")[1:-1] for line in markdown.splitlines() if line.startswith("| ")]
    rows = {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in table}
    assert set(CELLS) <= set(rows)
    for name in CELLS:
        assert rows[name][0] == "64" and rows[name][-1].endswith("x"), rows[name]
    assert f"{doc['machine']['cores']} cores" in markdown and doc["machine"]["cpu"] in markdown
    assert "Errors: 0." in markdown
