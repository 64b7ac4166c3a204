"""The real parts bench/store.py measures: a redis-server or a three-master Redis Cluster on
loopback, lstm-serve on a store, and what is read off them (INFO, record sizes), with the
benchmark's settings."""

from __future__ import annotations

import contextlib
import itertools
import math
import re
import shutil
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench.process import (
    free_port,
    lstm_serve,
    redis_server,
    wait_for_port,
)
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
