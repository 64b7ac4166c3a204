"""examples/gateway: interleaved device readings (CSV) in, batches to a live server, each
reading's outputs out; every device's outputs equal the model offline."""

import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.equality import assert_equals_offline
from tests.factories import random_steps

GATEWAY = Path(__file__).parents[2] / "examples" / "gateway" / "gateway.py"


def test_gateway_turns_interleaved_readings_into_batches(server, bundled_model, tmp_path):
    devices, readings = 30, 20
    inputs = {f"pump-{d}": random_steps(readings, 6, seed=800 + d) for d in range(devices)}
    rng = np.random.default_rng(8)
    order = rng.permutation(np.repeat(np.arange(devices), readings))  # interleaved
    taken = dict.fromkeys(inputs, 0)
    lines = ["# device_id,t,values"]
    for d in order:
        device = f"pump-{d}"
        t = taken[device]
        taken[device] += 1
        lines.append(",".join([device, str(t), *map(repr, inputs[device][t].tolist())]))
    (tmp_path / "readings.csv").write_text("\n".join(lines) + "\n")
    run = subprocess.run(
        [sys.executable, str(GATEWAY), str(tmp_path / "readings.csv"), "--target", server.target,
         "--flush", "97", "--window", "3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    got: dict[str, list[list[float]]] = {device: [] for device in inputs}
    for line in run.stdout.splitlines():
        device, t, *values = line.split(",")
        assert int(t) == len(got[device])  # each device's readings answered in order, once
        got[device].append([float(v) for v in values])
    for device, steps in inputs.items():
        assert_equals_offline(np.asarray(got[device]), bundled_model, steps)
