"""Durable sessions at scale (issue 27): what the state store costs, how big a stored record is,
whether the writes keep up, and whether every session goes on after its server is killed; for
one redis-server and a 3-master Redis Cluster, at 1,000, 10,000 and 100,000 live sessions.
Then durable (one Redis) against shipped (no store) at closed-loop top speed.

    python -m bench.store --out-dir docs     # docs/store.{json,md}, about 10 minutes

Each cell: a fresh store and one lstm-serve (input 32, hidden 256 x 2 layers, output 8;
--torch-threads 1) holding N sessions, fed through StreamBatches at a fixed aggregate rate
(--rate timesteps/s: each session one 1-step chunk every N/rate s, up to 1,024 chunks a
message), every chunk naming its start_step and answered_step as the SDK does. After a warm-up
(every session stepped at least once since it was created) it is measured over --window-s:
the store's input bytes (INFO total_net_input_bytes, summed over its nodes), the records'
size, the server's RSS and Redis's used_memory, lstm_state_store_pending_sessions sampled from
/metrics, and the timesteps answered. Then the server is SIGKILLed while it is being fed, and a
new one on the same store continues every session: one chunk each at the step the feeder
knows (create_missing off); a chunk refused STEP_OUT_OF_ORDER (the store was behind) is resent
from the expected_step it names.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import secrets
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.cpu_meter import BUSY_CORES, CpuMeter, QuietGate, _machine_busy_s, _process_cpu_s
from bench.measure import machine_info
from bench.process import (
    lstm_serve,
    redis_server,
    rss_bytes,
    running_server,
)
from bench.store_parts import (
    CALL_TIMEOUT_S,
    CONCURRENT_MESSAGES,
    HIDDEN,
    INPUTS,
    LAYERS,
    MAX_CHUNKS,
    MIN_WARMUP_S,
    OUTPUTS,
    QUIET_BUDGET_S,
    RECORD_BUDGET,
    SAMPLE_EVERY_S,
    SPARE_SESSIONS,
    STORES,
    Server,
    Store,
    lstm_server,
    record_sizes,
    store_info,
)
from bench.store_report import render
from lstm_model.checkpoint import save_model
from lstm_model.cli import init_model
from lstm_stream.client.batch_loadgen import run_batch_load
from lstm_stream.client.batching import chunk_error
from lstm_stream.client.errors import LstmStreamError
from lstm_stream.client.loadgen import run_load
from lstm_stream.v1 import inference_pb2 as pb
from lstm_stream.v1 import inference_pb2_grpc as pb_grpc

COMPARISON = {
    "StreamSteps, 64 sessions x 1-step messages": lambda t, d: run_load(t, 64, 1, d),
    "StreamBatches, 1,024 sessions x 1,024 chunks, window 4": lambda t, d: run_batch_load(
        t, 1024, 1024, 1, d, window=4
    ),
}


# The feeder


@dataclass(eq=False)
class Group:
    """Sessions fed together, one chunk each per message, all at the same step."""

    request: pb.StepBatchRequest
    step: int = 0  # every session's next step; the feeder has every output before it
    error: str = ""
    chunks: list[pb.SessionChunk] = field(init=False)  # the request's own, set in place

    def __post_init__(self) -> None:
        self.chunks = list(self.request.chunks)

    def number(self) -> None:
        """Name the step of this message's chunks, and what has been answered (all before)."""
        for chunk in self.chunks:
            chunk.start_step = chunk.answered_step = self.step


def make_groups(sessions: int, row: bytes) -> list[Group]:
    """Sessions split evenly into groups of at most MAX_CHUNKS."""
    run_id = secrets.token_hex(4)
    count = math.ceil(sessions / MAX_CHUNKS)
    ids = [f"store-{run_id}-{i}" for i in range(sessions)]
    return [
        Group(
            pb.StepBatchRequest(
                chunks=[pb.SessionChunk(session_id=s, packed_inputs=row) for s in ids[g::count]]
            )
        )
        for g in range(count)
    ]


def answered(groups: list[Group]) -> int:
    """Timesteps answered so far, all sessions."""
    return sum(g.step * len(g.chunks) for g in groups)


def refusals(response: pb.StepBatchResponse) -> list[tuple[int, LstmStreamError]]:
    """The refused chunks of a response: (index, error)."""
    return [
        (i, chunk_error(r.error)) for i, r in enumerate(response.results) if r.HasField("error")
    ]


