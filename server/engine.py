"""The engine: how a batch runs. Gathers the batch's state by slot, runs the model once,
scatters the state back, and returns each row's outputs. It runs on one worker thread, so the
event loop keeps serving I/O while the device computes.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from lstm_model.checkpoint import LoadedModel
from server.graphs import OneStepRunner
from server.state_pool import StatePool

log = logging.getLogger(__name__)
T = TypeVar("T")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(slots=True)
class StepWork:
    """One session's chunk in a batch."""

    slot: int
    inputs: np.ndarray  # (T, input_size) float32; T may be 0 (a reset alone)
    reset: bool = False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this host (try auto or cpu)")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(
            f"--device {name}: this host has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        )
    return device


def default_torch_threads() -> int:
    """All cores but one: the event loop needs a core of its own to keep answering."""
    return max(1, (os.cpu_count() or 2) - 1)


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        capacity: int,
        device: torch.device,
        dtype: torch.dtype,
        max_batch_size: int = 256,
        one_step_graphs: bool | None = None,  # None: on CUDA only
        torch_threads: int = 0,  # 0: default_torch_threads()
    ) -> None:
        self.model = loaded.model.to(device=device, dtype=dtype).eval()
        if device.type == "cuda":
            self.model.lstm.flatten_parameters()  # one contiguous weight buffer for cuDNN
        self.fingerprint = loaded.fingerprint
        self.config = loaded.model.config
        self.device = device
        self.dtype = dtype
        self.pool = StatePool(
            self.config.num_layers, self.config.hidden_size, capacity, device, dtype
        )
        # torch's thread count is per thread: set it in the worker that runs the model.
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="engine",
            initializer=torch.set_num_threads,
            initargs=(torch_threads or default_torch_threads(),),
        )
        use_graphs = device.type == "cuda" if one_step_graphs is None else one_step_graphs
        self.one_step = (
            OneStepRunner(self.model, self.pool, max_batch_size, capture=device.type == "cuda")
            if use_graphs
            else None
        )
        if self.one_step is not None and device.type == "cuda":
            self.one_step.warm_up()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn on the engine's worker thread, in order with the batches."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    @torch.inference_mode()
    def step(self, batch: Sequence[StepWork]) -> list[np.ndarray]:
        """Apply each work's chunk to its slot's state; each row's outputs (T, output_size)."""
        resets = [w.slot for w in batch if w.reset]
        if resets:
            self.pool.zero(torch.tensor(resets, device=self.device))
        empty = np.zeros((0, self.config.output_size), dtype=np.float32)
        outputs = [empty] * len(batch)
        stepped = [i for i, w in enumerate(batch) if len(w.inputs)]
        if stepped:
            y = self._forward([batch[i] for i in stepped])  # (B, T_max, O)
            for i, y_row in zip(stepped, y, strict=True):
                # A view of the batch's outputs: replay buffers copy what they keep.
                outputs[i] = y_row[: len(batch[i].inputs)]
        return outputs

    def _forward(self, rows: list[StepWork]) -> np.ndarray:
        lengths = [len(w.inputs) for w in rows]
        longest = max(lengths)
        if min(lengths) == longest:
            x = np.stack([w.inputs for w in rows])  # (B, T, I)
            packed_lengths = None
        else:
            x = np.zeros((len(rows), longest, self.config.input_size), dtype=np.float32)
            for b, w in enumerate(rows):
                x[b, : len(w.inputs)] = w.inputs
            packed_lengths = torch.tensor(lengths)
        slots = torch.tensor([w.slot for w in rows], device=self.device)
        x_dev = torch.from_numpy(x).to(self.device, self.dtype, non_blocking=True)
        if self.one_step is not None and longest == 1:
            return self.one_step.run(x_dev, slots).float().cpu().numpy()  # (B, 1, O)
        h, c = self.pool.gather(slots)  # (L, B, H)
        y, (h, c) = self.model(x_dev, (h, c), packed_lengths)  # y (B, T_max, O)
        self.pool.scatter(slots, h, c)
        return y.float().cpu().numpy()

    @torch.inference_mode()
    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """A whole sequence (T, input_size) from zero state; no session state is touched."""
        if not len(inputs):
            return np.zeros((0, self.config.output_size), dtype=np.float32)
        if not inputs.flags.writeable:  # packed bytes decode to a read-only view
            inputs = inputs.copy()
        x = torch.from_numpy(inputs).to(self.device, self.dtype)[None]  # (1, T, I)
        y, _ = self.model(x)  # (1, T, O)
        return y[0].float().cpu().numpy()
