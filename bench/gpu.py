"""GPU checks and timings in one run (bench/gpu.sh calls this; --device cpu is a smoke test).

Engine level, on the hidden-256 two-layer model: the one-step CUDA-graph path against the plain
path and against the model on the CPU; one-step batch time (graph replay, eager, and the whole
engine step with host transfers); 32-step chunk throughput; float16/bfloat16 error and time.
Server level: lstm-serve on the device under several load-generator processes at once (one
Python process cannot produce the load a GPU absorbs), aggregate timesteps/s; then one host
used whole: --processes lstm-serve processes sharing the device behind nginx with the shipped
session-affine config (deploy/nginx/nginx.conf), or, with no nginx on the host, each load
process talking to one server process (the affinity nginx would give, without its cost).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.process import local_nginx, lstm_serve, running_server
from lstm_model.checkpoint import LoadedModel, save_model
from lstm_model.cli import init_model
from server.engine import Engine, StepWork, resolve_device

ROWS: list[tuple[str, str]] = []


def report(name: str, value: str) -> None:
    ROWS.append((name, value))
    print(f"{name:<58} {value}", flush=True)


def median_time(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of fn(), synchronising the device around each call."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def engine_time(engine: Engine, batch: list[StepWork], repeats: int, device: torch.device) -> float:
    """Median seconds of engine.step(batch) on the engine's own worker thread, as the server
    runs it (its torch threads and CUDA device are set there)."""
    return engine.run_on_worker(lambda: median_time(lambda: engine.step(batch), repeats, device))


def replay_time(engine: Engine, size: int, repeats: int) -> float:
    """Median device time of one graph replay of the `size` bucket (CUDA events)."""
    bucket = engine.one_step._bucket(size)
    for _ in range(10):
        bucket.graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        bucket.graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def one_step_batch(sessions: int, input_size: int, seed: int) -> list[StepWork]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((sessions, 1, input_size)).astype(np.float32)
    return [StepWork(slot, x[slot]) for slot in range(sessions)]


def make_engine(
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    graphs: bool | None = None,
    kernel: str = "nn.LSTM",
) -> Engine:
    loaded = LoadedModel(init_model(32, args.hidden, 2, 8, seed=0), "bench", Path("."))
    return Engine(
        loaded, args.sessions, device, dtype, args.sessions, graphs, one_step_kernel=kernel
    )


def engine_checks(args: argparse.Namespace, device: torch.device) -> None:
    sessions = args.sessions
    graphs = make_engine(args, device, graphs=True)
    plain = make_engine(args, device, graphs=False)
    captured = device.type == "cuda" and graphs.one_step._bucket(sessions).graph is not None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report("device", f"{device} ({name}), torch {torch.__version__}")
    report("one-step path", "CUDA graphs captured" if captured else "eager (no capture)")

    # The graph path equals the plain path: five full rounds, then a partial batch.
    worst = 0.0
    batches = [one_step_batch(sessions, 32, seed=r) for r in range(5)]
    batches.append(one_step_batch(sessions, 32, seed=9)[: sessions * 2 // 3 + 1])
    for batch in batches:
        for a, b in zip(graphs.step(batch).rows, plain.step(batch).rows, strict=True):
            worst = max(worst, float(np.abs(a - b).max()))
    report("max |graph path - plain path|, 6 batches", f"{worst:.2e}")

    # Both equal the model on the CPU run offline: 8 sessions, 5 one-step messages each.
    fresh = make_engine(args, device, graphs=True)
    xs = np.random.default_rng(5).standard_normal((8, 5, 32)).astype(np.float32)
    streamed = np.stack(
        [
            np.concatenate(fresh.step([StepWork(s, xs[s, t : t + 1]) for s in range(8)]).rows)
            for t in range(5)
        ],
        axis=1,
    )  # (8, 5, O)
    with torch.inference_mode():
        offline = init_model(32, args.hidden, 2, 8, seed=0)(torch.from_numpy(xs))[0].numpy()
    report(
        "max |device stream - CPU offline|, 8 sessions x 5 steps",
        f"{np.abs(streamed - offline).max():.2e}",
    )

    batch = one_step_batch(sessions, 32, seed=1)
    if captured:
        report(
            f"graph replay, {sessions} sessions x 1 step (device time)",
            f"{replay_time(graphs, sessions, args.repeats) * 1e6:.1f} us",
        )
    for label, engine in (("graphs", graphs), ("plain", plain)):
        seconds = engine_time(engine, batch, args.repeats, device)
        report(
            f"engine.step {label}, {sessions} x 1 step (wall, with copies)",
            f"{seconds * 1e6:.1f} us = {sessions / seconds:,.0f} timesteps/s",
        )

    # The lean step (lstm_model/fused.py) in the same graphs: its time and its distance from
    # nn.LSTM's outputs over 8 one-step rounds (the drift a recurrence adds).
    fused = make_engine(args, device, graphs=True, kernel="fused")
    seconds = engine_time(fused, batch, args.repeats, device)
    report(
        f"engine.step graphs, fused kernel, {sessions} x 1 step (wall, with copies)",
        f"{seconds * 1e6:.1f} us = {sessions / seconds:,.0f} timesteps/s",
    )
    reference = make_engine(args, device, graphs=True)
    worst = 0.0
    for r in range(8):
        rows = one_step_batch(sessions, 32, seed=20 + r)
        for a, b in zip(fused.step(rows).rows, reference.step(rows).rows, strict=True):
            worst = max(worst, float(np.abs(a - b).max()))
    report("max |fused kernel - nn.LSTM|, 8 one-step rounds", f"{worst:.2e}")

    chunk_sessions = min(256, sessions)
    x = np.random.default_rng(2).standard_normal((chunk_sessions, 32, 32)).astype(np.float32)
    chunk = [StepWork(s, x[s]) for s in range(chunk_sessions)]
    seconds = engine_time(plain, chunk, args.repeats, device)
    report(
        f"engine.step, {chunk_sessions} x 32 steps",
        f"{chunk_sessions * 32 / seconds:,.0f} timesteps/s",
    )
    x_dev = torch.from_numpy(x).to(device)
    with torch.inference_mode():
        bare = median_time(lambda: plain.network(x_dev), args.repeats, device)
    report(
        f"bare model forward, {chunk_sessions} x 32 steps",
        f"{chunk_sessions * 32 / bare:,.0f} timesteps/s",
    )

    for label, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        low, full = make_engine(args, device, dtype), make_engine(args, device, graphs=False)
        one = one_step_batch(sessions, 32, seed=3)
        got, ref = np.concatenate(low.step(one).rows), np.concatenate(full.step(one).rows)
        rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        seconds = engine_time(low, batch, args.repeats, device)
        report(
            f"{label}: rel. error vs float32; engine.step {sessions} x 1",
            f"{rel:.1e}; {seconds * 1e6:.1f} us",
        )


def serve_command(model_dir: Path, device: torch.device, batch: int, threads: int = 0) -> list[str]:
    return lstm_serve(
        "--metrics-port", "0", "--model", str(model_dir), "--device", str(device),
        "--max-sessions", "8192", "--max-batch-size", str(batch), "--torch-threads", str(threads),
    )  # fmt: skip


def server_load(args: argparse.Namespace, device: torch.device) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model(init_model(32, args.hidden, 2, 8, seed=0), Path(tmp) / "m")
        command = serve_command(model_dir, device, args.sessions)
        with running_server(command, Path(tmp) / "server.log") as (target, _):
            for chunk in (1, 32):
                load_round(args, [target], chunk, "server")


def host_load(args: argparse.Namespace, device: torch.device) -> None:
    """--processes servers on the one device, behind nginx where the host has it."""
    balancer = args.balancer
    if balancer == "auto":
        balancer = "nginx" if shutil.which("nginx") else "direct"
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        model_dir = save_model(init_model(32, args.hidden, 2, 8, seed=0), Path(tmp) / "m")
        # The host's cores shared out: N processes each using all of them would fight over them.
        threads = max(1, (os.cpu_count() or 1) // args.processes)
        command = serve_command(model_dir, device, args.sessions, threads)
        targets = [
            stack.enter_context(running_server(command, Path(tmp) / f"server-{i}.log"))[0]
            for i in range(args.processes)
        ]
        if balancer == "nginx":
            ports = [int(t.rsplit(":", 1)[1]) for t in targets]
            targets = [stack.enter_context(local_nginx(Path(tmp) / "nginx", ports))]
        label = f"one host, {args.processes} processes ({balancer})"
        for chunk in (1, 32):
            load_round(args, targets, chunk, label)


def load_round(args: argparse.Namespace, targets: list[str], chunk: int, label: str) -> None:
    """--load-procs load generators at once, spread over the targets."""
    procs = [
        subprocess.Popen(bench_command(args, targets[i % len(targets)], chunk),
                         stdout=subprocess.PIPE, text=True)
        for i in range(args.load_procs)
    ]  # fmt: skip
    outputs = [p.communicate()[0] for p in procs]
    failed = [p.returncode for p in procs if p.returncode not in (0, 1)]
    if failed:
        report(f"{label}, {chunk}-step messages", f"load generator failed: exit codes {failed}")
        return
    results = [json.loads(out) for out in outputs]
    total = sum(r["timesteps_per_s"] for r in results)
    p50 = statistics.median(r["latency_p50_s"] for r in results) * 1e3
    p99 = max(r["latency_p99_s"] for r in results) * 1e3
    errors = sum(r["errors"] for r in results)
    samples = sorted({r["error_sample"] for r in results if r["error_sample"]})
    sessions = args.load_procs * args.load_sessions
    report(
        f"{label}, {sessions} sessions x {chunk}-step messages ({args.load_procs} load procs)",
        f"{total:,.0f} timesteps/s, p50 {p50:.2f} ms, worst p99 {p99:.2f} ms, {errors} errors"
        + (f" (first: {samples[0]})" if samples else ""),
    )


def bench_command(args: argparse.Namespace, target: str, chunk: int) -> list[str]:
    return [
        sys.executable, "-m", "lstm_stream.client.cli", "bench", "--target", target,
        "--sessions", str(args.load_sessions), "--chunk", str(chunk),
        "--duration", str(args.duration), "--packed", "--json",
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sessions", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--load-procs", type=int, default=8)
    parser.add_argument("--load-sessions", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--processes", type=int, default=4, help="server processes on one host")
    parser.add_argument("--balancer", choices=("auto", "nginx", "direct"), default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--out", help="write the table as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.sessions, args.hidden, args.repeats = 16, 16, 3
        args.load_procs, args.load_sessions, args.duration = 2, 2, 0.5
        args.processes = 2
    device = resolve_device(args.device)
    torch.manual_seed(0)
    engine_checks(args, device)
    server_load(args, device)
    host_load(args, device)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(ROWS), indent=2))
    print("\n| check | result |\n| --- | --- |")
    for name, value in ROWS:
        print(f"| {name} | {value} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