async def create(stub: pb_grpc.InferenceServiceStub, groups: list[Group]) -> None:
    """Every session's first chunk (step 0), with create_missing."""
    limit = asyncio.Semaphore(CONCURRENT_MESSAGES)

    async def one(group: Group) -> None:
        async with limit:
            group.number()
            request = pb.StepBatchRequest(create_missing=True)
            request.MergeFrom(group.request)
            response = await stub.StepBatch(request, timeout=CALL_TIMEOUT_S)
            if refused := refusals(response):
                raise RuntimeError(f"{len(refused)} sessions not created: {refused[0][1]}")
            group.step = 1

    await asyncio.gather(*(one(g) for g in groups))


async def feed(
    stub: pb_grpc.InferenceServiceStub,
    group: Group,
    first_at: float,
    period: float,
    answer: asyncio.Event,
) -> None:
    """One StreamBatches stream: the group's next chunks every `period` s (closed loop: when an
    answer comes late, the next message goes at once, without catching up), until cancelled.
    `answer` is set at every answer."""
    call = stub.StreamBatches()
    at = first_at
    try:
        while True:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            group.number()
            await call.write(group.request)  # serialised here: the next number() may change it
            response = await call.read()
            if response is grpc.aio.EOF:
                raise RuntimeError(f"stream ended: {await call.code()} {await call.details()}")
            if refused := refusals(response):
                raise RuntimeError(f"{len(refused)} chunks refused: {refused[0][1]}")
            group.step += 1
            answer.set()
            at = max(at + period, time.monotonic())
    except (grpc.RpcError, RuntimeError) as exc:
        group.error = str(exc)
    finally:
        call.cancel()


def sample(store: Store, server: Server, groups: list[Group]) -> dict[str, float]:
    """Where the cell stands now: timesteps answered, the store's input bytes, the server's
    writes and pending sessions, CPU seconds (the server's, the store's, the machine's)."""
    metrics = server.scrape()
    return {
        "time": time.monotonic(),
        "answered": answered(groups),
        "net_input_bytes": store_info(store)["total_net_input_bytes"],
        "writes": metrics.get("lstm_state_store_writes_total", math.nan),
        "pending": metrics.get("lstm_state_store_pending_sessions", math.nan),
        "server_cpu_s": _process_cpu_s(server.process.pid),
        "store_cpu_s": sum(_process_cpu_s(pid) for pid in store.pids),
        "machine_busy_s": _machine_busy_s(),
    }


async def sample_window(
    store: Store, server: Server, groups: list[Group], seconds: float
) -> list[dict[str, float]]:
    """A sample every SAMPLE_EVERY_S over `seconds` (taken off the event loop, which feeds)."""
    samples = [await asyncio.to_thread(sample, store, server, groups)]
    while samples[-1]["time"] < samples[0]["time"] + seconds:
        await asyncio.sleep(SAMPLE_EVERY_S)
        samples.append(await asyncio.to_thread(sample, store, server, groups))
    return samples


# One cell


async def continue_group(
    stub: pb_grpc.InferenceServiceStub, group: Group, row: bytes
) -> tuple[list[int], list[str]]:
    """The group's next chunks, at the step the feeder knows, on a server that holds none of
    its sessions; a gap refusal (the store holds an older step) is resent from the step it
    names. The timesteps each resend went back, and what was refused otherwise."""
    group.number()
    response = await stub.StepBatch(group.request, timeout=CALL_TIMEOUT_S)
    resend, back, failures = [], [], []
    for index, error in refusals(response):
        expected = int(error.metadata.get("expected_step", -1))
        if error.reason == "STEP_OUT_OF_ORDER" and 0 <= expected < group.step:
            resend.append(
                pb.SessionChunk(
                    session_id=group.chunks[index].session_id,
                    start_step=expected,
                    answered_step=group.step,
                    packed_inputs=row * (group.step + 1 - expected),
                )
            )
            back.append(group.step - expected)
        else:
            failures.append(f"{error.reason}: {error}")
    if resend:
        again = await stub.StepBatch(pb.StepBatchRequest(chunks=resend), timeout=CALL_TIMEOUT_S)
        failures += [f"resent: {error.reason}: {error}" for _, error in refusals(again)]
    group.step += 1
    return back, failures


async def recover(target: str, groups: list[Group], row: bytes) -> dict[str, Any]:
    """Every session continued on a new server (CONCURRENT_MESSAGES groups at a time)."""
    limit = asyncio.Semaphore(CONCURRENT_MESSAGES)
    back: list[int] = []
    failures: list[str] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)

        async def one(group: Group) -> None:
            async with limit:
                try:
                    went_back, refused = await continue_group(stub, group, row)
                except grpc.RpcError as exc:
                    went_back, refused = [], [f"call failed: {exc}"] * len(group.chunks)
                back.extend(went_back)
                failures.extend(refused)

        await asyncio.gather(*(one(g) for g in groups))
    return {
        "continued": sum(len(g.chunks) for g in groups) - len(failures),
        "resent": len(back),
        "resent_steps_max": max(back, default=0),
        "failed": len(failures),
        "failure_sample": failures[:3],
    }


