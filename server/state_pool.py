"""Every session's (h, c) in one preallocated pair of tensors on the model's device.

A session owns a slot: column `slot` of h and c. A batch gathers its slots' columns, runs one
forward, and scatters the new state back; there are no per-session tensors. All reads and
writes of h and c happen on the engine's worker thread. Slot bookkeeping (which are free) happens
on the event loop; a slot is zeroed (on the worker) before it returns to the free list, so no
state can leak into its next owner.
"""

from __future__ import annotations

import torch


class SlotsExhausted(Exception):
    pass


class StatePool:
    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        capacity: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        # One row more than sessions: the scratch slot, which padding rows of a batch write to.
        shape = (num_layers, capacity + 1, hidden_size)
        self.h = torch.zeros(shape, device=device, dtype=dtype)  # (L, capacity + 1, H)
        self.c = torch.zeros(shape, device=device, dtype=dtype)  # (L, capacity + 1, H)
        self.capacity = capacity
        self.scratch_slot = capacity
        self._free = list(range(capacity - 1, -1, -1))  # pop() hands out slot 0 first

    def free(self) -> None:
        """Give the tensors' memory back (the model version is unloaded); nothing may use the
        pool afterwards."""
        self.h = self.c = torch.empty(0, device=self.h.device, dtype=self.h.dtype)
        self._free = []

    @property
    def nbytes(self) -> int:
        return self.h.nbytes + self.c.nbytes

    @property
    def in_use(self) -> int:
        return self.capacity - len(self._free)

    def allocate(self) -> int:
        """A zeroed slot (event loop)."""
        if not self._free:
            raise SlotsExhausted
        return self._free.pop()

    def release(self, slot: int) -> None:
        """Return a slot that zero() has cleared (event loop)."""
        self._free.append(slot)

    # The methods below run on the engine's worker thread only.

    def zero(self, slots: list[int]) -> None:
        index = torch.tensor(slots, device=self.h.device)
        self.h.index_fill_(1, index, 0.0)
        self.c.index_fill_(1, index, 0.0)

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.h.index_select(1, slots), self.c.index_select(1, slots)  # (L, B, H)

    def scatter(self, slots: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> None:
        self.h.index_copy_(1, slots, h)
        self.c.index_copy_(1, slots, c)

    def read(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Some slots' state, copied to the CPU in float32: (N, L, H) each."""
        index = torch.tensor(slots, device=self.h.device)
        h, c = self.gather(index)  # (L, N, H)
        return h.float().cpu().transpose(0, 1).contiguous(), c.float().cpu().transpose(
            0, 1
        ).contiguous()

    def write(self, slots: list[int], h: torch.Tensor, c: torch.Tensor) -> None:
        """Set some slots' state from (L, N, H) tensors."""
        index = torch.tensor(slots, device=self.h.device)
        self.scatter(index, h.to(self.h), c.to(self.c))
