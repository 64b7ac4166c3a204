"""The benchmark harness end to end on its quick grid, and the echo server it measures against."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import grpc

from bench.echo_server import create_echo_server
from lstm_stream.v1 import inference_pb2 as pb
from lstm_stream.v1 import inference_pb2_grpc as pb_grpc
from tests.factories import require_binary

REPO = Path(__file__).resolve().parents[2]
QUICK_SESSIONS, QUICK_CHUNKS = (1, 4), (1, 32)
VARIANTS = ("shipped", "durable", "durable-eager", "unbatched", "echo")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_quick_run_writes_json_markdown_and_plot(tmp_path):
    require_binary("redis-server")  # the durable variant's store
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads((tmp_path / "benchmarks.json").read_text())

    rows = {(r["variant"], r["sessions"], r["chunk_steps"]): r for r in doc["rows"]}
    for variant in VARIANTS:
        for sessions in QUICK_SESSIONS:
            for chunk in QUICK_CHUNKS:
                row = rows[(variant, sessions, chunk)]
                assert row["errors"] == 0, row
                assert row["timesteps"] > 0 and row["messages"] > 0, row
                assert row["latency_p99_s"] >= row["latency_p50_s"] > 0, row
                if variant.startswith(("shipped", "durable")):
                    assert row["timesteps"] == row["messages"] * chunk, row

    markdown = (tmp_path / "benchmarks.md").read_text()
    table_rows = {line.split("|")[1].strip() for line in markdown.splitlines() if line[:2] == "| "}
    assert {str(s) for s in QUICK_SESSIONS} <= table_rows
    assert f"{doc['machine']['cores']} cores" in markdown
    assert "## The cost of durable sessions" in markdown

    png = (tmp_path / "img" / "benchmarks.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1024
    assert doc["models"][0]["bare_compute"]["timesteps_per_s"] > 0
    overhead = doc["engine"]["step_overhead"]
    # Timings are reported, not compared: load can invert any two of them.
    assert overhead["rows"] == 1024 and overhead["step_s"] > 0 and overhead["compute_s"] > 0
    assert {(k["hidden"], k["rows"]) for k in doc["engine"]["kernels"]} == {
        (h, r) for h in (8, 256) for r in (1, 64, 1024)
    }
    assert "## Targets (issue 14)" in markdown and "host work" in markdown


def test_echo_server_answers_with_outputs_of_the_message_shape():
    async def exchange() -> list[pb.StreamStepsResponse]:
        server, port = await create_echo_server("127.0.0.1", 0, input_size=3, output_size=2)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = pb_grpc.InferenceServiceStub(channel).StreamSteps()
                answers = []
                for steps in (4, 1):
                    await call.write(pb.StreamStepsRequest(inputs=[0.5] * (3 * steps)))
                    answers.append(await call.read())
                await call.done_writing()
                return answers
        finally:
            await server.stop(None)

    first, second = asyncio.run(exchange())
    assert (first.start_step, first.num_steps, len(first.outputs)) == (0, 4, 8)
    assert (second.start_step, second.num_steps, len(second.outputs)) == (4, 1, 2)
    assert first.session_id and first.session_id == second.session_id
