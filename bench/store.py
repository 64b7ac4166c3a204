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
import itertools
import json
import math
import platform
import re
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import redis

from bench.cpu_meter import BUSY_CORES, CpuMeter, QuietGate, _machine_busy_s, _process_cpu_s
from bench.measure import machine_info
from bench.process import (
    free_port,
    lstm_serve,
    redis_server,
    rss_bytes,
    running_server,
    wait_for_port,
)
from lstm_model.checkpoint import save_model
from lstm_model.cli import init_model
from lstm_stream.client.batch_loadgen import run_batch_load
from lstm_stream.client.batching import chunk_error
from lstm_stream.client.errors import LstmStreamError
from lstm_stream.client.loadgen import run_load
from lstm_stream.v1 import inference_pb2 as pb
from lstm_stream.v1 import inference_pb2_grpc as pb_grpc
from server.store_backend import KEY_PREFIX

INPUTS, HIDDEN, LAYERS, OUTPUTS = 32, 256, 2, 8
STATE_BYTES = 2 * LAYERS * HIDDEN * 4  # h and c, float32
RECORD_BUDGET = STATE_BYTES + 1024
MAX_CHUNKS = 1024  # chunks (sessions) per message
SPARE_SESSIONS = 1024  # --max-sessions beyond N
MIN_WARMUP_S = 5.0
SAMPLE_EVERY_S = 0.5
CONCURRENT_MESSAGES = 4  # creating and recovering: StepBatch calls in flight at once
CALL_TIMEOUT_S = 300.0
QUIET_BUDGET_S = 120.0  # the comparison waits at most this long, all cells, for quiet
RECORD_SAMPLE = 64  # records whose size is read
COMPARISON = {
    "StreamSteps, 64 sessions x 1-step messages": lambda t, d: run_load(t, 64, 1, d),
    "StreamBatches, 1,024 sessions x 1,024 chunks, window 4": lambda t, d: run_batch_load(
        t, 1024, 1024, 1, d, window=4
    ),
}


# The stores


@dataclass(frozen=True)
class Store:
    kind: str
    url: str
    ports: tuple[int, ...]
    pids: tuple[int, ...]


@contextmanager
def one_redis(directory: Path) -> Iterator[Store]:
    with redis_server() as (url, pid):
        yield Store("redis", url, (int(url.rsplit(":", 1)[1].split("/")[0]),), (pid,))


