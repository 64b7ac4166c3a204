"""The engine alone, no server: the host time `Engine.step` spends per row beyond the model's
compute, and the one-step kernel (nn.LSTM against the fused step) at a few batch sizes.

    python -m bench.engine_step            # prints both tables (a few seconds on a CPU)

`bench.run` records the same figures in docs/benchmarks.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lstm_model.checkpoint import LoadedModel
from lstm_model.cli import init_model
from lstm_model.fused import FusedStep
from server.engine import Engine, StepWork, default_torch_threads

TINY = {"input_size": 8, "hidden_size": 8, "num_layers": 2, "output_size": 4}
INIT256 = {"input_size": 32, "hidden_size": 256, "num_layers": 2, "output_size": 8}
KERNEL_SIZES = (1, 64, 1024)


def median_s(fn: Callable[[], Any], repeats: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_overhead(rows: int = 1024, repeats: int = 200, **shape: int) -> dict[str, Any]:
    """`Engine.step` of `rows` one-step rows, against the same batch's compute alone (state
    gathered, one step, state scattered, on tensors already built): the difference per row is
    the host work the engine adds."""
    config = {**TINY, **shape}
    model = init_model(**config)
    loaded = LoadedModel(model, "bench", Path("."))
    engine = Engine(loaded, rows, torch.device("cpu"), torch.float32, rows)
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((rows, 1, config["input_size"]), dtype=np.float32)
    batch = [StepWork(slot, inputs[slot]) for slot in range(rows)]
    x, slots = torch.from_numpy(inputs), torch.arange(rows)

    def compute_alone() -> None:
        with torch.inference_mode():
            engine.one_step.run(x, slots)  # gather, the kernel, scatter

    step = engine.run_on_worker(lambda: median_s(lambda: engine.step(batch), repeats))
    alone = engine.run_on_worker(lambda: median_s(compute_alone, repeats))
    engine.close()
    return {
        "rows": rows,
        "model": config,
        "torch_threads": engine.torch_threads,
        "kernel": engine.one_step.kernel_for(rows),
        "step_s": step,
        "compute_s": alone,
        "host_us_per_row": (step - alone) / rows * 1e6,
    }


def kernel_times(threads: int, repeats: int = 50, **shape: int) -> list[dict[str, Any]]:
    """nn.LSTM's one-step forward against FusedStep's, at KERNEL_SIZES rows."""
    torch.set_num_threads(threads)
    model = init_model(**shape)
    fused = FusedStep(model)
    rows = []
    for size in KERNEL_SIZES:
        x = torch.randn(size, 1, shape["input_size"])  # (B, 1, I)
        h, c = model.init_state(size)  # (L, B, H)
        with torch.inference_mode():
            lstm = median_s(lambda x=x, h=h, c=c: model(x, (h, c)), repeats)
            step = median_s(lambda x=x, h=h, c=c: fused(x[:, 0], h, c), repeats)
        rows.append(
            {"rows": size, "hidden": shape["hidden_size"], "threads": threads,
             "nn_lstm_s": lstm, "fused_s": step}
        )  # fmt: skip
    return rows


def run_all(repeats: int = 200) -> dict[str, Any]:
    threads = sorted({1, default_torch_threads(), torch.get_num_threads()})
    kernel_repeats = max(5, repeats // 4)
    kernels = [
        row
        for shape in (TINY, INIT256)
        for t in threads
        for row in kernel_times(t, kernel_repeats, **shape)
    ]
    return {"step_overhead": step_overhead(repeats=repeats), "kernels": kernels}


def overhead_lines(doc: dict[str, Any]) -> list[str]:
    o = doc["step_overhead"]
    return [
        f"`Engine.step` of {o['rows']:,} one-step rows (model {o['model']['hidden_size']} hidden × "
        f"{o['model']['num_layers']} layers, {o['torch_threads']} torch thread(s), kernel "
        f"`{o['kernel']}`): {o['step_s'] * 1e6:,.0f} µs median; the same batch's compute alone "
        f"{o['compute_s'] * 1e6:,.0f} µs; host work **{o['host_us_per_row']:.2f} µs per row**.",
    ]


def kernel_table(doc: dict[str, Any]) -> list[str]:
    lines = [
        "| hidden | torch threads | rows | nn.LSTM µs | fused µs | nn.LSTM / fused |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in doc["kernels"]:
        lines.append(
            f"| {r['hidden']} | {r['threads']} | {r['rows']:,} | {r['nn_lstm_s'] * 1e6:,.1f} "
            f"| {r['fused_s'] * 1e6:,.1f} | {r['nn_lstm_s'] / r['fused_s']:.2f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_step", description=__doc__)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    doc = run_all(args.repeats)
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print("\n".join([*overhead_lines(doc), "", *kernel_table(doc)]))


if __name__ == "__main__":
    main()
