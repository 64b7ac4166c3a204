"""`lstm-client demo`: stream the bundled model's held-out recordings through a live server,
one timestep per message, and report per-timestep accuracy and per-message latency.

The recordings are data (safetensors, read with numpy): the demo runs from a client-only
install, with no torch.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open

from lstm_stream.client.aio import AsyncStreamingClient
from lstm_stream.client.errors import UsageError
from lstm_stream.client.options import ClientOptions

CHECKPOINT_STEPS = (10, 25, 50, 100)  # the model card's table rows
DEMO_MODEL = "basic-motions"


@dataclass(frozen=True)
class HeldOut:
    inputs: np.ndarray  # (N, T, input_size) float32, raw features
    labels: np.ndarray  # (N,) int64, class indices
    source: str


def heldout_path() -> Path:
    """The bundled model's held-out recordings, found without importing the model package
    (which needs torch)."""
    spec = importlib.util.find_spec("lstm_model")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the demo's recordings ship with the lstm_model package, not found")
    return Path(next(iter(spec.submodule_search_locations))) / "bundled" / "heldout.safetensors"


def load_heldout(path: Path | None = None) -> HeldOut:
    with safe_open(str(path or heldout_path()), framework="np") as f:
        source = (f.metadata() or {}).get("source", "")
        return HeldOut(f.get_tensor("inputs"), f.get_tensor("labels"), source)


def accuracy_by_step(outputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """outputs (N, T, classes), labels (N,) -> accuracy after each step (T,)."""
    predicted = outputs.argmax(axis=-1)  # (N, T)
    return (predicted == labels[:, None]).mean(axis=0)  # (T,)


def format_accuracy_table(accuracy: dict[int, float], count: int) -> str:
    lines = ["| timesteps seen | held-out accuracy |", "| ---: | ---: |"]
    lines += [f"| {t} | {acc:.1%} ({round(acc * count)}/{count}) |" for t, acc in accuracy.items()]
    return "\n".join(lines)


def run_demo(
    options: ClientOptions, concurrency: int, model: str = "", model_version: int = 0
) -> str:
    """The demo's report: what was streamed, the accuracy table, latency quantiles."""
    heldout = load_heldout()
    streamed = stream_recordings(options, heldout.inputs, concurrency, model, model_version)
    outputs, latencies = asyncio.run(streamed)
    by_step = accuracy_by_step(outputs, heldout.labels)
    accuracy = {t: float(by_step[t - 1]) for t in CHECKPOINT_STEPS}
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) * 1e3
    return "\n".join(
        [
            f"streamed {len(heldout.labels)} held-out recordings ({heldout.source}), "
            f"one timestep per message, {concurrency} at a time",
            format_accuracy_table(accuracy, len(heldout.labels)),
            f"\nper-message latency over {len(latencies)} messages: "
            f"p50 {p50:.2f} ms, p95 {p95:.2f} ms, p99 {p99:.2f} ms",
        ]
    )


async def stream_recordings(
    options: ClientOptions,
    inputs: np.ndarray,
    concurrency: int,
    model: str = "",
    model_version: int = 0,
):
    count, steps, _ = inputs.shape
    progress = Progress(count * steps, enabled=sys.stderr.isatty())
    latencies: list[float] = []
    slots = asyncio.Semaphore(concurrency)

    async def one(client: AsyncStreamingClient, recording: np.ndarray) -> np.ndarray:
        async with slots:
            session = await client.open_session(model=model, model_version=model_version)
            rows = []
            for x in recording:
                started = time.perf_counter()
                rows.append(await session.step(x))
                latencies.append(time.perf_counter() - started)
                progress.advance()
            await session.close()
            return np.stack(rows)

    async with AsyncStreamingClient(options=options) as client:
        info = await client.info(model, model_version)
        if info.input_size != inputs.shape[2] or info.name != DEMO_MODEL:
            raise UsageError(
                f"the demo streams the bundled basic-motions recordings; the server "
                f"runs {info.name!r} (input_size {info.input_size})"
            )
        outputs = await asyncio.gather(*(one(client, r) for r in inputs))
    progress.finish()
    return np.stack(outputs), np.asarray(latencies)


class Progress:
    """A one-line progress bar on stderr, drawn only when it is a terminal."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self._drawn = -1

    def advance(self) -> None:
        self.done += 1
        percent = 100 * self.done // self.total
        if self.enabled and percent != self._drawn:
            self._drawn = percent
            bar = "#" * (percent // 4)
            print(
                f"\r[{bar:<25}] {percent:3d}% {self.done}/{self.total} timesteps",
                end="",
                file=sys.stderr,
                flush=True,
            )

    def finish(self) -> None:
        if self.enabled:
            print(file=sys.stderr)
