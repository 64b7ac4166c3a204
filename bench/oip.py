"""The Open Inference Protocol against native StreamSteps, in one run (issue 28's target: the
OIP path at >= 0.8x native timesteps/s, 64 sequences, one step a request).

    python -m bench.oip --out-dir docs     # 3 alternating trials, into docs/oip.{json,md}
    python -m bench.oip --quick --out-dir /tmp/oip   # a smoke run of a second or two a cell

One lstm-serve (bundled model, CPU, defaults) serves both cells in turn:

- native: client/loadgen.run_load, 64 StreamSteps sessions, one stream each;
- OIP: 64 Triton sequences multiplexed over ONE ModelStreamInfer stream per channel (as
  tritonclient's stream_infer does), each sequence sending its next one-step request (raw FP32
  in raw_input_contents) as soon as its previous answer arrives, answers matched by request id.

Both count the same way (loadgen's window and summary), with the same sessions, warm-up and
duration. Trials alternate the cells so drift on a shared machine hits both alike, and each cell
waits (within a budget) for other processes to go quiet and is flagged when they did not.
Medians are quoted; the ratio is reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.cpu_meter import BUSY_CORES, CpuMeter, QuietGate
from bench.measure import machine_info
from bench.process import lstm_serve, running_server
from lstm_stream.client.loadgen import (
    CLOSE_TIMEOUT_S,
    STALL_MARGIN_S,
    LoadResult,
    _channels,
    _describe,
    _summarise,
    _Window,
    format_result,
    run_load,
)
from lstm_stream.client.options import ClientOptions
from lstm_stream.oip import grpc_service_pb2 as oip
from lstm_stream.oip import grpc_service_pb2_grpc as oip_grpc

SEQUENCES = 64
NATIVE, OPEN_INFERENCE = "native StreamSteps", "OIP ModelStreamInfer"
OIP_STREAM_EACH = "OIP, a stream per sequence"  # shaped as native: one stream a sequence
TARGET_RATIO = 0.8  # issue 28: OIP timesteps/s at least this share of native's
INPUT_NAME, DATATYPE = "INPUT", "FP32"


class StreamClosed(RuntimeError):
    """The shared stream ended, failed or answered out of protocol; every waiter gets it."""


class OipStream:
    """One ModelStreamInfer call carrying many sequences: writes are serialised (a gRPC call
    takes one write at a time) and one reader task hands each answer to the request waiting
    on its id. Each sequence has one request in flight, so its index is a unique id."""

    def __init__(self, stub: oip_grpc.GRPCInferenceServiceStub, metadata: Any) -> None:
        self.call = stub.ModelStreamInfer(metadata=metadata)
        self._write_lock = asyncio.Lock()
        self._waiting: dict[str, asyncio.Future[oip.ModelInferResponse]] = {}
        self._reader = asyncio.create_task(self._read())

    async def exchange(self, request: oip.ModelInferRequest) -> oip.ModelInferResponse:
        """Send one request and wait for the answer echoing its id."""
        if self._reader.done():
            raise StreamClosed("stream already ended")
        future = asyncio.get_running_loop().create_future()
        self._waiting[request.id] = future
        async with self._write_lock:
            await self.call.write(request)
        return await future

    async def _read(self) -> None:
        reason = "stream ended"
        try:
            while (answer := await self.call.read()) is not grpc.aio.EOF:
                future = self._waiting.pop(answer.infer_response.id, None)
                if future is None:
                    reason = f"answer to no request in flight: id {answer.infer_response.id!r}"
                    return
                if answer.error_message:
                    future.set_exception(StreamClosed(f"refused: {answer.error_message}"))
                else:
                    future.set_result(answer.infer_response)
            reason = f"stream ended: {await self.call.code()} {await self.call.details()}"
        except grpc.RpcError as exc:
            reason = _describe(exc)
        finally:
            self._fail(reason)

    def _fail(self, reason: str) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(StreamClosed(reason))
        self._waiting.clear()

    async def finish(self) -> str:
        """Half-close, wait for the server to end the call; '' or what went wrong (the call
        is cancelled then)."""
        try:
            await asyncio.wait_for(self._finish(), CLOSE_TIMEOUT_S)
        except (grpc.RpcError, TimeoutError) as exc:
            self.call.cancel()
            return f"closing: {_describe(exc)}"
        finally:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        return ""

    async def _finish(self) -> None:
        async with self._write_lock:
            await self.call.done_writing()
        await self._reader
        await self.call.code()


def infer_request(
    model: str, rows: np.ndarray, request_id: str, sequence_id: int, **flags: bool
) -> oip.ModelInferRequest:
    """A one-sequence ModelInferRequest: rows (T, width) as raw little-endian FP32 INPUT, the
    int64 sequence_id, and sequence_start / sequence_end when given."""
    request = oip.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name=INPUT_NAME, datatype=DATATYPE, shape=list(rows.shape))
    request.raw_input_contents.append(rows.astype("<f4", copy=False).tobytes())
    request.parameters["sequence_id"].int64_param = sequence_id
    for name, value in flags.items():
        request.parameters[name].bool_param = value
    return request


def answered_steps(response: oip.ModelInferResponse, output_size: int) -> int:
    """The timesteps one answer carries, after checking its OUTPUT is that many rows."""
    if len(response.outputs) != 1 or len(response.raw_output_contents) != 1:
        raise RuntimeError(f"expected one OUTPUT tensor, got {len(response.outputs)}")
    steps = int(response.outputs[0].shape[-2])
    got = len(response.raw_output_contents[0]) // 4
    if got != steps * output_size:
        raise RuntimeError(f"expected {steps * output_size} output values, got {got}")
    return steps


@dataclass(eq=False)
class OipSequence:
    """One Triton sequence fed in a closed loop with the same prebuilt one-step request. Its
    counting fields are loadgen's _Session's, so loadgen's _summarise reads it alike."""

    stream: OipStream
    start: oip.ModelInferRequest  # sequence_start: opens it (not counted)
    request: oip.ModelInferRequest
    end: oip.ModelInferRequest  # sequence_end: closes it (not counted)
    output_size: int
    latencies: list[float] = field(default_factory=list)
    timesteps: int = 0
    last_counted: float = 0.0
    error: str = ""

    async def open(self) -> None:
        try:
            answered_steps(await self.stream.exchange(self.start), self.output_size)
        except (grpc.RpcError, RuntimeError) as exc:
            self.error = _describe(exc)

    async def run(self, window: _Window) -> None:
        perf_counter, request, latencies = time.perf_counter, self.request, self.latencies
        try:
            now = perf_counter()
            while now < window.end or not latencies:
                sent = now
                response = await self.stream.exchange(request)
                now = perf_counter()
                steps = answered_steps(response, self.output_size)
                if window.start <= now and (now <= window.end or not latencies):
                    latencies.append(now - sent)
                    self.timesteps += steps
                    self.last_counted = now
        except (grpc.RpcError, RuntimeError) as exc:
            self.error = _describe(exc)

    async def close(self) -> None:
        if self.error:
            return
        try:
            await asyncio.wait_for(self.stream.exchange(self.end), CLOSE_TIMEOUT_S)
        except (grpc.RpcError, RuntimeError, TimeoutError) as exc:
            self.error = f"closing: {_describe(exc)}"


