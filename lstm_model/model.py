"""SequenceModel: input normalisation, a stack of LSTM layers and a head, stepped chunk by chunk.

The state `(h, c)` is passed in and handed back, so a caller can feed a sequence in any chunking
and get the same outputs as one pass: this is what lets a server keep each session's state
between messages.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lstm_model.config import LSTMConfig

State = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (num_layers, B, hidden)


class SequenceModel(nn.Module):
    def __init__(self, config: LSTMConfig) -> None:
        super().__init__()
        self.config = config
        self.lstm = nn.LSTM(
            input_size=config.input_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
        )
        self.head = nn.Linear(config.hidden_size, config.output_size)
        # Normalisation lives in the model (not persisted: config.json holds it), so callers
        # send raw features. Identity when the config has none.
        mean = torch.tensor(config.input_mean or [0.0] * config.input_size)
        std = torch.tensor(config.input_std or [1.0] * config.input_size)
        self.register_buffer("input_mean", mean, persistent=False)  # (I,)
        self.register_buffer("input_scale", 1.0 / std, persistent=False)  # (I,)

    def init_state(self, batch: int) -> State:
        """Zero state for `batch` sequences, on the model's device and dtype."""
        weight = self.head.weight
        shape = (self.config.num_layers, batch, self.config.hidden_size)
        zeros = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
        return zeros, zeros.clone()

    def forward(
        self,
        x: torch.Tensor,
        state: State | None = None,
        lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, State]:
        """Run a chunk: x (B, T, input_size) -> y (B, T, output_size), new state.

        y is the head's output for regression and its softmax for classification. `lengths` (B,)
        lets rows of different lengths share a chunk: row b uses x[b, :lengths[b]], its returned
        state is the state after its own last step, and y past its length is padding.
        """
        y, state = self.logits(x, state, lengths)
        if self.config.is_classification:
            y = torch.softmax(y, dim=-1)
        return y, state

    def logits(
        self,
        x: torch.Tensor,
        state: State | None = None,
        lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, State]:
        """As forward, without the final softmax (what training's loss wants)."""
        if state is None:
            state = self.init_state(x.shape[0])
        x = (x - self.input_mean) * self.input_scale  # (B, T, I)
        if lengths is None:
            hidden, state = self.lstm(x, state)  # (B, T, H)
        else:
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            packed_out, state = self.lstm(packed, state)
            hidden, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=x.shape[1])
        return self.head(hidden), state  # (B, T, O)
