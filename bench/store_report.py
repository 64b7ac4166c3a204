"""bench/store.py's report: the targets said cell by cell, and the markdown."""

from __future__ import annotations

from typing import Any

from bench.cpu_meter import BUSY_CORES
from bench.store_parts import (
    HIDDEN,
    INPUTS,
    LAYERS,
    MAX_CHUNKS,
    OUTPUTS,
    RECORD_BUDGET,
    RECORD_SAMPLE,
    SAMPLE_EVERY_S,
    SPARE_SESSIONS,
    STATE_BYTES,
)

# The report


def checks(cells: list[dict[str, Any]]) -> str:
    """The targets, cell by cell: said, not asserted."""

    def verdict(ok: list[bool]) -> str:
        return "yes, every cell" if all(ok) else f"NO in {ok.count(False)} of {len(ok)} cells"

    records = verdict([c["record_within_budget"] for c in cells])
    # Bounded: not growing over the window beyond what one message stages at once.
    pending = verdict(
        [
            c["pending_max_second_half"] <= max(c["pending_max_first_half"], MAX_CHUNKS)
            for c in cells
        ]
    )
    continued = verdict([c["recovery"]["failed"] == 0 for c in cells])
    back = max(c["recovery"]["resent_steps_max"] for c in cells)
    return (
        f"Every record within {RECORD_BUDGET:,} B: {records}. Pending in the window's second "
        f"half at most its first half's or one message's sessions ({MAX_CHUNKS:,}): {pending}. "
        f"Every session continued: {continued}; a resend went back at most {back} timesteps."
    )