async def model_shape(
    stub: oip_grpc.GRPCInferenceServiceStub, client: ClientOptions, model: str
) -> tuple[str, int, int]:
    """The model's name, input width and output width, from its OIP ModelMetadata."""
    meta = await stub.ModelMetadata(
        oip.ModelMetadataRequest(name=model), metadata=client.metadata(), timeout=client.deadline_s
    )
    (tensor_in,), (tensor_out,) = meta.inputs, meta.outputs
    return meta.name, int(tensor_in.shape[-1]), int(tensor_out.shape[-1])


def build_sequences(
    streams: list[OipStream],
    model: str,
    widths: tuple[int, int],
    count: int,
    seed: int,
    first_id: int,
) -> list[OipSequence]:
    """`count` sequences spread over the streams, random inputs built before the clock starts."""
    width, output_size = widths
    rows = np.random.default_rng(seed).standard_normal((count, 1, width), dtype=np.float32)
    sequences = []
    for i, row in enumerate(rows):
        request_id, sequence_id = str(i), first_id + i
        sequences.append(
            OipSequence(
                streams[i % len(streams)],
                infer_request(model, row, request_id, sequence_id, sequence_start=True),
                infer_request(model, row, request_id, sequence_id),
                infer_request(model, row, request_id, sequence_id, sequence_end=True),
                output_size,
            )
        )
    return sequences


