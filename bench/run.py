"""The benchmark harness (issue 7): lstm-serve as shipped, with durable sessions (a Redis state
store), without cross-session batching, and a bare gRPC echo, measured in one run by the same
load generator, plus the model's own compute rate.

    python -m bench.run                 # the full grid, into docs/
    python -m bench.run --quick         # a small grid (the smoke test's)
    python -m bench.run --render-only   # re-render docs/benchmarks.md and the plot from the JSON

It writes <out-dir>/benchmarks.json (every row and the machine), <out-dir>/benchmarks.md and
<out-dir>/img/benchmarks.png. The markdown and the plot are rendered from the JSON alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.process import redis_server, running_server
from client.loadgen import LoadResult, format_result, run_load

VARIANTS = ("shipped", "durable", "durable-eager", "unbatched", "echo")
TABLE_VARIANTS = ("shipped", "unbatched", "echo")  # the main tables; the durable ones have theirs
DURABLE_VARIANTS = ("durable", "durable-eager")
MODELS = ("init256", "bundled")
COMPUTE_BATCH, COMPUTE_STEPS = 64, 32  # the bare-model forward: (64, 32, input_size)
INIT256 = {"input_size": 32, "hidden_size": 256, "num_layers": 2, "output_size": 8}
Row = dict[str, Any]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BUSY_CORES = 0.2  # other processes using more than this during a cell: the cell is flagged


# The run


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


def console_script(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def prepare_model(key: str, workdir: Path) -> Path | None:
    """The model directory to serve: a fresh `lstm-model init` for init256, None for bundled."""
    if key == "bundled":
        return None
    out = workdir / key
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in INIT256.items()]
    subprocess.run(
        [console_script("lstm-model"), "init", *flags, "--seed", "0", "--out", str(out)],
        check=True,
        capture_output=True,
    )
    return out


def model_summary(key: str, model_dir: Path | None) -> dict[str, Any]:
    from lstm_model import BUNDLED_MODEL_DIR, LSTMConfig

    config = LSTMConfig.load(Path(model_dir or BUNDLED_MODEL_DIR) / "config.json")
    return {
        "key": key,
        "name": config.name,
        "input_size": config.input_size,
        "hidden_size": config.hidden_size,
        "num_layers": config.num_layers,
        "output_size": config.output_size,
    }


def time_bare_model(model_dir: Path | None, device: str, repeats: int = 30) -> dict[str, Any]:
    """Median wall time of SequenceModel's forward on a (64, 32, input) batch with state, at the
    torch thread count lstm-serve uses by default; in timesteps per second."""
    import torch

    from lstm_model import BUNDLED_MODEL_DIR, load_model
    from server.engine import default_torch_threads

    threads = default_torch_threads()
    torch.set_num_threads(threads)
    model = load_model(model_dir or BUNDLED_MODEL_DIR, device=device).model
    x = torch.randn(COMPUTE_BATCH, COMPUTE_STEPS, model.config.input_size, device=device)
    state = model.init_state(COMPUTE_BATCH)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    times = []
    with torch.inference_mode():
        for i in range(repeats + 3):  # the first 3 warm up
            sync()
            start = time.perf_counter()
            model(x, state)
            sync()
            if i >= 3:
                times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "batch": COMPUTE_BATCH,
        "steps": COMPUTE_STEPS,
        "torch_threads": threads,
        "device": device,
        "repeats": repeats,
        "median_s": median,
        "timesteps_per_s": COMPUTE_BATCH * COMPUTE_STEPS / median,
    }


def server_command(
    variant: str,
    model: dict[str, Any],
    model_dir: Path | None,
    device: str,
    store_url: str = "",
) -> list[str]:
    listen = ["--host", "127.0.0.1", "--port", "0"]
    if variant == "echo":
        sizes = [f"--input-size={model['input_size']}", f"--output-size={model['output_size']}"]
        return [sys.executable, "-m", "bench.echo_server", *listen, *sizes]
    command = [console_script("lstm-serve"), *listen, "--metrics-port", "0"]
    command += ["--max-sessions", "4096", "--device", device]
    if model_dir is not None:
        command += ["--model", str(model_dir)]
    if variant == "unbatched":
        command += ["--max-batch-size", "1"]
    if variant in DURABLE_VARIANTS:
        command += ["--state-store", store_url]
    if variant == "durable-eager":
        command += ["--state-store-interval-ms", "0"]
    return command


def _machine_busy_s() -> float:
    """CPU seconds all cores have spent busy (steal included), from /proc/stat; 0 elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    except OSError:
        return 0.0
    ticks = [int(v) for v in fields]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS


