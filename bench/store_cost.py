"""What keeping sessions durable costs per timestep (issue 27): bytes sent to Redis per timestep
and per session per second, how far the store lags a session (the steps a client must keep to
resend, its recovery point), at several loads and write intervals.

    python -m bench.store_cost --out-dir docs      # docs/store_cost.{json,md}

Each row: a fresh redis-server and lstm-serve --state-store (one torch thread), then closed-loop
StreamSteps sessions (one message in flight each, packed inputs) for a warm-up and a measured
window. "says answered" rows send answered_step with each message, as the SDK does; "silent"
rows send none, so every record keeps the last --replay-steps outputs (the record of before).
Bytes are redis-server's total_net_input_bytes over the window; the lag is, per response,
the session's next step minus the durable_step it carries.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np
import redis

from bench.process import lstm_serve, redis_server, running_server
from lstm_model.checkpoint import BUNDLED_MODEL_DIR, save_model
from lstm_model.cli import init_model
from lstm_stream.v1 import inference_pb2 as pb
from lstm_stream.v1 import inference_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Row:
    model: str  # "256" (32 in, 256 hidden, 2 layers, 8 out) or "bundled" (6 / 48 / 2, 4 out)
    sessions: int
    steps: int  # per message
    interval_ms: int = 100
    says_answered: bool = True


ROWS = [
    Row("256", 64, 1),
    Row("256", 256, 1),
    Row("256", 64, 32),
    Row("bundled", 64, 1),
    Row("256", 64, 1, says_answered=False),
    Row("256", 64, 1, interval_ms=0),
    Row("256", 64, 1, interval_ms=500),
]
INPUTS = {"256": 32, "bundled": 6}


@dataclass
class Feed:
    """What the closed loops saw during the window."""

    timesteps: int = 0
    lags: list[int] | None = None


async def one_session(
    stub, row: Row, inputs: int, stop_warmup: float, stop: float, feed: Feed
) -> None:
    rows = np.random.default_rng().standard_normal((row.steps, inputs)).astype("<f4")
    packed = rows.tobytes()
    session = await stub.CreateSession(pb.CreateSessionRequest())
    call = stub.StreamSteps()
    answered = 0
    first = True
    while time.monotonic() < stop:
        request = pb.StreamStepsRequest(packed_inputs=packed)
        if first:
            request.session_id, first = session.session.session_id, False
        if row.says_answered:
            request.answered_step = answered
        await call.write(request)
        response = await call.read()
        answered = response.start_step + response.num_steps
        if time.monotonic() >= stop_warmup:
            feed.timesteps += response.num_steps
            feed.lags.append(answered - response.durable_step)
    await call.done_writing()
    await call.read()  # EOF: the server ends the stream


async def drive(target: str, row: Row, warmup_s: float, window_s: float) -> Feed:
    feed = Feed(lags=[])
    now = time.monotonic()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        await asyncio.gather(
            *(
                one_session(
                    stub, row, INPUTS[row.model], now + warmup_s, now + warmup_s + window_s, feed
                )
                for _ in range(row.sessions)
            )
        )
    return feed


def net_input_bytes(client: redis.Redis) -> int:
    return int(client.info("stats")["total_net_input_bytes"])


def measure_row(
    row: Row, model_dirs: dict[str, Path], work: Path, warmup_s: float, window_s: float
):
    with redis_server() as (url, _):
        client = redis.Redis.from_url(url)
        command = lstm_serve(
            "--model", str(model_dirs[row.model]), "--state-store", url,
            "--state-store-interval-ms", str(row.interval_ms), "--metrics-port", "0",
            "--torch-threads", "1", "--max-sessions", str(row.sessions + 16),
        )  # fmt: skip
        with running_server(command, work / "serve.log") as (target, _):
            # The window's bytes: read Redis's counter when the warm-up ends and the window does.
            async def run() -> tuple[Feed, int]:
                task = asyncio.create_task(drive(target, row, warmup_s, window_s))
                await asyncio.sleep(warmup_s)
                before = net_input_bytes(client)
                await asyncio.sleep(window_s)
                sent = net_input_bytes(client) - before
                return await task, sent

            feed, sent = asyncio.run(run())
            key = next(client.scan_iter("lstm-stream:session:*", count=1000))
            record = sum(len(client.hget(key, f) or b"") for f in (b"state", b"meta", b"step"))
    lags = sorted(feed.lags or [0])
    return {
        **asdict(row),
        "timesteps_per_s": feed.timesteps / window_s,
        "redis_bytes_per_s": sent / window_s,
        "bytes_per_timestep": sent / max(feed.timesteps, 1),
        "bytes_per_session_per_s": sent / window_s / row.sessions,
        "record_bytes": record,
        "lag_steps_median": statistics.median(lags),
        "lag_steps_p99": lags[int(0.99 * (len(lags) - 1))],
        "lag_steps_max": lags[-1],
    }


def render(result: dict) -> str:
    lines = [
        "# What durable sessions cost per timestep",
        "",
        f"`python -m bench.store_cost`, {result['date']}, on {result['machine']}: one "
        "lstm-serve (one torch thread) and one redis-server on the same machine, closed-loop "
        f"StreamSteps sessions, one message in flight each, {result['warmup_s']:.0f} s warm-up "
        f"then {result['window_s']:.0f} s measured. Model 256: 32 inputs, 256 hidden, 2 layers, "
        "8 outputs (h and c: 4,096 bytes); bundled: 6 / 48 / 2 layers, 4 outputs (768 bytes). "
        "Lag: a session's next step minus the `durable_step` its response carries, in steps "
        "(what a client keeps to resend after a lost replica).",
        "",
        "| model | sessions x steps/message | interval | client | timesteps/s | to Redis | "
        "per session per second | per timestep | stored record | lag median / p99 / max |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['sessions']} x {r['steps']} | {r['interval_ms']} ms | "
            f"{'says answered' if r['says_answered'] else 'silent'} | "
            f"{r['timesteps_per_s']:,.0f} | {r['redis_bytes_per_s'] / 1e6:.2f} MB/s | "
            f"{r['bytes_per_session_per_s'] / 1e3:.1f} KB | {r['bytes_per_timestep']:,.0f} B | "
            f"{r['record_bytes']:,} B | {r['lag_steps_median']:.0f} / {r['lag_steps_p99']} / "
            f"{r['lag_steps_max']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--window-s", type=float, default=6.0)
    parser.add_argument("--out-dir", default="docs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dirs = {
            "256": save_model(init_model(32, 256, 2, 8, seed=0), work / "m256"),
            "bundled": BUNDLED_MODEL_DIR,
        }
        rows = []
        for row in ROWS:
            rows.append(measure_row(row, model_dirs, work, args.warmup_s, args.window_s))
            print(json.dumps(rows[-1]))
    result = {
        "machine": f"{platform.node()}, {os.cpu_count()} cores",
        "date": datetime.date.today().isoformat(),
        "warmup_s": args.warmup_s,
        "window_s": args.window_s,
        "rows": rows,
    }
    out = Path(args.out_dir)
    (out / "store_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "store_cost.md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
