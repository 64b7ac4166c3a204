"""What a message costs lstm-serve (issue 29): per-message server CPU, throughput and latency
against the bare gRPC echo and the model's own compute, for this tree and an older one.

    python -m bench.message_cost --out-dir docs                      # docs/message_cost.{json,md}
    python -m bench.message_cost --baseline /tmp/before --out-dir docs

Servers, all up at once: the echo (bench/echo_server.py, one per model shape) and lstm-serve
(defaults) with the bundled model and with init256, from this tree and, with --baseline, from
another checkout (`git worktree add --detach /tmp/before COMMIT`), run from that tree's own
source (cwd and PYTHONPATH; the JSON records which files were imported). Cells: 64 closed-loop
StreamSteps sessions, 1-step messages (and 32-step for init256), alternating over the servers,
`--trials` times; medians. Inputs are repeated floats, the echo's only form (`--packed`: packed
bytes to lstm-serve, floats still to the echo). Server CPU is read from /proc over a window of the
same length as the load generator's, after its warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.bare_compute import time_bare_model
from bench.cpu_meter import BUSY_CORES, CpuMeter, QuietGate
from bench.measure import machine_info
from bench.process import lstm_serve, running_server
from bench.variants import model_summary, prepare_model, server_command
from lstm_stream.client.loadgen import format_result, run_load

ROOT = Path(__file__).resolve().parents[1]
SESSIONS = 64
# (server, model, timesteps per message); the server is "echo" or a tree's name
CELLS = [("echo", "bundled", 1), ("echo", "init256", 1)] + [
    (tree, model, steps)
    for tree in ("current", "baseline")
    for model, steps in (("bundled", 1), ("init256", 1), ("init256", 32))
]
# (name, tree's cell, metric, echo's or bare compute's cell, limit, at most)
TARGETS = [
    ("server CPU per message / echo's", ("bundled", 1), "cpu_us_per_msg", "echo", 1.3, True),
    ("timesteps/s / echo's", ("init256", 1), "timesteps_per_s", "echo", 0.7, False),
    ("p99 latency / echo's", ("init256", 1), "p99_ms", "echo", 2.0, True),
    ("timesteps/s / bare compute's", ("init256", 32), "timesteps_per_s", "bare", 0.6, False),
]
IMPORTS = (
    "import server.app, lstm_model, lstm_stream\n"
    "print(server.app.__file__, lstm_model.__file__, lstm_stream.__file__)"
)


def in_tree(tree: Path, command: list[str]) -> list[str]:
    """The command run from `tree`: its packages before the installed (editable) ones."""
    return ["env", "-C", str(tree), f"PYTHONPATH={tree}", *command]


def imported_files(tree: Path) -> list[str]:
    """Where server, lstm_model and lstm_stream come from when run from `tree` (the first two
    must be the tree's own)."""
    command = in_tree(tree, [sys.executable, "-c", IMPORTS])
    files = subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()
    if not all(Path(f).is_relative_to(tree) for f in files[:2]):
        raise RuntimeError(f"run from {tree}, Python imports {files[:2]}")
    return files


async def measure(
    target: str, pid: int, steps: int, duration_s: float, warmup_s: float, packed: bool
) -> dict:
    """One load run, and the server's CPU over `duration_s` after the warm-up (streams open in
    well under it, so that span lies in the loaded part of the run)."""

    async def server_cpu() -> dict[str, float]:
        await asyncio.sleep(warmup_s)
        meter = CpuMeter([pid])
        await asyncio.sleep(duration_s)
        return meter.cores()

    load = run_load(target, SESSIONS, steps, duration_s, warmup_s, packed=packed)
    result, cores = await asyncio.gather(load, server_cpu())
    print(f"  {format_result(result)}; server {cores['server_cpu_cores']:.2f} cores", flush=True)
    if result.errors:
        raise RuntimeError(f"{target}: {result.errors} errors: {result.error_sample}")
    messages_per_s = result.messages / result.duration_s
    return {
        "timesteps_per_s": result.timesteps_per_s,
        "messages_per_s": messages_per_s,
        "p50_ms": result.latency_p50_s * 1e3,
        "p99_ms": result.latency_p99_s * 1e3,
        "cpu_us_per_msg": cores["server_cpu_cores"] / messages_per_s * 1e6,
        "server_cpu_cores": cores["server_cpu_cores"],
        "other_cpu_cores": cores["other_cpu_cores"],
    }


def start_servers(stack: ExitStack, cells: list, trees: dict, dirs: dict, device: str) -> dict:
    """Every server the cells name, all up at once: {(server, model): (target, pid)}."""
    servers: dict[tuple[str, str], tuple[str, int]] = {}
    for server, model in dict.fromkeys((server, model) for server, model, _ in cells):
        if server == "echo":
            summary = model_summary(model, dirs[model])
            command = in_tree(ROOT, server_command("echo", summary, None, device))
        else:
            flags = ["--metrics-port", "0", "--max-sessions", "4096", "--device", device]
            flags += ["--model", str(dirs[model])] if dirs[model] else []
            command = in_tree(trees[server], lstm_serve(*flags))
        log = dirs["init256"].parent / f"{server}-{model}.log"
        servers[server, model] = stack.enter_context(running_server(command, log))
    return servers


def run(args: argparse.Namespace) -> dict[str, Any]:
    from server.engine import resolve_device

    device = str(resolve_device(args.device))
    trees = {"current": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    imports = {name: imported_files(tree) for name, tree in trees.items()}
    cells = [cell for cell in CELLS if cell[0] == "echo" or cell[0] in trees]
    runs: dict[str, list[dict]] = {cell_name(cell): [] for cell in cells}
    gate = QuietGate(args.quiet_budget)
    with tempfile.TemporaryDirectory(prefix="lstm-message-cost-") as tmp, ExitStack() as stack:
        dirs = {key: prepare_model(key, Path(tmp)) for key in ("bundled", "init256")}
        gate.wait()
        bare = time_bare_model(dirs["init256"], device)
        servers = start_servers(stack, cells, trees, dirs, device)
        pids = [pid for _, pid in servers.values()]
        for trial in range(args.trials):
            for server, model, steps in cells:
                print(f"trial {trial + 1}/{args.trials}, {cell_name((server, model, steps))}")
                gate.wait(pids)
                target, pid = servers[server, model]
                packed = args.packed and server != "echo"
                result = measure(target, pid, steps, args.duration, args.warmup, packed)
                runs[cell_name((server, model, steps))].append(asyncio.run(result))
    medians = {
        name: {metric: statistics.median(t[metric] for t in trials) for metric in trials[0]}
        for name, trials in runs.items()
    }
    command = " ".join(["python -m bench.message_cost", *sys.argv[1:]])
    settings = {key: vars(args)[key] for key in ("trials", "duration", "warmup", "packed")}
    return {
        "machine": {**machine_info(), "command": command},
        "settings": {**settings, "sessions": SESSIONS, "device": device},
        "trees": {n: {"path": str(t), "imports": imports[n]} for n, t in trees.items()},
        "bare_compute": bare,
        "runs": runs,
        "medians": medians,
        "targets": targets(medians, bare, list(trees)),
        "noisy": [n for n, r in runs.items() if any(t["other_cpu_cores"] > BUSY_CORES for t in r)],
    }


def cell_name(cell: tuple[str, str, int]) -> str:
    server, model, steps = cell
    return f"{server} {model} {SESSIONS}x{steps}"


def targets(medians: dict, bare: dict, trees: list[str]) -> list[dict]:
    rows = []
    for what, (model, steps), metric, against, limit, at_most in TARGETS:
        reference = bare if against == "bare" else medians[cell_name(("echo", model, steps))]
        name = f"{what}, {model} {SESSIONS}x{steps}"
        row: dict[str, Any] = {"target": name, "limit": limit, "at_most": at_most}
        for tree in trees:
            ratio = medians[cell_name((tree, model, steps))][metric] / reference[metric]
            row[tree] = {"ratio": ratio, "met": ratio <= limit if at_most else ratio >= limit}
        rows.append(row)
    return rows


def render(doc: dict) -> str:
    m, s, bare, trees = doc["machine"], doc["settings"], doc["bare_compute"], list(doc["trees"])
    base = "baseline" in trees
    inputs = "packed (to the echo: floats)" if s["packed"] else "floats"
    lines = [
        "# What a message costs the server (issue 29)",
        "",
        f"`{m['command']}`, {m['date']}, on {m['cpu']} ({m['cores']} cores), torch {m['torch']},"
        f" grpcio {m['grpcio']}, device {s['device']}: {s['sessions']} closed-loop StreamSteps "
        f"sessions, inputs as {inputs}, {s['trials']} alternating trials of {s['duration']:g} "
        f"s after {s['warmup']:g} s of warm-up; medians. Bare compute, init256 64 x 32: "
        f"{bare['timesteps_per_s']:,.0f} timesteps/s at {bare['torch_threads']} torch threads.",
        "",
        "| server | model | load | timesteps/s | p50 ms | p99 ms | server CPU µs/msg |"
        + (" ts/s / baseline's | CPU/msg / baseline's |" if base else ""),
        "| --- | --- | --- |" + " ---: |" * (4 + 2 * base),
    ]
    for name, med in doc["medians"].items():
        server, model, load = name.split()
        row = f"| {server} | {model} | {load} | {med['timesteps_per_s']:,.0f} | "
        row += f"{med['p50_ms']:.2f} | {med['p99_ms']:.2f} | {med['cpu_us_per_msg']:.0f} |"
        if base and server == "current":
            was = doc["medians"][name.replace("current", "baseline", 1)]
            row += f" {med['timesteps_per_s'] / was['timesteps_per_s']:.2f} |"
            row += f" {med['cpu_us_per_msg'] / was['cpu_us_per_msg']:.2f} |"
        lines.append(row + (" | |" if base and server != "current" else ""))
    lines += [
        "",
        f"| target | limit | {' | '.join(trees)} |",
        "| --- | ---: |" + " ---: |" * len(trees),
    ]
    for t in doc["targets"]:
        cells = [f"{t[n]['ratio']:.2f} {'met' if t[n]['met'] else 'NOT met'}" for n in trees]
        limit = f"{'≤' if t['at_most'] else '≥'} {t['limit']}"
        lines.append(f"| {t['target']} | {limit} | {' | '.join(cells)} |")
    paths = [
        f"{n} {t['path']} (imports {', '.join(t['imports'])})" for n, t in doc["trees"].items()
    ]
    lines += ["", "Trees: " + "; ".join(paths) + "."]
    if doc["noisy"]:
        lines += ["", f"Other processes used > {BUSY_CORES} cores in: {', '.join(doc['noisy'])}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.message_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--baseline", type=Path, help="another checkout, measured beside this one")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per cell")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per cell")
    parser.add_argument("--packed", action="store_true", help="packed inputs to lstm-serve")
    parser.add_argument("--device", default="auto", help="lstm-serve --device (default auto)")
    parser.add_argument("--quiet-budget", type=float, default=120.0, help="most s spent waiting")
    parser.add_argument("--out-dir", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    doc = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "message_cost.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out_dir / "message_cost.md").write_text(render(doc))
    print(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
