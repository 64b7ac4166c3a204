"""bench/gpu.sh runs anywhere with --device cpu --quick: the same checks as on a GPU host."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.factories import require_binary

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_script_smoke_runs_on_the_cpu(tmp_path):
    """The whole GPU stage on the CPU, the one-host stage included: two server processes behind
    nginx with the shipped config."""
    require_binary("nginx")
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        [
            "bash",
            "bench/gpu.sh",
            "--device",
            "cpu",
            "--quick",
            "--balancer",
            "nginx",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = json.loads(out.read_text())
    assert table["one-step path"] == "eager (no capture)"
    assert float(table["max |graph path - plain path|, 6 batches"]) <= 1e-5
    assert float(table["max |device stream - CPU offline|, 8 sessions x 5 steps"]) <= 1e-5
    server_rows = [v for k, v in table.items() if k.startswith("server,")]
    assert len(server_rows) == 2 and all(v.endswith(", 0 errors") for v in server_rows)
    host_rows = [v for k, v in table.items() if k.startswith("one host, 2 processes (nginx),")]
    assert len(host_rows) == 2 and all(v.endswith(", 0 errors") for v in host_rows)
    assert all(float(v.split()[0].replace(",", "")) > 0 for v in host_rows)
    assert "| check | result |" in result.stdout
