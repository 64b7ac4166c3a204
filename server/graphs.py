"""One-step batches at a fixed set of sizes. On CUDA each size's gather-forward-scatter is
captured once as a CUDA graph and replayed: a one-timestep LSTM step is dozens of tiny kernels,
and launching them one by one from Python costs more than running them.

A batch of n sessions runs in the smallest bucket >= n; the unused rows read zeros and write
their state to the pool's scratch slot, which no session owns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lstm_model.model import SequenceModel
from server.state_pool import StatePool

log = logging.getLogger(__name__)


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
    graph: torch.cuda.CUDAGraph | None = None


class OneStepRunner:
    def __init__(
        self, model: SequenceModel, pool: StatePool, max_batch_size: int, capture: bool
    ) -> None:
        self.model = model
        self.pool = pool
        self.capture = capture
        self.sizes = bucket_sizes(max_batch_size)
        self._buckets: dict[int, _Bucket] = {}

    def warm_up(self) -> None:
        """Build (and on CUDA capture) every bucket now rather than on first use."""
        for size in self.sizes:
            self._bucket(size)

    @torch.inference_mode()
    def run(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """x (n, 1, input_size), slots (n,) on the device -> y (n, 1, output_size)."""
        n = x.shape[0]
        bucket = self._bucket(next(size for size in self.sizes if size >= n))
        bucket.x[:n].copy_(x)
        bucket.x[n:].zero_()
        bucket.slots[:n].copy_(slots)
        bucket.slots[n:].fill_(self.pool.scratch_slot)
        if bucket.graph is not None:
            bucket.graph.replay()
        else:
            self._step(bucket)
        return bucket.y[:n]

    def _step(self, bucket: _Bucket) -> None:
        h, c = self.pool.gather(bucket.slots)  # (L, B, H)
        y, (h, c) = self.model(bucket.x, (h, c))  # (B, 1, O)
        self.pool.scatter(bucket.slots, h, c)
        bucket.y.copy_(y)

    def _bucket(self, size: int) -> _Bucket:
        bucket = self._buckets.get(size)
        if bucket is None:
            bucket = self._buckets[size] = self._new_bucket(size)
        return bucket

    @torch.inference_mode()
    def _new_bucket(self, size: int) -> _Bucket:
        config, weight = self.model.config, self.model.head.weight
        bucket = _Bucket(
            x=torch.zeros(size, 1, config.input_size, device=weight.device, dtype=weight.dtype),
            slots=torch.full((size,), self.pool.scratch_slot, device=weight.device),
            y=torch.zeros(size, 1, config.output_size, device=weight.device, dtype=weight.dtype),
        )
        if self.capture:
            bucket.graph = self._capture(bucket)
        return bucket

    def _capture(self, bucket: _Bucket) -> torch.cuda.CUDAGraph | None:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up: cuDNN picks its kernels and workspace
                    self._step(bucket)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step(bucket)
            return graph
        except RuntimeError as exc:  # run eagerly rather than not at all
            log.warning(
                "CUDA graph capture failed for batch size %d (%s); running eagerly",
                bucket.x.shape[0],
                exc,
            )
            return None
