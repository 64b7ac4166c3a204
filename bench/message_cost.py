"""What a message costs lstm-serve (issue 29): per-message server CPU, throughput and latency
against the bare gRPC echo and the model's own compute, for this tree and an older one.

    python -m bench.message_cost --out-dir docs                      # docs/message_cost.{json,md}
    python -m bench.message_cost --baseline /tmp/before --out-dir docs
    python -m bench.message_cost --more --baseline /tmp/before --out-dir docs  # message_cost_more.*

Servers, all up at once: the echo (bench/echo_server.py, one per model shape) and lstm-serve
(defaults) with the bundled model and with init256, from this tree and, with --baseline, from
another checkout (`git worktree add --detach /tmp/before COMMIT`), run from that tree's own
source (cwd and PYTHONPATH; the JSON records which files were imported). Cells: 64 closed-loop
StreamSteps sessions, 1-step messages (and 32-step for init256), alternating over the servers,
`--trials` times; medians. Inputs are repeated floats, the echo's only form (`--packed`: packed
bytes to lstm-serve, floats still to the echo). Server CPU is read from /proc over a window of the
same length as the load generator's, after its warm-up.

--more measures, instead, whether StreamBatches and durable sessions kept their figures: for
each tree, lstm-serve (init256) shipped and durable (`--state-store`, a redis-server of its own on
loopback), each fed 64 x 1-step StreamSteps and StreamBatches of 1,024 sessions x 1,024 1-step
chunks a message, window 4 (as bench/batches.py and bench/store.py); timesteps/s, p99, server
(and Redis) CPU per timestep, this tree / the baseline and durable / shipped, in
docs/message_cost_more.{json,md}. `make bench-path BASELINE=/tmp/before` runs the default cells
only; for --more run the module as above.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Coroutine
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.bare_compute import time_bare_model
from bench.cpu_meter import BUSY_CORES, CpuMeter, QuietGate
from bench.measure import machine_info
from bench.message_cost_report import more_ratios, render, render_more
from bench.process import lstm_serve, redis_server, running_server
from bench.variants import model_summary, prepare_model, server_command
from lstm_stream.client.batch_loadgen import run_batch_load
from lstm_stream.client.loadgen import LoadResult, format_result, run_load

ROOT = Path(__file__).resolve().parents[1]
SESSIONS = 64
BATCHES = "1024x1024w4"  # StreamBatches: 1,024 sessions, 1,024 1-step chunks a message, window 4
TREES = ("current", "baseline")
# (server, model, load): the server is "echo" or a tree's name ("-durable": on a Redis store);
# the load is SESSIONSxSTEPS of StreamSteps, or BATCHES
CELLS = [("echo", "bundled", "64x1"), ("echo", "init256", "64x1")] + [
    (tree, model, load)
    for tree in TREES
    for model, load in (("bundled", "64x1"), ("init256", "64x1"), ("init256", "64x32"))
]
MORE_CELLS = [
    (tree + store, "init256", load)
    for load in ("64x1", BATCHES)
    for store in ("", "-durable")
    for tree in TREES
]
# (name, tree's cell, metric, echo's or bare compute's cell, limit, at most)
TARGETS = [
    ("server CPU per message / echo's", ("bundled", "64x1"), "cpu_us_per_msg", "echo", 1.3, True),
    ("timesteps/s / echo's", ("init256", "64x1"), "timesteps_per_s", "echo", 0.7, False),
    ("p99 latency / echo's", ("init256", "64x1"), "p99_ms", "echo", 2.0, True),
    ("timesteps/s / bare compute's", ("init256", "64x32"), "timesteps_per_s", "bare", 0.6, False),
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


def start_load(
    load: str, target: str, duration_s: float, warmup_s: float, packed: bool
) -> Coroutine[Any, Any, LoadResult]:
    if load == BATCHES:
        return run_batch_load(target, 1024, 1024, 1, duration_s, window=4, warmup_s=warmup_s)
    sessions, steps = (int(n) for n in load.split("x"))
    return run_load(target, sessions, steps, duration_s, warmup_s, packed=packed)


async def measure(
    load: str, target: str, pids: list[int], duration_s: float, warmup_s: float, packed: bool
) -> dict:
    """One load run, and the server's CPU (pids[0]; its Redis's, pids[1:]) over `duration_s`
    after the warm-up (streams open in well under it, so that span lies in the loaded part)."""

    async def server_cpu() -> tuple[dict[str, float], float]:
        await asyncio.sleep(warmup_s)
        meter, store = CpuMeter(pids), CpuMeter(pids[1:])
        await asyncio.sleep(duration_s)
        return meter.cores(), store.cores()["server_cpu_cores"]

    run = start_load(load, target, duration_s, warmup_s, packed)
    result, (cores, store_cores) = await asyncio.gather(run, server_cpu())
    server_cores = cores["server_cpu_cores"] - store_cores
    print(f"  {format_result(result)}; server {server_cores:.2f} cores", flush=True)
    if result.errors:
        raise RuntimeError(f"{target}: {result.errors} errors: {result.error_sample}")
    messages_per_s = result.messages / result.duration_s
    return {
        "timesteps_per_s": result.timesteps_per_s,
        "messages_per_s": messages_per_s,
        "p50_ms": result.latency_p50_s * 1e3,
        "p99_ms": result.latency_p99_s * 1e3,
        "cpu_us_per_msg": server_cores / messages_per_s * 1e6,
        "cpu_us_per_timestep": server_cores / result.timesteps_per_s * 1e6,
        "store_cpu_us_per_timestep": store_cores / result.timesteps_per_s * 1e6,
        "server_cpu_cores": server_cores,
        "store_cpu_cores": store_cores,
        "other_cpu_cores": cores["other_cpu_cores"],
    }


def start_servers(
    stack: ExitStack, cells: list, trees: dict, dirs: dict, device: str
) -> dict[tuple[str, str], tuple[str, list[int]]]:
    """Every server the cells name, all up at once: {(server, model): (target, pids)}, the
    server's pid first, then its Redis's (a redis-server each, so no two share keys)."""
    servers: dict[tuple[str, str], tuple[str, list[int]]] = {}
    for server, model in dict.fromkeys((server, model) for server, model, _ in cells):
        store_pids: list[int] = []
        if server == "echo":
            summary = model_summary(model, dirs[model])
            command = in_tree(ROOT, server_command("echo", summary, None, device))
        else:
            tree, _, store = server.partition("-")
            flags = ["--metrics-port", "0", "--max-sessions", "4096", "--device", device]
            flags += ["--model", str(dirs[model])] if dirs[model] else []
            if store:
                url, store_pid = stack.enter_context(redis_server())
                flags, store_pids = [*flags, "--state-store", url], [store_pid]
            command = in_tree(trees[tree], lstm_serve(*flags))
        log = dirs["init256"].parent / f"{server}-{model}.log"
        target, pid = stack.enter_context(running_server(command, log))
        servers[server, model] = (target, [pid, *store_pids])
    return servers


def run(args: argparse.Namespace) -> dict[str, Any]:
    from server.engine import resolve_device

    device = str(resolve_device(args.device))
    trees = {"current": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    imports = {name: imported_files(tree) for name, tree in trees.items()}
    every = MORE_CELLS if args.more else CELLS
    cells = [cell for cell in every if cell[0] == "echo" or cell[0].split("-")[0] in trees]
    runs: dict[str, list[dict]] = {cell_name(cell): [] for cell in cells}
    gate = QuietGate(args.quiet_budget)
    with tempfile.TemporaryDirectory(prefix="lstm-message-cost-") as tmp, ExitStack() as stack:
        dirs = {key: prepare_model(key, Path(tmp)) for key in ("bundled", "init256")}
        gate.wait()
        bare = None if args.more else time_bare_model(dirs["init256"], device)
        servers = start_servers(stack, cells, trees, dirs, device)
        every_pid = [pid for _, pids in servers.values() for pid in pids]
        for trial in range(args.trials):
            for server, model, load in cells:
                print(f"trial {trial + 1}/{args.trials}, {cell_name((server, model, load))}")
                gate.wait(every_pid)
                target, pids = servers[server, model]
                packed = args.packed and server != "echo"
                result = measure(load, target, pids, args.duration, args.warmup, packed)
                runs[cell_name((server, model, load))].append(asyncio.run(result))
    medians = {
        name: {metric: statistics.median(t[metric] for t in trials) for metric in trials[0]}
        for name, trials in runs.items()
    }
    command = " ".join(["python -m bench.message_cost", *sys.argv[1:]])
    settings = {key: vars(args)[key] for key in ("trials", "duration", "warmup", "packed")}
    doc: dict[str, Any] = {
        "machine": {**machine_info(), "command": command},
        "settings": {**settings, "sessions": SESSIONS, "device": device},
        "trees": {n: {"path": str(t), "imports": imports[n]} for n, t in trees.items()},
        "runs": runs,
        "medians": medians,
        "noisy": [n for n, r in runs.items() if any(t["other_cpu_cores"] > BUSY_CORES for t in r)],
    }
    if args.more:
        return {**doc, "ratios": more_ratios(medians)}
    return {**doc, "bare_compute": bare, "targets": targets(medians, bare, list(trees))}


def cell_name(cell: tuple[str, str, str]) -> str:
    return " ".join(cell)


def targets(medians: dict, bare: dict, trees: list[str]) -> list[dict]:
    rows = []
    for what, (model, load), metric, against, limit, at_most in TARGETS:
        reference = bare if against == "bare" else medians[cell_name(("echo", model, load))]
        name = f"{what}, {model} {load}"
        row: dict[str, Any] = {"target": name, "limit": limit, "at_most": at_most}
        for tree in trees:
            ratio = medians[cell_name((tree, model, load))][metric] / reference[metric]
            row[tree] = {"ratio": ratio, "met": ratio <= limit if at_most else ratio >= limit}
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.message_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--baseline", type=Path, help="another checkout, measured beside this one")
    parser.add_argument("--more", action="store_true", help="StreamBatches and durable cells")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per cell")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per cell")
    parser.add_argument("--packed", action="store_true", help="packed inputs to lstm-serve")
    parser.add_argument("--device", default="auto", help="lstm-serve --device (default auto)")
    parser.add_argument("--quiet-budget", type=float, default=120.0, help="most s spent waiting")
    parser.add_argument("--out-dir", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    doc = run(args)
    stem, text = (
        ("message_cost_more", render_more(doc)) if args.more else ("message_cost", render(doc))
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out_dir / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