async def measure_cell(
    kind: str, sessions: int, rate: float, window_s: float, model_dir: Path, work: Path
) -> dict[str, Any]:
    row = np.random.default_rng(0).standard_normal(INPUTS, dtype=np.float32).tobytes()
    groups = make_groups(sessions, row)
    period = sessions / rate  # each session one step every period
    capacity = sessions + SPARE_SESSIONS
    with STORES[kind](work) as store:
        with lstm_server(model_dir, store.url, capacity, work / f"{kind}-{sessions}-a.log") as a:
            async with grpc.aio.insecure_channel(a.target) as channel:
                stub = pb_grpc.InferenceServiceStub(channel)
                started = time.monotonic()
                await create(stub, groups)
                create_s = time.monotonic() - started
                first, answer = time.monotonic(), asyncio.Event()
                tasks = [
                    asyncio.ensure_future(
                        feed(stub, g, first + i * period / len(groups), period, answer)
                    )
                    for i, g in enumerate(groups)
                ]
                await asyncio.sleep(max(period, MIN_WARMUP_S) + 1.0)
                window = await sample_window(store, a, groups, window_s)
                records = record_sizes(store)
                server_rss, used = rss_bytes(a.process.pid), store_info(store)["used_memory"]
                feed_errors = [g.error for g in groups if g.error]
                answer.clear()
                with contextlib.suppress(TimeoutError):  # no answer: every feeder has failed
                    await asyncio.wait_for(answer.wait(), period + CALL_TIMEOUT_S)
                a.process.kill()  # SIGKILL, mid-feed: just after a message was answered
                a.process.wait()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        with lstm_server(model_dir, store.url, capacity, work / f"{kind}-{sessions}-b.log") as b:
            recovery = await recover(b.target, groups, row)
            recovery["ready_s"] = b.ready_s
            recovery["recovery_s"] = time.monotonic() - b.started
            recovery["server_cpu_s"] = _process_cpu_s(b.process.pid)
    return {
        "store": kind,
        "sessions": sessions,
        "target_timesteps_per_s": rate,
        "period_s": period,
        "groups": len(groups),
        "create_s": create_s,
        **summarise_window(window, sessions),
        "record": records,
        "record_within_budget": records["field_bytes_max"] <= RECORD_BUDGET,
        "server_rss_bytes": server_rss,
        "store_used_memory_bytes": used,
        "feed_errors": len(feed_errors),
        "feed_error_sample": feed_errors[:3],
        "recovery": recovery,
        "window_samples": window,
    }


def summarise_window(window: list[dict[str, float]], sessions: int) -> dict[str, Any]:
    """The window's figures, from its first and last samples (pending: every sample's)."""
    first, last = window[0], window[-1]
    delta = {key: last[key] - first[key] for key in first if key != "pending"}
    seconds, steps, net = delta["time"], delta["answered"], delta["net_input_bytes"]
    halfway = first["time"] + seconds / 2
    early = [s["pending"] for s in window if s["time"] < halfway]
    late = [s["pending"] for s in window if s["time"] >= halfway]
    server, store = delta["server_cpu_s"] / seconds, delta["store_cpu_s"] / seconds
    return {
        "window_s": seconds,
        "timesteps": steps,
        "timesteps_per_s": steps / seconds,
        "store_net_input_bytes": net,
        "store_bytes_per_timestep": net / steps,
        "store_bytes_per_session_per_s": net / (sessions * seconds),
        "records_written": delta["writes"],
        "store_bytes_per_record_written": net / delta["writes"],
        "server_cpu_cores": server,
        "store_cpu_cores": store,
        # Everything else the machine ran meanwhile, this process (the feeder) included.
        "other_cpu_cores": delta["machine_busy_s"] / seconds - server - store,
        "pending_max": max(early + late),
        "pending_max_first_half": max(early, default=math.nan),
        "pending_max_second_half": max(late, default=math.nan),
    }