@contextmanager
def redis_cluster(directory: Path, masters: int = 3) -> Iterator[Store]:
    """`masters` cluster-enabled redis-servers (no replicas, no persistence), their slots
    spread by `redis-cli --cluster create`; the URL names every node as a seed."""
    binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if binary is None or cli is None:
        raise RuntimeError("the cluster needs redis-server and redis-cli")
    ports: list[int] = []
    while len(ports) < masters:  # the cluster bus listens on port + 10000
        port = free_port()
        if port < 55536 and port not in ports:
            ports.append(port)
    processes = []
    try:
        for port in ports:
            node = directory / f"redis-{port}"
            node.mkdir(parents=True, exist_ok=True)
            options = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            cluster = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            command = [binary, "--port", str(port), *options, *cluster, "--dir", str(node)]
            processes.append(
                subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        _wait(lambda: all(_answers(port) for port in ports), "the cluster nodes to listen")
        nodes = [f"127.0.0.1:{port}" for port in ports]
        subprocess.run(
            [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        _wait(lambda: all(_cluster_ok(p) for p in ports), "the cluster to cover every slot")
        url = "redis+cluster://" + ",".join(nodes)
        yield Store("cluster", url, tuple(ports), tuple(p.pid for p in processes))
    finally:
        for process in processes:
            process.kill()
            process.wait()


STORES: dict[str, Callable[[Path], contextlib.AbstractContextManager[Store]]] = {
    "redis": one_redis,
    "cluster": redis_cluster,
}


def _answers(port: int) -> bool:
    try:
        with redis.Redis(port=port, socket_timeout=1) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def _cluster_ok(port: int) -> bool:
    with redis.Redis(port=port) as client:
        return client.cluster("info")["cluster_state"] == "ok"


def _wait(ready: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def store_info(store: Store) -> dict[str, int]:
    """INFO figures summed over the store's nodes."""
    totals = {"total_net_input_bytes": 0, "used_memory": 0, "keys": 0}
    for port in store.ports:
        with redis.Redis(port=port) as client:
            info = client.info()
            totals["total_net_input_bytes"] += info["total_net_input_bytes"]
            totals["used_memory"] += info["used_memory"]
            totals["keys"] += client.dbsize()
    return totals


def record_sizes(store: Store) -> dict[str, Any]:
    """Up to RECORD_SAMPLE session records: their fields' bytes and Redis's MEMORY USAGE."""
    fields, usage = [], []
    for port in store.ports:
        with redis.Redis(port=port) as client:
            keys = client.scan_iter(match=KEY_PREFIX + "*", count=1000)
            for key in list(itertools.islice(keys, math.ceil(RECORD_SAMPLE / len(store.ports)))):
                record = client.hgetall(key)
                fields.append({name.decode(): len(value) for name, value in record.items()})
                usage.append(client.memory_usage(key, samples=0))
    values = [sum(f.values()) for f in fields]
    return {
        "sampled": len(fields),
        "field_bytes_mean": statistics.mean(values),
        "field_bytes_max": max(values),
        "state_field_bytes_max": max(f.get("state", 0) for f in fields),
        "meta_field_bytes_max": max(f.get("meta", 0) for f in fields),
        "memory_usage_mean": statistics.mean(usage),
        "memory_usage_max": max(usage),
        "example_fields": fields[0],
    }


# The server


@dataclass
class Server:
    process: subprocess.Popen
    target: str
    metrics_port: int
    started: float  # time.monotonic() before it was spawned
    ready_s: float  # from spawn to serving

    def scrape(self) -> dict[str, float]:
        """The unlabelled samples of /metrics."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return {
            name: float(value)
            for name, value in re.findall(r"^([a-z_]+) (\S+)$", text, re.MULTILINE)
        }


@contextmanager
def lstm_server(model_dir: Path, store_url: str, capacity: int, log_path: Path) -> Iterator[Server]:
    """One lstm-serve on the store; SIGKILLed on the way out (if nothing killed it first)."""
    metrics_port = free_port()
    command = lstm_serve(
        *("--model", str(model_dir), "--metrics-port", str(metrics_port)),
        *("--state-store", store_url, "--max-sessions", str(capacity), "--torch-threads", "1"),
    )
    started = time.monotonic()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log)
    try:
        port = wait_for_port(process, log_path)
        yield Server(
            process, f"127.0.0.1:{port}", metrics_port, started, time.monotonic() - started
        )
    finally:
        process.kill()
        process.wait()


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


def compare(model_dir: Path, trials: int, duration_s: float, work: Path) -> dict[str, Any]:
    """Shipped (no store) and durable (one Redis) servers, defaults otherwise, both up at once;
    the comparison's cells alternate between them, `trials` times."""
    runs: dict[str, dict[str, list[dict]]] = {c: {"shipped": [], "durable": []} for c in COMPARISON}
    serve = ("--model", str(model_dir), "--metrics-port", "0", "--max-sessions", "4096")
    gate = QuietGate(QUIET_BUDGET_S)
    with (
        redis_server() as (url, redis_pid),
        running_server(lstm_serve(*serve), work / "shipped.log") as (shipped, shipped_pid),
        running_server(lstm_serve(*serve, "--state-store", url), work / "durable.log") as (
            durable,
            durable_pid,
        ),
    ):
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
    medians = {
        name: {v: statistics.median(r["timesteps_per_s"] for r in rows) for v, rows in by.items()}
        for name, by in runs.items()
    }
    return {
        "trials": trials,
        "duration_s": duration_s,
        "runs": runs,
        "median_timesteps_per_s": medians,
        "ratio_durable_to_shipped": {n: m["durable"] / m["shipped"] for n, m in medians.items()},
        "errors": sum(r["errors"] for by in runs.values() for rows in by.values() for r in rows),
    }


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
    comparison = result.get("comparison")
    if comparison:
        lines += [
            "## Durable (one Redis) against shipped (no store)",
            "",
            f"Closed loop at top speed, the same model; two servers as they ship (defaults, no "
            f"--torch-threads) up at once, {comparison['trials']} alternating trials of "
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
    return "\n".join(lines)


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
    if (end := tree_state()) != machine["commit"]:  # every server ran from the tree
        machine["commit"] += f" at the start, {end} at the end"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "store.json").write_text(json.dumps(result, indent=2) + "\n")
    text = render(result)
    (args.out_dir / "store.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
