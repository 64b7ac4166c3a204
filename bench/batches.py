"""Many sessions per message against one session per stream, in one run (issue 15's targets).

    python -m bench.batches            # 3 alternating trials, into docs/batches.{json,md}

It also adds its section to docs/benchmarks.md (re-rendered from benchmarks.json).

One lstm-serve (bundled model) on this machine; the same load generator process kind for
every cell. Cells: 64 StreamSteps sessions of 1-step messages (repeated floats, then packed
bytes), and 1,024 sessions fed by StreamBatches, 1,024 1-step chunks a message, a window of 4.
Trials alternate the cells, so drift on a shared machine hits them alike; medians are quoted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
from dataclasses import asdict
from pathlib import Path

from bench.cpu_meter import _process_cpu_s
from bench.process import lstm_serve, running_server
from bench.report import render_outputs
from lstm_stream.client.batch_loadgen import run_batch_load
from lstm_stream.client.loadgen import run_load

CELLS = {
    "StreamSteps, 64 sessions, floats": lambda t, d: run_load(t, 64, 1, d),
    "StreamSteps, 64 sessions, packed": lambda t, d: run_load(t, 64, 1, d, packed=True),
    "StreamBatches, 1,024 sessions x 1,024 chunks, window 4": lambda t, d: run_batch_load(
        t, 1024, 1024, 1, d, window=4
    ),
}
BASELINE, BATCHED = next(iter(CELLS)), list(CELLS)[-1]


def measure(trials: int, duration_s: float) -> dict:
    runs: dict[str, list[dict]] = {name: [] for name in CELLS}
    with tempfile.TemporaryDirectory() as work:
        command = lstm_serve("--metrics-port", "0", "--max-sessions", "4096")
        with running_server(command, Path(work) / "serve.log") as (target, pid):
            for _ in range(trials):
                for name, cell in CELLS.items():
                    before = _process_cpu_s(pid)
                    row = asdict(asyncio.run(cell(target, duration_s)))
                    # Server CPU per timestep over the whole cell (set-up and warm-up
                    # included, so an upper bound): a chunk is one timestep here.
                    row["server_cpu_s"] = _process_cpu_s(pid) - before
                    runs[name].append(row)
    medians = {
        name: statistics.median(r["timesteps_per_s"] for r in rows) for name, rows in runs.items()
    }
    return {
        "machine": f"{platform.node()}: {platform.processor() or platform.machine()}, "
        f"{__import__('os').cpu_count()} cores",
        "trials": trials,
        "duration_s": duration_s,
        "runs": runs,
        "median_timesteps_per_s": medians,
        "ratio_batched_to_streamsteps": medians[BATCHED] / medians[BASELINE],
        "errors": sum(r["errors"] for rows in runs.values() for r in rows),
    }


def render(result: dict, heading: str = "#") -> str:
    lines = [
        f"{heading} Many sessions per message (StreamBatches) against StreamSteps",
        "",
        f"Machine: {result['machine']}. {result['trials']} alternating trials of "
        f"{result['duration_s']:.0f} s each; one lstm-serve (bundled model, CPU, defaults), "
        "one load generator. Written by `make bench-batches` (bench/batches.py).",
        "",
        "| cell | timesteps/s (median) | each trial | p99 latency per message (median) "
        "| server CPU per timestep (median, upper bound) |",
        "| --- | ---: | --- | ---: | ---: |",
    ]
    for name, rows in result["runs"].items():
        each = ", ".join(f"{r['timesteps_per_s']:,.0f}" for r in rows)
        p99 = statistics.median(r["latency_p99_s"] for r in rows) * 1e3
        median = result["median_timesteps_per_s"][name]
        cpu = statistics.median(
            r["server_cpu_s"] / (r["timesteps_per_s"] * r["duration_s"]) for r in rows
        )
        lines.append(f"| {name} | {median:,.0f} | {each} | {p99:.1f} ms | {cpu * 1e6:.1f} us |")
    lines += [
        "",
        f"StreamBatches / StreamSteps (floats), medians of the same run: "
        f"{result['ratio_batched_to_streamsteps']:.1f}x. Errors: {result['errors']}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--out-dir", type=Path, default=Path("docs"))
    args = parser.parse_args()
    result = measure(args.trials, args.duration)
    (args.out_dir / "batches.json").write_text(json.dumps(result, indent=2) + "\n")
    text = render(result)
    (args.out_dir / "batches.md").write_text(text)
    benchmarks = args.out_dir / "benchmarks.json"
    if benchmarks.exists():
        render_outputs(json.loads(benchmarks.read_text()), args.out_dir)
    print(text)


if __name__ == "__main__":
    main()
