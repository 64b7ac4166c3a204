"""The soak target runs: a few seconds of it, with every check it makes at full length."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_soak_smoke_run_passes_its_checks(tmp_path):
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.soak",
            "--seconds",
            "6",
            "--sample-every",
            "1",
            "--workers",
            "8",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert all(report["checks"].values()), report["checks"]
    assert report["counts"]["sessions"] > 0 and report["counts"]["errors"] == 0
    assert len(report["samples"]) >= 4
    assert all(s["rss_mib"] > 0 for s in report["samples"])