def render(result: dict[str, Any]) -> str:
    machine, mib = result["machine"], 2**20
    lines = [
        "# Durable sessions at scale: the state store at 1,000 to 100,000 live sessions",
        "",
        f"Machine: {machine['node']} ({machine['cpu']}, {machine['cores']} cores), "
        f"redis-server {machine['redis']}; {machine['date']}; lstm-stream {machine['commit']}. "
        f"Command: `{machine['command']}` (bench/store.py).",
        "",
        f"Each cell: a fresh store and one `lstm-serve --state-store URL --torch-threads 1 "
        f"--max-sessions N+{SPARE_SESSIONS}` (input {INPUTS}, hidden {HIDDEN} x {LAYERS} layers, "
        f"output {OUTPUTS}; --state-store-interval-ms and --replay-steps at their defaults) "
        f"holding N sessions, fed through StreamBatches at {result['rate']:,.0f} timesteps/s in "
        f"all (each session a 1-step chunk every N/{result['rate']:,.0f} s, up to {MAX_CHUNKS:,} "
        "chunks a message, every chunk naming start_step and answered_step), measured over "
        f"{result['window_s']:.0f} s after every session had stepped since its creation. Store "
        "bytes: INFO total_net_input_bytes over the window, summed over the nodes. Record: the "
        f"values of a stored hash's fields (max of {RECORD_SAMPLE} sampled; budget h and c "
        f"{STATE_BYTES:,} B + 1 KiB = {RECORD_BUDGET:,} B) and Redis's MEMORY USAGE. Pending: "
        f"lstm_state_store_pending_sessions sampled every {SAMPLE_EVERY_S} s (max over the "
        "window's first half / second half). Recovery: the server is SIGKILLed while being fed, "
        "the moment a message is answered (its step is likely not stored yet); "
        "a new one on the same store gets one chunk per session at the step the feeder knows "
        "(create_missing off), and a chunk refused STEP_OUT_OF_ORDER is resent from the "
        "expected_step named; the time runs from the new server's spawn (ready: serving) to "
        "the last session answered. CPU: cores used over the window by the server, by Redis "
        "(all nodes) and by everything else (the feeder included).",
        "",
    ]
    for kind in result["stores"]:
        title = {"redis": "One redis-server", "cluster": "Redis Cluster, 3 masters"}[kind]
        lines += [
            f"## {title}",
            "",
            "| live sessions | timesteps/s | store bytes / timestep | store bytes / session / s "
            "| record bytes (max; MEMORY USAGE) | server RSS | Redis used_memory | pending max "
            "(1st / 2nd half) | CPU cores: server / Redis / other | continued (resent) "
            "| recovery s (ready s) |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for c in (c for c in result["cells"] if c["store"] == kind):
            r, rec = c["recovery"], c["record"]
            lines.append(
                f"| {c['sessions']:,} | {c['timesteps_per_s']:,.0f} "
                f"| {c['store_bytes_per_timestep']:,.0f} "
                f"| {c['store_bytes_per_session_per_s']:,.1f} "
                f"| {rec['field_bytes_max']:,} ({rec['memory_usage_max']:,}) "
                f"| {c['server_rss_bytes'] / mib:,.0f} MiB "
                f"| {c['store_used_memory_bytes'] / mib:,.0f} MiB "
                f"| {c['pending_max']:,.0f} ({c['pending_max_first_half']:,.0f} / "
                f"{c['pending_max_second_half']:,.0f}) "
                f"| {c['server_cpu_cores']:.2f} / {c['store_cpu_cores']:.2f} / "
                f"{c['other_cpu_cores']:.2f} "
                f"| {r['continued']:,} of {c['sessions']:,} ({r['resent']:,}) "
                f"| {r['recovery_s']:.1f} ({r['ready_s']:.1f}) |"
            )
        lines += ["", checks([c for c in result["cells"] if c["store"] == kind]), ""]
    errors = [(c["store"], c["sessions"], c["feed_error_sample"]) for c in result["cells"]]
    if any(e for *_, e in errors):
        lines += ["Feed errors: " + "; ".join(f"{k} {n:,}: {e}" for k, n, e in errors if e), ""]
    failures = [
        (c["store"], c["sessions"], c["recovery"]["failure_sample"]) for c in result["cells"]
    ]
    if any(f for *_, f in failures):
        lines += [
            "Sessions that did not continue: "
            + "; ".join(f"{k} {n:,}: {f}" for k, n, f in failures if f),
            "",
        ]
    for key in ("comparison", "comparison_pinned"):
        if result.get(key):
            lines += comparison_lines(result[key])
    return "\n".join(lines)


def comparison_lines(comparison: dict[str, Any]) -> list[str]:
    where = (
        "the servers pinned to CPU 0, Redis and the feeder to the other CPUs (as where Redis "
        "has a machine of its own)"
        if comparison.get("pinned")
        else "every process free to run on any CPU"
    )
    lines = [
        "## Durable (one Redis) against shipped (no store)"
        + (", servers on a CPU of their own" if comparison.get("pinned") else ""),
        "",
        f"Closed loop at top speed, the same model; two servers as they ship (defaults, no "
        f"--torch-threads) up at once, {where}; {comparison['trials']} alternating trials of "
        f"{comparison['duration_s']:.0f} s; medians. Target: durable >= 0.85 x shipped.",
        "",
        "| cell | shipped timesteps/s | durable timesteps/s | durable / shipped "
        "| shipped trials | durable trials |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for name, by in comparison["runs"].items():
        m = comparison["median_timesteps_per_s"][name]
        each = {
            v: ", ".join(f"{r['timesteps_per_s']:,.0f}{'*' * r['busy']}" for r in rows)
            for v, rows in by.items()
        }
        lines.append(
            f"| {name} | {m['shipped']:,.0f} | {m['durable']:,.0f} "
            f"| {comparison['ratio_durable_to_shipped'][name]:.2f} "
            f"| {each['shipped']} | {each['durable']} |"
        )
    lines += [
        "",
        f"Errors: {comparison['errors']}. `*`: other processes used more than {BUSY_CORES} "
        "cores during that trial (each trial first waits, within a budget, for quiet).",
        "",
    ]
    return lines