def compare(
    model_dir: Path, trials: int, duration_s: float, work: Path, pin: bool = False
) -> dict[str, Any]:
    """Shipped (no store) and durable (one Redis) servers, defaults otherwise, both up at once;
    the comparison's cells alternate between them, `trials` times. `pin`: the servers run on
    CPU 0 and Redis and the feeder on the others, as where Redis has a machine of its own."""
    runs: dict[str, dict[str, list[dict]]] = {c: {"shipped": [], "durable": []} for c in COMPARISON}
    serve = ("--model", str(model_dir), "--metrics-port", "0", "--max-sessions", "4096")
    rest = sorted(os.sched_getaffinity(0) - {0})
    if pin and not rest:
        raise SystemExit("--pin needs a CPU besides CPU 0")
    pinned = ["taskset", "-c", "0"] if pin else []
    gate = QuietGate(QUIET_BUDGET_S)
    feeder_cpus = os.sched_getaffinity(0)
    with (
        redis_server() as (url, redis_pid),
        running_server([*pinned, *lstm_serve(*serve)], work / "shipped.log") as (
            shipped,
            shipped_pid,
        ),
        running_server(
            [*pinned, *lstm_serve(*serve, "--state-store", url)], work / "durable.log"
        ) as (durable, durable_pid),
    ):
        if pin:
            os.sched_setaffinity(redis_pid, rest)
            os.sched_setaffinity(0, rest)
        servers = {
            "shipped": (shipped, [shipped_pid]),
            "durable": (durable, [durable_pid, redis_pid]),
        }
        for _ in range(trials):
            for name, cell in COMPARISON.items():
                for variant, (target, pids) in servers.items():
                    gate.wait(pids)  # other processes quiet (within the budget)
                    meter = CpuMeter(pids)
                    result = asdict(asyncio.run(cell(target, duration_s)))
                    result.update(meter.cores())  # over the whole cell, its set-up included
                    result["busy"] = result["other_cpu_cores"] > BUSY_CORES
                    runs[name][variant].append(result)
                    print(f"  {name}, {variant}: {result['timesteps_per_s']:,.0f} timesteps/s")
    os.sched_setaffinity(0, feeder_cpus)
    medians = {
        name: {v: statistics.median(r["timesteps_per_s"] for r in rows) for v, rows in by.items()}
        for name, by in runs.items()
    }
    return {
        "pinned": pin,
        "trials": trials,
        "duration_s": duration_s,
        "runs": runs,
        "median_timesteps_per_s": medians,
        "ratio_durable_to_shipped": {n: m["durable"] / m["shipped"] for n, m in medians.items()},
        "errors": sum(r["errors"] for by in runs.values() for rows in by.values() for r in rows),
    }


def tree_state() -> str:
    """The commit the servers run, and whether server/ differs from it."""

    def git(*command: str) -> str:
        done = subprocess.run(["git", *command], capture_output=True, text=True)
        return done.stdout.strip()

    changed = git("status", "--porcelain", "--", "server")
    return git("rev-parse", "--short", "HEAD") + (" (server/ changed)" if changed else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", default="1000,10000,100000", help="comma-separated Ns")
    parser.add_argument("--stores", default="redis,cluster", help="of: redis, cluster")
    parser.add_argument("--rate", type=float, default=5000.0, help="timesteps/s, all sessions")
    parser.add_argument("--window-s", type=float, default=20.0)
    parser.add_argument("--trials", type=int, default=3, help="of the comparison; 0: none")
    parser.add_argument("--duration-s", type=float, default=5.0, help="a comparison cell")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="also compare with the servers on CPU 0 and Redis and the feeder on the others",
    )
    parser.add_argument("--out-dir", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.sessions.split(",")]
    stores = args.stores.split(",")
    if unknown := set(stores) - set(STORES):
        parser.error(f"--stores: unknown {sorted(unknown)}; expected of {sorted(STORES)}")
    machine = machine_info()
    machine["node"] = platform.node()
    machine["redis"] = (
        subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
        .stdout.split()[2]
        .removeprefix("v=")
    )
    machine["command"] = shlex.join(["python", "-m", "bench.store", *sys.argv[1:]])
    machine["commit"] = tree_state()
    result: dict[str, Any] = {
        "machine": machine,
        "stores": stores,
        "rate": args.rate,
        "window_s": args.window_s,
        "cells": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = save_model(init_model(INPUTS, HIDDEN, LAYERS, OUTPUTS, seed=0), work / "m")
        for kind in stores:
            for sessions in counts:
                print(f"{kind}, {sessions:,} sessions ...", flush=True)
                cell = asyncio.run(
                    measure_cell(kind, sessions, args.rate, args.window_s, model_dir, work)
                )
                result["cells"].append(cell)
                print(json.dumps({k: v for k, v in cell.items() if k != "window_samples"}))
        if args.trials:
            print("durable against shipped ...", flush=True)
            result["comparison"] = compare(model_dir, args.trials, args.duration_s, work)
            if args.pin:
                print("durable against shipped, servers pinned to CPU 0 ...", flush=True)
                result["comparison_pinned"] = compare(
                    model_dir, args.trials, args.duration_s, work, pin=True
                )
    if (end := tree_state()) != machine["commit"]:  # every server ran from the tree
        machine["commit"] += f" at the start, {end} at the end"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "store.json").write_text(json.dumps(result, indent=2) + "\n")
    text = render(result)
    (args.out_dir / "store.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
