"""benchmarks.md, rendered from the JSON document alone: the machine, the model's own compute
rate, and a throughput and latency table per model and message size."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from bench.bare_compute import COMPUTE_BATCH, COMPUTE_STEPS
from bench.cpu_meter import BUSY_CORES
from bench.variants import DURABLE_VARIANTS, TABLE_VARIANTS

if TYPE_CHECKING:
    from bench.measure import Row


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
        shipped = find_row(doc["rows"], model["key"], "shipped", COMPUTE_BATCH, COMPUTE_STEPS)
        runs = [model["bare_compute"], model.get("bare_compute_default_threads")]
        seen = set()
        for bare in runs:
            if not bare or bare["torch_threads"] in seen:
                continue
            seen.add(bare["torch_threads"])
            ratio = (
                f"{shipped['timesteps_per_s'] / bare['timesteps_per_s']:.2f}" if shipped else "—"
            )
            lines.append(
                f"| `{model['key']}` | {bare['torch_threads']} | {bare['median_s'] * 1e3:.2f} ms "
                f"| {bare['timesteps_per_s']:,.0f} | {_rate(shipped)} | {ratio} |"
            )
    return lines


def targets_table(doc: dict[str, Any]) -> list[str]:
    """Issue 14's targets on this machine, each from this run's own rows."""
    rows, model = doc["rows"], "init256"
    one = {v: find_row(rows, model, v, 64, 1) for v in ("shipped", "echo", "unbatched")}
    chunked = find_row(rows, model, "shipped", COMPUTE_BATCH, COMPUTE_STEPS)
    bare = next((m.get("bare_compute_default_threads") for m in doc["models"]
                 if m["key"] == model), None)  # fmt: skip
    checks: list[tuple[str, float | None, float, str]] = []
    if all(one.values()):
        s, e, u = one["shipped"], one["echo"], one["unbatched"]
        checks += [
            ("64 sessions, 1-step: shipped / echo ts/s", _div(s, e), 0.7, ">="),
            ("64 sessions, 1-step: shipped / unbatched ts/s", _div(s, u), 5.0, ">="),
            ("64 sessions, 1-step: shipped p99 / echo p99",
             s["latency_p99_s"] / e["latency_p99_s"], 2.0, "<="),
        ]  # fmt: skip
    if chunked and bare:
        ratio = chunked["timesteps_per_s"] / bare["timesteps_per_s"]
        checks.append(
            (f"64 sessions, 32-step: shipped / bare 64 × 32 forward ({bare['torch_threads']} "
             "threads)", ratio, 0.6, ">="),
        )  # fmt: skip
    engine = doc.get("engine")
    if engine:
        overhead = engine["step_overhead"]
        checks.append(
            (f"`Engine.step` host work per row, {overhead['rows']:,} one-step rows (µs)",
             overhead["host_us_per_row"], 0.3, "<="),
        )  # fmt: skip
    lines = ["| target (`init256`) | measured | goal | met |", "| --- | --- | --- | --- |"]
    for name, value, goal, sense in checks:
        met = value is not None and (value >= goal if sense == ">=" else value <= goal)
        shown = "—" if value is None else f"{value:.2f}"
        lines.append(f"| {name} | {shown} | {sense} {goal:g} | {'yes' if met else '**no**'} |")
    return lines


def wire_lines(doc: dict[str, Any]) -> list[str]:
    from bench.wire import wire_table

    if not doc.get("wire"):
        return []
    return [
        "## One message's encoding",
        "",
        "`python -m bench.wire`, in the same run: the server's side of one StreamSteps message",
        "with each encoding (DESIGN 1.6), in process: parse and decode the request, set the",
        "outputs and serialise the response (medians).",
        "",
        *wire_table(doc["wire"]),
        "",
    ]


def _div(top: Row, bottom: Row) -> float | None:
    return top["timesteps_per_s"] / bottom["timesteps_per_s"] if bottom["timesteps_per_s"] else None


def engine_lines(doc: dict[str, Any]) -> list[str]:
    from bench.engine_step import kernel_table, overhead_lines

    engine = doc.get("engine")
    if not engine:
        return []
    return [
        "## The engine alone",
        "",
        "`python -m bench.engine_step`, in the same run. The host work per row is `Engine.step`'s",
        "median less the median of the same batch's compute alone (gather, one step, scatter on",
        "tensors already built). The kernels: one timestep of `nn.LSTM` (through the model)",
        "against `FusedStep` (one `addmm` per layer), median µs, zero state.",
        "",
        *overhead_lines(engine),
        "",
        *kernel_table(engine),
        "",
    ]


def machine_lines(doc: dict[str, Any]) -> list[str]:
    m, grid = doc["machine"], doc["grid"]
    return [
        f"- CPU: {m['cpu']}, {m['cores']} cores ({m['platform']})",
        f"- Python {m['python']}, torch {m['torch']}, grpcio {m['grpcio']}, "
        f"protobuf {m['protobuf']}, numpy {m['numpy']}",
        f"- lstm-serve on `{grid['device']}` with its default torch threads: "
        f"{m['server_torch_threads']} for one-step batches, every core ({m['cores']}) for "
        "chunks of 8 steps or more; the load generator runs on the same machine",
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
        "## Targets (issue 14)",
        "",
        *targets_table(doc),
        "",
        "## The model's own compute rate",
        "",
        "`SequenceModel.forward` of a 64 × 32 batch (with state, `torch.inference_mode`), timed in",
        "the same run: at the thread count lstm-serve gives such a batch, and at torch's default",
        "(every core) when that differs.",
        "",
        *compute_table(doc),
        "",
        *engine_lines(doc),
        *wire_lines(doc),
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
