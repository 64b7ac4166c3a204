"""GRU against LSTM through the server, and the LSTM against an earlier checkout (issue 30):
the same 256-hidden, 2-layer shape, the same closed-loop loads, one run.

    python -m bench.cells --out-dir docs                    # docs/cells.{json,md}
    python -m bench.cells --baseline-tree /tmp/before       # also the LSTM as served there

Servers: lstm-serve as it ships (defaults) with one model each, all up at once, so every
trial sees the same machine. Cells: 64 sessions x 1-step messages and 64 x 32-step messages
(packed), alternating over the servers, `--trials` times; medians. A baseline tree is another
checkout of this repository (`git worktree add /tmp/before COMMIT`): its lstm-serve runs from
its own source with this checkout's packages otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench.process import running_server
from lstm_model.checkpoint import save_model
from lstm_model.cli import init_model
from lstm_stream.client.loadgen import run_load

LOADS = {"64 x 1 step": (64, 1), "64 x 32 steps": (64, 32)}
SHAPE = dict(input_size=32, hidden_size=256, num_layers=2, output_size=8, seed=0)


def serve_command(model_dir: Path) -> list[str]:
    return [sys.executable, "-m", "server.app", "--host", "127.0.0.1", "--port", "0",
            "--metrics-port", "0", "--model", str(model_dir), "--max-sessions", "256"]  # fmt: skip


def measure(servers: dict[str, str], trials: int, duration_s: float) -> dict:
    runs: dict[str, dict[str, list[float]]] = {s: {load: [] for load in LOADS} for s in servers}
    for _ in range(trials):
        for load, (sessions, steps) in LOADS.items():
            for name, target in servers.items():
                result = asyncio.run(run_load(target, sessions, steps, duration_s, packed=True))
                if result.errors:
                    raise RuntimeError(f"{name}, {load}: {result.error_sample}")
                runs[name][load].append(result.timesteps_per_s)
    return runs


def render(doc: dict) -> str:
    names = list(doc["runs"])
    lines = [
        "# GRU and LSTM through the server",
        "",
        f"`python -m bench.cells`, {doc['date']}, on {doc['machine']}: lstm-serve as it ships, "
        "one model per server (32 inputs, 256 hidden, 2 layers, 8 outputs), all servers up at "
        f"once; closed-loop StreamSteps sessions, packed inputs, {doc['trials']} alternating "
        f"trials of {doc['duration_s']:.0f} s; medians, timesteps/s.",
        "",
        "| load | "
        + " | ".join(names)
        + " | GRU / LSTM |"
        + (" LSTM / baseline LSTM |" if "baseline LSTM" in names else ""),
        "| --- |" + " ---: |" * (len(names) + 1 + ("baseline LSTM" in names)),
    ]
    for load in LOADS:
        medians = {n: doc["medians"][n][load] for n in names}
        cells = " | ".join(f"{medians[n]:,.0f}" for n in names)
        row = f"| {load} | {cells} | {medians['GRU'] / medians['LSTM']:.2f} |"
        if "baseline LSTM" in names:
            row += f" {medians['LSTM'] / medians['baseline LSTM']:.2f} |"
        lines.append(row)
    lines += ["", "Trials: " + json.dumps(doc["runs"])]
    if doc.get("baseline"):
        lines += ["", f"Baseline: the LSTM served from {doc['baseline']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--baseline-tree", type=Path, help="another checkout: its LSTM too")
    parser.add_argument("--out-dir", type=Path, default=Path("docs"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        work = Path(tmp)
        lstm = save_model(init_model(**SHAPE), work / "lstm")
        gru = save_model(init_model(**SHAPE, cell="gru"), work / "gru")
        servers = {}
        for name, model_dir in (("LSTM", lstm), ("GRU", gru)):
            command = serve_command(model_dir)
            servers[name], _ = stack.enter_context(running_server(command, work / f"{name}.log"))
        if args.baseline_tree:
            os.chdir(args.baseline_tree)  # its `server` package, run with -m from there
            command = serve_command(lstm)
            target, _ = stack.enter_context(running_server(command, work / "baseline.log"))
            servers["baseline LSTM"] = target
        runs = measure(servers, args.trials, args.duration_s)
    medians = {n: {load: statistics.median(v) for load, v in r.items()} for n, r in runs.items()}
    doc = {
        "machine": f"{platform.node()}, {os.cpu_count()} cores",
        "date": datetime.date.today().isoformat(),
        "trials": args.trials,
        "duration_s": args.duration_s,
        "baseline": str(args.baseline_tree or ""),
        "runs": runs,
        "medians": medians,
    }
    out = args.out_dir if args.out_dir.is_absolute() else Path(__file__).parents[1] / args.out_dir
    (out / "cells.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "cells.md").write_text(render(doc))
    print(render(doc))


if __name__ == "__main__":
    main()
