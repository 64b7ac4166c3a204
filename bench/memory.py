"""Memory of idle sessions: RSS of lstm-serve holding N idle sessions of the hidden-256
two-layer model, against a server of the same model holding none (capacity 1).

Target (issue 7): growth <= 1.5 x the raw state bytes (h and c) + 1 KiB per session.

    python -m bench.memory --sessions 100000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.process import lstm_serve, rss_bytes, running_server
from lstm_model.checkpoint import save_model
from lstm_model.cli import init_model
from lstm_stream.client import AsyncStreamingClient
from lstm_stream.v1 import inference_pb2 as pb

HIDDEN, LAYERS = 256, 2


async def create_sessions(target: str, count: int, concurrency: int = 256) -> None:
    async with AsyncStreamingClient(target) as client:
        next_index = iter(range(count))

        async def worker() -> None:
            for _ in next_index:
                await client.call("CreateSession", pb.CreateSessionRequest())

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def settle(pid: int) -> int:
    time.sleep(2)
    return rss_bytes(pid)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--out", default="docs/memory.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model(init_model(32, HIDDEN, LAYERS, 8, seed=0), Path(tmp) / "m")
        serve = (
            "--model",
            str(model_dir),
            "--metrics-port",
            "0",
            "--session-idle-timeout-s",
            "3600",
        )
        with running_server(lstm_serve(*serve, "--max-sessions", "1"), Path(tmp) / "a.log") as (
            _,
            pid,
        ):
            base_rss = settle(pid)
        with running_server(
            lstm_serve(*serve, "--max-sessions", str(args.sessions)), Path(tmp) / "b.log"
        ) as (target, pid):
            empty_rss = settle(pid)
            started = time.monotonic()
            asyncio.run(create_sessions(target, args.sessions))
            seconds = time.monotonic() - started
            full_rss = settle(pid)
    state = args.sessions * LAYERS * HIDDEN * 2 * 4
    growth = full_rss - base_rss
    budget = 1.5 * state + 1024 * args.sessions
    result = {
        "sessions": args.sessions,
        "hidden": HIDDEN,
        "layers": LAYERS,
        "raw_state_bytes": state,
        "rss_baseline_bytes": base_rss,
        "rss_pool_allocated_bytes": empty_rss,
        "rss_with_sessions_bytes": full_rss,
        "growth_bytes": growth,
        "budget_bytes": int(budget),
        "bytes_per_session_beyond_state": (growth - state) / args.sessions,
        "create_seconds": seconds,
        "within_budget": growth <= budget,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    mib = 2**20
    print(
        f"{args.sessions:,} idle sessions, hidden {HIDDEN} x {LAYERS} layers: raw state "
        f"{state / mib:.0f} MiB; RSS {base_rss / mib:.0f} MiB (capacity 1) -> "
        f"{empty_rss / mib:.0f} MiB (pool allocated) -> {full_rss / mib:.0f} MiB (sessions "
        f"held); growth {growth / mib:.0f} MiB = state + "
        f"{(growth - state) / args.sessions:.0f} B per session; budget {budget / mib:.0f} MiB"
        f" -> {'within' if growth <= budget else 'OVER'}; created in {seconds:.0f} s"
    )
    return 0 if growth <= budget else 1


if __name__ == "__main__":
    sys.exit(main())
