"""The engine: how a batch runs. Gathers the batch's state by slot, runs the model once,
scatters the state back, and returns each row's outputs. It runs on one worker thread, so the
event loop keeps serving I/O while the device computes.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from lstm_model.checkpoint import LoadedModel
from lstm_model.gru_sequence import GruSequence
from lstm_model.model import State
from server.one_step import OneStepRunner
from server.state_pool import StatePool
from server.worker import Worker

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


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: taskset, a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_torch_threads() -> int:
    """A one-step batch's threads by default: all cores but the event loop's."""
    return ThreadPolicy().threads(rows=1, timesteps=1)


CHUNKED_STEPS = 8  # timesteps per row from which a batch's compute outweighs its messages


@dataclass(frozen=True)
class ThreadPolicy:
    """How many torch threads a batch runs on. Fixed when --torch-threads is set; otherwise a
    batch of short chunks (one-step traffic, where the event loop is busy with a message per
    timestep) leaves the loop a core, and a batch of long chunks (CHUNKED_STEPS or more
    timesteps per row, where the loop idles while the model computes) takes every core."""

    fixed: int = 0
    cores: int = field(default_factory=usable_cores)

    def threads(self, rows: int, timesteps: int) -> int:
        if self.fixed:
            return self.fixed
        if timesteps >= CHUNKED_STEPS * rows:
            return self.cores
        return max(1, self.cores - 1)


@dataclass(slots=True)
class StepOutputs:
    """What a batch gave: each row's outputs (T_b, output_size), views of one batch array, and
    that array (B, T, output_size) when every row had the same length T (the usual)."""

    rows: list[np.ndarray]
    uniform: np.ndarray | None = None


def _init_worker(threads: int, device: torch.device) -> None:
    torch.set_num_threads(threads)
    if device.type == "cuda":  # streams and graphs made on this thread belong to this device
        torch.cuda.set_device(device)


class Staging:
    """Host buffers reused batch after batch (pinned on CUDA, so one copy reaches the device):
    a batch's inputs are joined straight into one, its slot indices into another."""

    def __init__(self, input_size: int, device: torch.device) -> None:
        self._pin = device.type == "cuda"
        self._input_size = input_size
        self._inputs = self._alloc((0, input_size), torch.float32)
        self._slots = self._alloc((0,), torch.int64)

    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=self._pin)

    def inputs(self, arrays: list[np.ndarray], rows: int) -> torch.Tensor:
        """The arrays (T_b, I) joined into the first `rows` rows: (rows, I)."""
        if len(self._inputs) < rows:
            self._inputs = self._alloc((max(rows, 2 * len(self._inputs)), self._input_size),
                                       torch.float32)  # fmt: skip
        np.concatenate(arrays, out=self._inputs[:rows].numpy())
        return self._inputs[:rows]

    def slots(self, slots: list[int]) -> torch.Tensor:
        if len(self._slots) < len(slots):
            self._slots = self._alloc((max(len(slots), 2 * len(self._slots)),), torch.int64)
        view = self._slots[: len(slots)]
        view.numpy()[:] = slots
        return view


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        capacity: int,
        device: torch.device,
        dtype: torch.dtype,
        max_batch_size: int = 256,
        one_step_graphs: bool | None = None,  # None: on CUDA only
        torch_threads: int = 0,  # 0: per batch (ThreadPolicy)
        one_step_kernel: str = "nn.LSTM",  # nn.LSTM | fused | fastest (server/one_step.py)
    ) -> None:
        self.network = loaded.model.to(device=device, dtype=dtype).eval()  # the nn.Module
        if device.type == "cuda":
            self.network.rnn.flatten_parameters()  # one contiguous weight buffer for cuDNN
        # What runs a batch of multi-step chunks: the module, or for a GRU on the CPU the
        # faster kernel written for it (lstm_model/gru_sequence.py).
        self.chunk_runner: Callable[..., tuple[torch.Tensor, State]] = self.network
        if self.network.config.cell == "gru" and device.type == "cpu":
            self.chunk_runner = GruSequence(self.network)
        self.fingerprint = loaded.fingerprint
        self.config = loaded.model.config
        self.device = device
        self.dtype = dtype
        self.pool = StatePool(
            self.config.num_layers,
            self.config.hidden_size,
            capacity,
            device,
            dtype,
            self.config.state_names,  # the state the model declares: h and c, or h
        )
        self.threads = ThreadPolicy(torch_threads)
        self.torch_threads = self.threads.threads(rows=1, timesteps=1)  # a one-step batch's
        self._threads_now = self.torch_threads
        # torch's thread count (and current CUDA device) is per thread: set them in the worker
        # that runs the model.
        self._worker = Worker("engine", _init_worker, (self.torch_threads, device))
        self._staging = Staging(self.config.input_size, device)
        self._no_outputs = np.zeros((0, self.config.output_size), dtype=np.float32)
        graphs = device.type == "cuda" if one_step_graphs is None else one_step_graphs
        self.one_step = OneStepRunner(
            self.network, self.pool, max_batch_size, capture=graphs and device.type == "cuda",
            kernel=one_step_kernel, pad=graphs,
        )  # fmt: skip
        self.run_on_worker(self.one_step.warm_up)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn on the engine's worker thread, in order with the batches."""
        return await self.submit(fn, *args)

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Hand fn to the worker thread now (call() does when first awaited): whatever is
        handed over after this returns runs after fn."""
        return self._worker.submit(fn, *args)

    def run_on_worker(self, fn: Callable[[], T]) -> T:
        """Run fn on the engine's worker thread and wait for it (no event loop needed)."""
        return self._worker.run(fn)

    def close(self) -> None:
        """Finish the work handed over, stop the worker, give the state pool's memory back."""
        self._worker.shutdown()
        self.pool.free()

    @torch.inference_mode()
    def step(self, batch: Sequence[StepWork]) -> StepOutputs:
        """Apply each work's chunk to its slot's state; each row's outputs (T, output_size)."""
        resets = [w.slot for w in batch if w.reset]
        if resets:
            self.pool.zero(resets)
        inputs = [w.inputs for w in batch]
        lengths = list(map(len, inputs))
        longest = max(lengths, default=0)
        if not longest:
            return StepOutputs([self._no_outputs] * len(batch))
        if min(lengths) < longest:
            return StepOutputs(self._step_mixed(batch, lengths))
        x = self._staging.inputs(inputs, len(batch) * longest).view(len(batch), longest, -1)
        y = self._forward(x, self._staging.slots([w.slot for w in batch]))  # (B, T, O)
        return StepOutputs(list(y), y)

    def _step_mixed(self, batch: Sequence[StepWork], lengths: list[int]) -> list[np.ndarray]:
        """Rows of different lengths (or none): padded to the longest, run packed."""
        stepped = [i for i, n in enumerate(lengths) if n]
        longest = max(lengths)
        x = np.zeros((len(stepped), longest, self.config.input_size), dtype=np.float32)
        for b, i in enumerate(stepped):
            x[b, : lengths[i]] = batch[i].inputs
        packed = torch.tensor([lengths[i] for i in stepped])
        slots = self._staging.slots([batch[i].slot for i in stepped])
        y = self._forward(torch.from_numpy(x), slots, packed)  # (B', T_max, O)
        outputs = [self._no_outputs] * len(batch)
        for i, y_row in zip(stepped, y, strict=True):
            outputs[i] = y_row[: lengths[i]]
        return outputs

    def _forward(
        self, x: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> np.ndarray:
        """x (B, T, I) and slots (B,) on the host -> y (B, T, O) float32 on the host."""
        self._use_threads(self.threads.threads(x.shape[0], x.shape[0] * x.shape[1]))
        x_dev = x.to(self.device, self.dtype, non_blocking=True)
        slots_dev = slots.to(self.device, non_blocking=True)
        if x.shape[1] == 1 and lengths is None:
            y = self.one_step.run(x_dev, slots_dev)  # (B, 1, O)
        else:
            state = self.pool.gather(slots_dev)  # (L, B, H) each
            y, state = self.chunk_runner(x_dev, state, lengths)  # (B, T, O)
            self.pool.scatter(slots_dev, state)
        return self._to_host(y)

    def _use_threads(self, threads: int) -> None:
        if threads != self._threads_now:  # cheap (well under a microsecond), but not free
            torch.set_num_threads(threads)
            self._threads_now = threads

    def _to_host(self, y: torch.Tensor) -> np.ndarray:
        """A fresh host array for each batch: its rows are answered after the next batch has
        started, so they cannot live in a buffer that batch reuses."""
        if y.device.type == "cpu" and y.dtype == torch.float32:
            return y.numpy()  # the model's own output tensor: no copy
        host = torch.empty(y.shape, dtype=torch.float32, pin_memory=y.is_cuda)
        host.copy_(y, non_blocking=True)
        if y.is_cuda:
            torch.cuda.current_stream(y.device).synchronize()
        return host.numpy()

    @torch.inference_mode()
    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """A whole sequence (T, input_size) from zero state; no session state is touched."""
        if not len(inputs):
            return np.zeros((0, self.config.output_size), dtype=np.float32)
        if not inputs.flags.writeable:  # packed bytes decode to a read-only view
            inputs = inputs.copy()
        x = torch.from_numpy(inputs).to(self.device, self.dtype)[None]  # (1, T, I)
        y, _ = self.network(x)  # (1, T, O)
        return y[0].float().cpu().numpy()
