"""bench/message_cost.py's reports: docs/message_cost.md (the default cells, against the echo
and bare compute) and docs/message_cost_more.md (--more: StreamBatches and durable cells, this
tree against the baseline and durable against shipped), rendered from the JSON alone."""

from __future__ import annotations

from typing import Any

from bench.cpu_meter import BUSY_CORES

# what the --more ratios compare, and their headings
METRICS = {
    "timesteps_per_s": "timesteps/s",
    "p99_ms": "p99",
    "cpu_us_per_timestep": "server CPU/timestep",
}


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
    return "\n".join(lines + footer(doc)) + "\n"


def more_ratios(medians: dict[str, dict[str, float]]) -> dict[str, dict[str, dict[str, float]]]:
    """Each current cell over the baseline's, and each durable cell over the same tree's shipped
    one (also with Redis's CPU added to the server's)."""

    def over(name: str, other: str) -> dict[str, float]:
        return {m: medians[name][m] / medians[other][m] for m in METRICS}

    ratios: dict[str, dict[str, dict[str, float]]] = {
        "current_to_baseline": {},
        "durable_to_shipped": {},
    }
    for name, med in medians.items():
        server, model, load = name.split()
        tree, _, store = server.partition("-")
        was = name.replace("current", "baseline", 1)
        if tree == "current" and was in medians:
            ratios["current_to_baseline"][f"{store or 'shipped'} {model} {load}"] = over(name, was)
        shipped = name.replace("-durable", "", 1)
        if store and shipped in medians:
            row = over(name, shipped)
            with_store = med["cpu_us_per_timestep"] + med["store_cpu_us_per_timestep"]
            row["cpu_with_store"] = with_store / medians[shipped]["cpu_us_per_timestep"]
            ratios["durable_to_shipped"][f"{tree} {model} {load}"] = row
    return ratios


def load_label(load: str) -> str:
    if "w" in load:
        sessions, chunks_window = load.split("x")
        chunks, window = chunks_window.split("w")
        return f"StreamBatches {int(sessions):,} x {int(chunks):,} 1-step chunks, window {window}"
    sessions, steps = load.split("x")
    return f"StreamSteps {sessions} x {steps}-step"


def render_more(doc: dict[str, Any]) -> str:
    m, s = doc["machine"], doc["settings"]
    lines = [
        "# StreamBatches and durable sessions, this tree against the baseline (issue 29)",
        "",
        f"`{m['command']}`, {m['date']}, on {m['cpu']} ({m['cores']} cores), torch {m['torch']},"
        f" grpcio {m['grpcio']}, device {s['device']}: lstm-serve (init256: 32 in, 256 hidden x 2"
        " layers, 8 out) shipped and durable (`--state-store`, a loopback redis-server each), "
        f"every server up at once, {s['trials']} alternating trials of {s['duration']:g} s after "
        f"{s['warmup']:g} s of warm-up; medians. StreamSteps inputs are repeated floats, "
        "StreamBatches' packed. CPU per timestep: the server's (lstm-serve), and its Redis's.",
        "",
        "| tree | store | model | load | timesteps/s | each trial | p50 ms | p99 ms "
        "| server CPU µs/timestep | Redis CPU µs/timestep |",
        "| --- | --- | --- | --- |" + " ---: |" * 6,
    ]
    for name, med in doc["medians"].items():
        server, model, load = name.split()
        tree, _, store = server.partition("-")
        each = ", ".join(f"{t['timesteps_per_s']:,.0f}" for t in doc["runs"][name])
        redis = f"{med['store_cpu_us_per_timestep']:.2f}" if store else ""
        lines.append(
            f"| {tree} | {store or 'shipped'} | {model} | {load_label(load)} "
            f"| {med['timesteps_per_s']:,.0f} | {each} | {med['p50_ms']:.2f} | {med['p99_ms']:.2f} "
            f"| {med['cpu_us_per_timestep']:.2f} | {redis} |"
        )
    for key, title, extra in (
        ("current_to_baseline", "this tree / the baseline", ""),
        ("durable_to_shipped", "durable / shipped, each tree", " server+Redis CPU/timestep |"),
    ):
        if not doc["ratios"][key]:
            continue
        lines += ["", f"| {title} |" + "".join(f" {h} |" for h in METRICS.values()) + extra]
        lines.append("| --- |" + " ---: |" * (len(METRICS) + bool(extra)))
        for cell, row in doc["ratios"][key].items():
            first, model, load = cell.split()
            values = "".join(f" {row[metric]:.2f} |" for metric in METRICS)
            with_store = f" {row['cpu_with_store']:.2f} |" if extra else ""
            lines.append(f"| {first} {model} {load_label(load)} |{values}{with_store}")
    return "\n".join(lines + footer(doc)) + "\n"


def footer(doc: dict) -> list[str]:
    """Which files each tree ran, and the cells other processes disturbed."""
    paths = [
        f"{n} {t['path']} (imports {', '.join(t['imports'])})" for n, t in doc["trees"].items()
    ]
    lines = ["", "Trees: " + "; ".join(paths) + "."]
    if doc["noisy"]:
        lines += ["", f"Other processes used > {BUSY_CORES} cores in: {', '.join(doc['noisy'])}."]
    return lines