def _process_cpu_s(pid: int) -> float:
    """CPU seconds a process has used, all its threads, from /proc/<pid>/stat; 0 elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


class CpuMeter:
    """CPU used since the meter started, in cores: by the server, by this process (the load
    generator) and by every other process on the machine."""

    def __init__(self, server_pids: Sequence[int] = ()) -> None:
        self.server_pids = server_pids  # the server, and its Redis for the durable variant
        self._start = self._read()

    def _read(self) -> tuple[float, float, float, float]:
        server = sum(_process_cpu_s(pid) for pid in self.server_pids)
        return time.perf_counter(), _machine_busy_s(), server, _process_cpu_s(os.getpid())

    def cores(self) -> dict[str, float]:
        wall, busy, server, ours = (b - a for a, b in zip(self._start, self._read(), strict=True))
        return {
            "server_cpu_cores": server / wall,
            "loadgen_cpu_cores": ours / wall,
            "other_cpu_cores": max(0.0, busy - server - ours) / wall,
        }


@dataclass
class QuietGate:
    """Waits, in 1 s samples, until other processes use under half of BUSY_CORES; spends at
    most budget_s over the whole run, then lets every cell through."""

    budget_s: float

    def wait(self, server_pids: Sequence[int] = ()) -> None:
        while self.budget_s > 0:
            meter = CpuMeter(server_pids)
            time.sleep(1.0)
            self.budget_s -= 1.0
            if meter.cores()["other_cpu_cores"] < BUSY_CORES / 2:
                return


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
    from server.engine import resolve_device

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
            models.append(model)
            for variant in grid.variants:
                rows += measure_variant(grid, gate, model, model_dir, variant, workdir)
    return {"machine": machine_info(), "grid": asdict(grid), "models": models, "rows": rows}


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
        "server_torch_threads": default_torch_threads(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "bench.run", *sys.argv[1:]]),
    }


# Rendering: everything below reads the JSON document only.


def find_row(rows: list[Row], model: str, variant: str, sessions: int, chunk: int) -> Row | None:
    for row in rows:
        key = (row["model"], row["variant"], row["sessions"], row["chunk_steps"])
        if key == (model, variant, sessions, chunk):
            return row
    return None


def _rate(row: Row | None) -> str:
    return f"{row['timesteps_per_s']:,.0f}" if row else "—"


def _ratio(top: Row | None, bottom: Row | None) -> str:
    if not top or not bottom or not bottom["timesteps_per_s"]:
        return "—"
    return f"{top['timesteps_per_s'] / bottom['timesteps_per_s']:.2f}"


def _latency(row: Row | None) -> str:
    if not row:
        return "—"
    text = f"{row['latency_p50_s'] * 1e3:.2f} / {row['latency_p99_s'] * 1e3:.2f}"
    return f"{text} ({row['errors']} errors)" if row["errors"] else text


def describe_model(model: dict[str, Any]) -> str:
    return (
        f"`{model['key']}` ({model['name']}: input {model['input_size']}, hidden "
        f"{model['hidden_size']} × {model['num_layers']} layers, output {model['output_size']})"
    )


def results_table(doc: dict[str, Any], model: str, chunk: int) -> list[str]:
    """One row per sessions value: throughput per variant, the ratios, and latency."""
    rows, variants = doc["rows"], TABLE_VARIANTS
    header = ["sessions", *(f"{v} ts/s" for v in variants), "shipped/echo", "shipped/unbatched"]
    header += [f"{v} p50 / p99 ms" for v in variants]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for sessions in doc["grid"]["sessions"]:
        found = {v: find_row(rows, model, v, sessions, chunk) for v in variants}
        cells = [str(sessions), *(_rate(found[v]) for v in variants)]
        cells += [
            _ratio(found["shipped"], found["echo"]),
            _ratio(found["shipped"], found["unbatched"]),
        ]
        cells += [_latency(found[v]) for v in variants]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def durability_table(doc: dict[str, Any], model: str, chunk: int) -> list[str]:
    """What the state store costs: the durable server against the shipped one, same run."""
    rows, variants = doc["rows"], ("shipped", *DURABLE_VARIANTS)
    header = ["sessions", *(f"{v} ts/s" for v in variants)]
    header += [f"{v} / shipped" for v in DURABLE_VARIANTS]
    header += [f"{v} p50 / p99 ms" for v in variants]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for sessions in doc["grid"]["sessions"]:
        found = {v: find_row(rows, model, v, sessions, chunk) for v in variants}
        cells = [str(sessions), *(_rate(found[v]) for v in variants)]
        cells += [_ratio(found[v], found["shipped"]) for v in DURABLE_VARIANTS]
        cells += [_latency(found[v]) for v in variants]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def compute_table(doc: dict[str, Any]) -> list[str]:
    """The bare model's forward rate, and how much of it lstm-serve delivers at 64 × 32."""
    lines = [
        "| model | torch threads | 64 × 32 forward, median | bare model ts/s "
        "| shipped, 64 sessions × 32 steps, ts/s | shipped / bare |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for model in doc["models"]:
        bare = model["bare_compute"]
        shipped = find_row(doc["rows"], model["key"], "shipped", COMPUTE_BATCH, COMPUTE_STEPS)
        ratio = f"{shipped['timesteps_per_s'] / bare['timesteps_per_s']:.2f}" if shipped else "—"
        lines.append(
            f"| `{model['key']}` | {bare['torch_threads']} | {bare['median_s'] * 1e3:.2f} ms "
            f"| {bare['timesteps_per_s']:,.0f} | {_rate(shipped)} | {ratio} |"
        )
    return lines


def machine_lines(doc: dict[str, Any]) -> list[str]:
    m, grid = doc["machine"], doc["grid"]
    return [
        f"- CPU: {m['cpu']}, {m['cores']} cores ({m['platform']})",
        f"- Python {m['python']}, torch {m['torch']}, grpcio {m['grpcio']}, "
        f"protobuf {m['protobuf']}, numpy {m['numpy']}",
        f"- lstm-serve on `{grid['device']}` with {m['server_torch_threads']} torch thread(s) "
        "(its default: cores minus one); the load generator runs on the same machine",
        f"- {grid['duration_s']:g} s measured per cell after {grid['warmup_s']:g} s of warm-up",
        background_line(doc["rows"]),
        f"- run {m['date']}: `{m['command']}`",
    ]


def background_line(rows: list[Row]) -> str:
    """How much CPU other processes took while the cells ran (rows from before it was kept
    have none)."""
    loads = [r["other_cpu_cores"] for r in rows if "other_cpu_cores" in r]
    if not loads:
        return "- CPU used by other processes during the run: not recorded"
    busy = [r for r in rows if r.get("other_cpu_cores", 0) > BUSY_CORES]
    line = (
        f"- CPU used by other processes during the cells: mean {statistics.mean(loads):.2f}, "
        f"max {max(loads):.2f} cores"
    )
    if not busy:
        return line + " (a quiet machine)"
    named = ", ".join(
        f"{r['model']} {r['variant']} {r['sessions']}×{r['chunk_steps']}" for r in busy
    )
    return line + f"; **disturbed cells** (over {BUSY_CORES} cores): {named}"


def render_markdown(doc: dict[str, Any], plot_name: str = "img/benchmarks.png") -> str:
    out = [
        "# Benchmarks",
        "",
        "Throughput and per-message latency of `StreamSteps` for 1 to 256 concurrent sessions,",
        "each a closed loop (send a message, wait for its answer, repeat), measured in one run by",
        "one load generator (`client/loadgen.py`) against four servers: **shipped** (`lstm-serve`",
        "as it ships, batching across sessions), **durable** (the same with a Redis state store;",
        "its own section below), **unbatched** (`lstm-serve --max-batch-size 1`) and **echo**",
        "(`bench/echo_server.py`: the same messages over grpc.aio with no model, the transport's",
        "ceiling on this machine). ts/s is timesteps per second over all sessions; latency is",
        "write-to-answer per message, as the client sees it.",
        "",
        "## Reproduce",
        "",
        "```sh",
        "make bench                                    # .venv/bin/python -m bench.run",
        ".venv/bin/python -m bench.run --render-only   # re-render this page from benchmarks.json",
        "```",
        "",
        "## Machine",
        "",
        *machine_lines(doc),
        "",
        "## The model's own compute rate",
        "",
        "`SequenceModel.forward` of a 64 × 32 batch (with state, `torch.inference_mode`), timed in",
        "the same run, with lstm-serve's torch thread count.",
        "",
        *compute_table(doc),
        "",
        "## Results",
        "",
        f"![timesteps/s against concurrent sessions]({plot_name})",
    ]
    for model in doc["models"]:
        for chunk in doc["grid"]["chunks"]:
            out += ["", f"### {describe_model(model)}, {chunk}-step messages", ""]
            out += results_table(doc, model["key"], chunk)
    if any(row["variant"] in DURABLE_VARIANTS for row in doc["rows"]):
        out += ["", *DURABILITY_INTRO]
        for model in doc["models"]:
            for chunk in doc["grid"]["chunks"]:
                out += ["", f"### {describe_model(model)}, {chunk}-step messages", ""]
                out += durability_table(doc, model["key"], chunk)
    return "\n".join(out) + "\n"


DURABILITY_INTRO = [
    "## The cost of durable sessions",
    "",
    "**durable** is `lstm-serve --state-store redis://…` against a redis-server on the same",
    "machine (no persistence), as it ships: the changed sessions' state is written behind to",
    "Redis in one call (one round trip), then the writer waits `--state-store-interval-ms` (100)",
    "so the next write gathers the batches run meanwhile. **durable-eager** sets the interval to",
    "0: a write after every batch, as soon as the previous one is done. Redis's CPU counts as",
    "the server's. The target is at most 15% less throughput than **shipped** at 64 sessions.",
]


def render_plot(doc: dict[str, Any], path: Path) -> None:
    """Timesteps/s against sessions, a line per variant; a panel per model and chunk size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, chunks = doc["models"], doc["grid"]["chunks"]
    fig, axes = plt.subplots(
        len(models), len(chunks), figsize=(5 * len(chunks), 3.8 * len(models)), squeeze=False
    )
    for ax_row, model in zip(axes, models, strict=True):
        for ax, chunk in zip(ax_row, chunks, strict=True):
            _plot_panel(ax, doc, model, chunk)
    fig.suptitle(f"lstm-stream StreamSteps on {doc['machine']['cpu']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_panel(ax: Any, doc: dict[str, Any], model: dict[str, Any], chunk: int) -> None:
    for variant in VARIANTS:
        points = [
            (row["sessions"], row["timesteps_per_s"])
            for s in doc["grid"]["sessions"]
            if (row := find_row(doc["rows"], model["key"], variant, s, chunk))
        ]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=variant)
    if chunk == COMPUTE_STEPS:
        bare = model["bare_compute"]["timesteps_per_s"]
        ax.axhline(bare, color="grey", linestyle="--", label="bare model, 64 × 32 forward")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(doc["grid"]["sessions"], [str(s) for s in doc["grid"]["sessions"]])
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("timesteps/s")
    ax.set_title(f"{model['key']} (hidden {model['hidden_size']}), {chunk}-step messages")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def write_outputs(doc: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "benchmarks.json").write_text(json.dumps(doc, indent=2) + "\n")
    render_outputs(doc, out_dir)


def render_outputs(doc: dict[str, Any], out_dir: Path) -> None:
    render_plot(doc, out_dir / "img" / "benchmarks.png")
    (out_dir / "benchmarks.md").write_text(render_markdown(doc))


# Command line


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def _names(choices: Sequence[str]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(v for v in text.split(",") if v)
        unknown = set(names) - set(choices)
        if unknown:
            raise argparse.ArgumentTypeError(f"expected some of {','.join(choices)}, got {text!r}")
        return names

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="sessions 1,4; 0.5 s; init256 only")
    parser.add_argument("--duration", type=float, default=None, help="seconds measured per cell")
    parser.add_argument("--warmup", type=float, default=None, help="seconds of warm-up per cell")
    parser.add_argument("--sessions", type=_ints, default=None, help="default 1,16,64,256")
    parser.add_argument("--chunks", type=_ints, default=None, help="default 1,32")
    parser.add_argument("--models", type=_names(MODELS), default=None, help="init256,bundled")
    parser.add_argument("--variants", type=_names(VARIANTS), default=VARIANTS)
    parser.add_argument("--device", default="auto", help="lstm-serve --device (default auto)")
    parser.add_argument(
        "--retries", type=int, default=None, help="reruns of a disturbed cell (default 1)"
    )
    parser.add_argument(
        "--quiet-budget",
        type=float,
        default=None,
        help="most seconds spent waiting for other processes to go quiet (default 300)",
    )
    parser.add_argument("--out-dir", type=Path, default=Path("docs"))
    parser.add_argument("--render-only", action="store_true", help="re-render from the JSON")
    return parser


def grid_from_args(args: argparse.Namespace) -> Grid:
    """--quick sets the smoke test's defaults; explicit flags still win."""
    quick = args.quick
    return Grid(
        sessions=args.sessions or ((1, 4) if quick else (1, 16, 64, 256)),
        chunks=args.chunks or (1, 32),
        models=args.models or (("init256",) if quick else MODELS),
        variants=args.variants,
        duration_s=args.duration or (0.5 if quick else 5.0),
        warmup_s=args.warmup if args.warmup is not None else (0.2 if quick else 1.0),
        device=args.device,
        retries=args.retries if args.retries is not None else (0 if quick else 1),
        quiet_budget_s=args.quiet_budget
        if args.quiet_budget is not None
        else (0 if quick else 300),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render_only:
        render_outputs(json.loads((args.out_dir / "benchmarks.json").read_text()), args.out_dir)
    else:
        started = time.monotonic()
        write_outputs(run_grid(grid_from_args(args)), args.out_dir)
        print(f"done in {time.monotonic() - started:.0f} s", file=sys.stderr)
    print(f"wrote {args.out_dir / 'benchmarks.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