async def run_oip_load(
    target: str | ClientOptions,
    sequences: int,
    duration_s: float,
    warmup_s: float = 0.5,
    seed: int = 0,
    model: str = "",
    first_id: int = 1,
    per_stream: int = SEQUENCES,
) -> LoadResult:
    """run_load's measurement over the Open Inference Protocol: `sequences` closed-loop
    sequences of one-step requests, SESSIONS_PER_CHANNEL to a channel and one ModelStreamInfer
    stream per `per_stream` sequences; sequence ids first_id, first_id + 1, ... (int64)."""
    client = target if isinstance(target, ClientOptions) else ClientOptions(target=target)
    channels = _channels(client, sequences)
    try:
        stubs = [oip_grpc.GRPCInferenceServiceStub(channel) for channel in channels]
        name, width, output_size = await model_shape(stubs[0], client, model)
        count = -(-sequences // per_stream)
        streams = [OipStream(stubs[i % len(stubs)], client.metadata()) for i in range(count)]
        runners = build_sequences(streams, name, (width, output_size), sequences, seed, first_id)
        await asyncio.gather(*(s.open() for s in runners))
        start = time.perf_counter() + warmup_s
        window = _Window(start, start + duration_s)
        lost = 0
        try:
            await asyncio.wait_for(
                asyncio.gather(*(s.run(window) for s in runners if not s.error)),
                warmup_s + duration_s + STALL_MARGIN_S,
            )
        except TimeoutError:
            lost = 1
        await asyncio.gather(*(s.close() for s in runners))
        closing = [e for e in await asyncio.gather(*(s.finish() for s in streams)) if e]
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    result = _summarise(runners, 1, window, lost + len(closing), packed=True)  # type: ignore[arg-type]
    if closing and not result.error_sample:
        result = LoadResult(**{**asdict(result), "error_sample": closing[0]})
    return result


# The two cells: (target, duration_s, warmup_s, first sequence id) -> a run's result.
Cell = Callable[[str, float, float, int], Awaitable[LoadResult]]
CELLS: dict[str, Cell] = {
    NATIVE: lambda t, d, w, _: run_load(t, SEQUENCES, 1, d, w),
    OPEN_INFERENCE: lambda t, d, w, first: run_oip_load(t, SEQUENCES, d, w, first_id=first),
    OIP_STREAM_EACH: lambda t, d, w, first: run_oip_load(
        t, SEQUENCES, d, w, first_id=first, per_stream=1
    ),
}


def measure_cell(
    name: str, target: str, pid: int, gate: QuietGate, settings: dict[str, float], first_id: int
) -> dict[str, Any]:
    """One cell after waiting for a quiet machine: its LoadResult, the cores each party used,
    and whether other processes disturbed it."""
    gate.wait([pid])
    meter = CpuMeter([pid])
    result = asyncio.run(
        CELLS[name](target, settings["duration_s"], settings["warmup_s"], first_id)
    )
    cores = meter.cores()
    disturbed = cores["other_cpu_cores"] > BUSY_CORES
    flag = " [disturbed by other processes]" if disturbed else ""
    print(f"{name:>22}: {format_result(result)}; other cores {cores['other_cpu_cores']:.2f}{flag}")
    return {**asdict(result), **cores, "disturbed": disturbed}


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per cell: the medians of timesteps/s, p50 and p99 latency, and the ratio to native."""
    medians = {
        name: {
            key: statistics.median(r[key] for r in rows)
            for key in ("timesteps_per_s", "latency_p50_s", "latency_p99_s")
        }
        for name, rows in runs.items()
    }
    native = medians[NATIVE]["timesteps_per_s"]
    for row in medians.values():
        row["ratio_to_native"] = row["timesteps_per_s"] / native if native else 0.0
    return medians


def measure(trials: int, settings: dict[str, float]) -> dict[str, Any]:
    """Alternate the cells `trials` times against one server; the whole report."""
    gate = QuietGate(settings["quiet_budget_s"])
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CELLS}
    with tempfile.TemporaryDirectory(prefix="lstm-bench-oip-") as work:
        command = lstm_serve("--metrics-port", "0")
        with running_server(command, Path(work) / "serve.log") as (target, pid):
            print(f"lstm-serve pid {pid} on {target}", flush=True)
            for trial in range(trials):
                for index, name in enumerate(CELLS):
                    first_id = 1 + (trial * len(CELLS) + index) * SEQUENCES
                    runs[name].append(measure_cell(name, target, pid, gate, settings, first_id))
    medians = summarise(runs)
    machine = machine_info()
    machine["command"] = shlex.join(["python", "-m", "bench.oip", *sys.argv[1:]])
    return {
        "machine": machine,
        "sequences": SEQUENCES,
        "steps_per_request": 1,
        "trials": trials,
        **settings,
        "runs": runs,
        "medians": medians,
        "ratio_oip_to_native": medians[OPEN_INFERENCE]["ratio_to_native"],
        "ratio_oip_stream_each_to_native": medians[OIP_STREAM_EACH]["ratio_to_native"],
        "target_ratio": TARGET_RATIO,
        "errors": sum(r["errors"] for rows in runs.values() for r in rows),
        "disturbed_cells": sum(r["disturbed"] for rows in runs.values() for r in rows),
    }


def render(result: dict[str, Any]) -> str:
    """docs/oip.md: the table, the machine, the date, and whether the target was met."""
    machine = result["machine"]
    ratio = result["ratio_oip_to_native"]
    met = "met" if ratio >= result["target_ratio"] else "not met"
    lines = [
        "# The Open Inference Protocol against native StreamSteps",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['platform']}); "
        f"{machine['date']}. {result['trials']} alternating trials of "
        f"{result['duration_s']:g} s (after {result['warmup_s']:g} s of warm-up) each; one "
        "lstm-serve (bundled model, CPU, defaults), one load generator process. Written by "
        "`make bench-oip` (bench/oip.py).",
        "",
        f"Native: {result['sequences']} StreamSteps sessions, a stream each "
        "(client/loadgen.py). OIP: the same number of sequences over one grpc.aio "
        "ModelStreamInfer stream (as tritonclient's stream carries them), or over a stream each "
        "(shaped as native), one-step requests of raw FP32, answers matched by id.",
        "",
        "| variant | sequences | timesteps/s (median) | each trial | p50 latency | p99 latency "
        "| ratio to native |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for name, rows in result["runs"].items():
        median = result["medians"][name]
        each = ", ".join(f"{r['timesteps_per_s']:,.0f}" for r in rows)
        lines.append(
            f"| {name} | {result['sequences']} | {median['timesteps_per_s']:,.0f} | {each} "
            f"| {median['latency_p50_s'] * 1e3:.2f} ms | {median['latency_p99_s'] * 1e3:.2f} ms "
            f"| {median['ratio_to_native']:.2f}x |"
        )
    lines += [
        "",
        f"OIP / native, medians of the same run: {ratio:.2f}x on one stream, "
        f"{result['ratio_oip_stream_each_to_native']:.2f}x with a stream per sequence (issue "
        f"28's target: >= {result['target_ratio']:g}x; one stream: {met}). "
        f"Errors: {result['errors']}. Cells disturbed by "
        f"other processes (over {BUSY_CORES} cores): {result['disturbed_cells']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds a cell measures")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument(
        "--quiet-budget", type=float, default=20.0, help="most seconds to wait for quiet"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 trial of 0.5 s")
    parser.add_argument("--out-dir", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.duration, args.warmup, args.quiet_budget = 1, 0.5, 0.2, 0.0
    settings = {
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "quiet_budget_s": args.quiet_budget,
    }
    result = measure(args.trials, settings)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "oip.json").write_text(json.dumps(result, indent=2) + "\n")
    text = render(result)
    (args.out_dir / "oip.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
