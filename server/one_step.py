"""One-step batches: the kernel that runs them, and on CUDA a captured graph per batch size.

Two kernels compute one timestep: `nn.LSTM` through the model (the default; for a GRU model, its
nn.GRU), and, for an LSTM, `FusedStep` (lstm_model/fused.py), one `addmm` per layer. A GRU has
no fused step: it runs the module whatever --one-step-kernel says. On a CPU the fused step is
2-4x faster for small batches and slower for large ones (docs/performance.md); `fastest` times
both at every bucket size, a power of two, at start and keeps the faster for the batches that
fall in it. The fused
step is as close to float64 as nn.LSTM is, but rounds differently, and a recurrence amplifies
that: on the bundled model a stream stepped by it drifts past 1e-5 from nn.LSTM offline within
ten steps. So nn.LSTM, whose outputs do not depend on how a stream is chunked, is the default.

On CUDA each bucket's gather-step-scatter is captured once as a CUDA graph and replayed: a
one-timestep step is dozens of tiny kernels, and launching them one by one from Python costs
more than running them. A batch of n sessions runs in the smallest bucket >= n; the unused rows
read zeros and write their state to the pool's scratch slot, which no session owns. On the CPU
a batch runs at its own size.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lstm_model.fused import FusedStep
from lstm_model.model import SequenceModel
from server.state_pool import State, StatePool

log = logging.getLogger(__name__)
KERNELS = ("nn.LSTM", "fused")  # nn.LSTM: the model's own recurrent module (nn.GRU for a GRU)
CHOICES = (*KERNELS, "fastest")
# x (B, 1, I), the state's tensors (L, B, H) each -> y (B, 1, O), the new state
Kernel = Callable[[torch.Tensor, State], tuple[torch.Tensor, State]]


def bucket_sizes(max_batch_size: int) -> list[int]:
    """Powers of two from 1 to the first one >= max_batch_size."""
    sizes = [1]
    while sizes[-1] < max_batch_size:
        sizes.append(sizes[-1] * 2)
    return sizes


@dataclass
class _Bucket:
    x: torch.Tensor  # (B, 1, input_size) static input
    slots: torch.Tensor  # (B,) static slot indices
    y: torch.Tensor  # (B, 1, output_size) static output
    kernel: str = "nn.LSTM"
    graph: torch.cuda.CUDAGraph | None = None


class OneStepRunner:
    def __init__(
        self,
        network: SequenceModel,
        pool: StatePool,
        max_batch_size: int,
        capture: bool,
        kernel: str = "nn.LSTM",  # or fused, or fastest: the faster per bucket, timed at start
        pad: bool | None = None,  # run padded to the bucket; None: when capturing
    ) -> None:
        if kernel not in CHOICES:
            raise ValueError(f"one-step kernel: expected one of {CHOICES}, got {kernel!r}")
        self.network = network  # the nn.Module
        self.pool = pool
        self.capture = capture
        self.pad = capture if pad is None else pad or capture
        self.sizes = bucket_sizes(max_batch_size)
        self._kernels: dict[str, Kernel] = {"nn.LSTM": self._module}
        if network.config.cell == "lstm":
            self._fused = FusedStep(network)
            self._kernels["fused"] = self._fused_step
        elif kernel != "nn.LSTM":
            log.info("one-step kernel: a %s has no fused step; it runs nn.GRU", network.config.cell)
            kernel = "nn.LSTM"
        self._forced = None if kernel == "fastest" else kernel
        self._buckets: dict[int, _Bucket] = {}

    def warm_up(self) -> None:
        """Build every bucket now (choosing its kernel, and on CUDA capturing it) rather than on
        first use. Runs on the thread, and with the torch threads, that will run the batches."""
        for size in self.sizes:
            self._bucket(size)
        self.pool.zero([self.pool.scratch_slot])  # timing the kernels wrote to it

    def kernel_for(self, n: int) -> str:
        return self._bucket(self.bucket_of(n)).kernel

    def bucket_of(self, n: int) -> int:
        return next(size for size in self.sizes if size >= n)

    @torch.inference_mode()
    def run(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """x (n, 1, input_size), slots (n,) on the device -> y (n, 1, output_size)."""
        n = x.shape[0]
        bucket = self._bucket(self.bucket_of(n))
        if not self.pad:  # at the batch's own size
            state = self.pool.gather(slots)  # (L, n, H) each
            y, state = self._kernels[bucket.kernel](x, state)
            self.pool.scatter(slots, state)
            return y
        bucket.x[:n].copy_(x, non_blocking=True)
        bucket.x[n:].zero_()
        bucket.slots[:n].copy_(slots, non_blocking=True)
        bucket.slots[n:].fill_(self.pool.scratch_slot)
        if bucket.graph is not None:
            bucket.graph.replay()
        else:
            self._step(bucket, bucket.kernel)
        return bucket.y[:n] if bucket.y.is_cuda else bucket.y[:n].clone()  # the next batch reuses y

    def _module(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        return self.network(x, state)  # (B, 1, O), the new state

    def _fused_step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        h, c = state
        y, h, c = self._fused(x[:, 0], h, c)  # y (B, O); h, c updated in place
        return y[:, None], (h, c)  # (B, 1, O)

    def _step(self, bucket: _Bucket, kernel: str) -> None:
        state = self.pool.gather(bucket.slots)  # (L, B, H) each
        y, state = self._kernels[kernel](bucket.x, state)  # (B, 1, O)
        self.pool.scatter(bucket.slots, state)
        bucket.y.copy_(y)

    def _bucket(self, size: int) -> _Bucket:
        bucket = self._buckets.get(size)
        if bucket is None:
            bucket = self._buckets[size] = self._new_bucket(size)
        return bucket

    @torch.inference_mode()
    def _new_bucket(self, size: int) -> _Bucket:
        config, weight = self.network.config, self.network.head.weight
        bucket = _Bucket(
            x=torch.zeros(size, 1, config.input_size, device=weight.device, dtype=weight.dtype),
            slots=torch.full((size,), self.pool.scratch_slot, device=weight.device),
            y=torch.zeros(size, 1, config.output_size, device=weight.device, dtype=weight.dtype),
        )
        graphs = {kernel: self._capture(bucket, kernel) if self.capture else None
                  for kernel in ([self._forced] if self._forced else self._kernels)}  # fmt: skip
        bucket.kernel = min(graphs, key=lambda kernel: self._time(bucket, kernel, graphs[kernel]))
        bucket.graph = graphs[bucket.kernel]
        log.debug("one-step batches of up to %d rows run %s", size, bucket.kernel)
        return bucket

    def _time(self, bucket: _Bucket, kernel: str, graph: torch.cuda.CUDAGraph | None) -> float:
        """Median seconds of one step of the bucket on the scratch slot (no session's state)."""
        if self._forced:
            return 0.0
        run = graph.replay if graph is not None else lambda: self._step(bucket, kernel)
        device = bucket.x.device
        sync = (lambda: torch.cuda.synchronize(device)) if bucket.x.is_cuda else lambda: None
        times = []
        for _ in range(4):  # the first warms up
            sync()
            start = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    def _capture(self, bucket: _Bucket, kernel: str) -> torch.cuda.CUDAGraph | None:
        try:
            side = torch.cuda.Stream(device=bucket.x.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up: cuDNN picks its kernels and workspace
                    self._step(bucket, kernel)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step(bucket, kernel)
            return graph
        except RuntimeError as exc:  # run eagerly rather than not at all
            log.warning(
                "CUDA graph capture of the %s step failed for batch size %d (%s); running eagerly",
                kernel,
                bucket.x.shape[0],
                exc,
            )
            return None
