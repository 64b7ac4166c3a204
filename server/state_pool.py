"""Every session's recurrent state in preallocated tensors on the model's device, one per state
tensor the model declares (config.state_names: h and c for an LSTM, h for a GRU).

A session owns a slot: column `slot` of each tensor. A batch gathers its slots' columns, runs one
forward, and scatters the new state back; there are no per-session tensors. All reads and
writes of the state happen on the engine's worker thread. Slot bookkeeping (which are free)
happens on the event loop; a slot is zeroed (on the worker) before it returns to the free list,
so no state can leak into its next owner.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

State = tuple[torch.Tensor, ...]  # one tensor per state name, in the declared order


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
        names: Sequence[str] = ("h", "c"),
    ) -> None:
        # One row more than sessions: the scratch slot, which padding rows of a batch write to.
        shape = (num_layers, capacity + 1, hidden_size)
        self.names = tuple(names)
        self.tensors: State = tuple(
            torch.zeros(shape, device=device, dtype=dtype) for _ in self.names
        )  # each (L, capacity + 1, H)
        self.capacity = capacity
        self.scratch_slot = capacity
        self._free = list(range(capacity - 1, -1, -1))  # pop() hands out slot 0 first

    @property
    def h(self) -> torch.Tensor:
        """The hidden state, every cell's first: (L, capacity + 1, H)."""
        return self.tensors[0]

    def free(self) -> None:
        """Give the tensors' memory back (the model version is unloaded); nothing may use the
        pool afterwards."""
        empty = torch.empty(0, device=self.h.device, dtype=self.h.dtype)
        self.tensors = tuple(empty for _ in self.names)
        self._free = []

    @property
    def nbytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.tensors)

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
        for tensor in self.tensors:
            tensor.index_fill_(1, index, 0.0)

    def gather(self, slots: torch.Tensor) -> State:
        return tuple(tensor.index_select(1, slots) for tensor in self.tensors)  # (L, B, H) each

    def scatter(self, slots: torch.Tensor, state: State) -> None:
        for tensor, new in zip(self.tensors, state, strict=True):
            tensor.index_copy_(1, slots, new)

    def read(self, slots: list[int]) -> State:
        """Some slots' state, copied to the CPU in float32: (N, L, H) each."""
        index = torch.tensor(slots, device=self.h.device)
        return tuple(
            tensor.float().cpu().transpose(0, 1).contiguous() for tensor in self.gather(index)
        )

    def write(self, slots: list[int], state: State) -> None:
        """Set some slots' state from (L, N, H) tensors, one per name."""
        index = torch.tensor(slots, device=self.h.device)
        self.scatter(
            index, tuple(new.to(old) for new, old in zip(state, self.tensors, strict=True))
        )
