"""Running the grid: every model, every variant's server, and every cell of load against it,
with the CPU each party used and the machine it ran on."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import platform
import re
import shlex
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import engine_step, wire
from bench.bare_compute import time_bare_model
from bench.cpu_meter import BUSY_CORES, CpuMeter, QuietGate
from bench.process import redis_server, running_server
from bench.variants import DURABLE_VARIANTS, model_summary, prepare_model, server_command
from lstm_stream.client.loadgen import LoadResult, format_result, run_load

Row = dict[str, Any]


@dataclass(frozen=True)
class Grid:
    sessions: tuple[int, ...]
    chunks: tuple[int, ...]
    models: tuple[str, ...]
    variants: tuple[str, ...]
    duration_s: float
    warmup_s: float
    device: str
    retries: int = 0  # reruns of a cell that other processes disturbed
    quiet_budget_s: float = 0.0  # most seconds, over the run, spent waiting for a quiet machine
    engine_repeats: int = 200  # timed runs of Engine.step (bench/engine_step.py)


def measure_cell(
    grid: Grid, target: str, server_pids: Sequence[int], sessions: int, chunk: int
) -> tuple[LoadResult, dict[str, float]]:
    """One load run, and the CPU each party used over the whole cell."""
    meter = CpuMeter(server_pids)
    result = asyncio.run(run_load(target, sessions, chunk, grid.duration_s, grid.warmup_s))
    return result, meter.cores()


def measure_variant(
    grid: Grid,
    gate: QuietGate,
    model: dict[str, Any],
    model_dir: Path | None,
    variant: str,
    workdir: Path,
) -> list[Row]:
    """Every cell of one server (with a fresh Redis for the durable variant)."""
    with contextlib.ExitStack() as stack:
        store_url, pids = "", []
        if variant in DURABLE_VARIANTS:
            store_url, store_pid = stack.enter_context(redis_server())
            pids.append(store_pid)
        command = server_command(variant, model, model_dir, grid.device, store_url)
        log_path = workdir / f"{model['key']}-{variant}.log"
        target, pid = stack.enter_context(running_server(command, log_path))
        pids.append(pid)
        label = f"{model['key']:>8} {variant:>9}"
        rows = []
        for chunk in grid.chunks:
            for sessions in grid.sessions:
                row = measure_settled(grid, gate, target, pids, sessions, chunk, label)
                rows.append({"model": model["key"], "variant": variant, **row})
    return rows


def measure_settled(
    grid: Grid,
    gate: QuietGate,
    target: str,
    pids: Sequence[int],
    sessions: int,
    chunk: int,
    label: str,
) -> Row:
    """A cell, rerun (up to --retries times) while other processes disturb it."""
    attempts = 0
    while True:
        attempts += 1
        gate.wait(pids)
        result, cpu = measure_cell(grid, target, pids, sessions, chunk)
        disturbed = cpu["other_cpu_cores"] > BUSY_CORES
        cores = ", ".join(f"{k.removesuffix('_cpu_cores')} {v:.2f}" for k, v in cpu.items())
        flag = " [disturbed by other processes]" if disturbed else ""
        print(f"{label}: {format_result(result)}; cores: {cores}{flag}", flush=True)
        if not disturbed or attempts > grid.retries:
            return {**asdict(result), **cpu, "attempts": attempts}


def run_grid(grid: Grid) -> dict[str, Any]:
    from server.engine import resolve_device, usable_cores

    device = str(resolve_device(grid.device))
    grid = Grid(**{**asdict(grid), "device": device})
    gate = QuietGate(grid.quiet_budget_s)
    models, rows = [], []
    with tempfile.TemporaryDirectory(prefix="lstm-bench-") as tmp:
        workdir = Path(tmp)
        for key in grid.models:
            model_dir = prepare_model(key, workdir)
            model = model_summary(key, model_dir)
            gate.wait()
            meter = CpuMeter()
            model["bare_compute"] = time_bare_model(model_dir, device)
            model["bare_compute"]["other_cpu_cores"] = meter.cores()["other_cpu_cores"]
            # The yardstick: torch's own default, every core.
            model["bare_compute_default_threads"] = time_bare_model(
                model_dir, device, threads=usable_cores()
            )
            models.append(model)
            for variant in grid.variants:
                rows += measure_variant(grid, gate, model, model_dir, variant, workdir)
    gate.wait()
    engine = engine_step.run_all(grid.engine_repeats) if device == "cpu" else None
    wire_costs = wire.run_all(grid.engine_repeats * 10)
    return {
        "machine": machine_info(),
        "grid": asdict(grid),
        "models": models,
        "rows": rows,
        "engine": engine,
        "wire": wire_costs,
    }


def machine_info() -> dict[str, Any]:
    from server.engine import default_torch_threads

    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        cpu = match.group(1).strip() if match else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **{name: metadata.version(name) for name in ("torch", "grpcio", "protobuf", "numpy")},
        "server_torch_threads": default_torch_threads(),  # one-step batches; chunked: all
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "bench.run", *sys.argv[1:]]),
    }
