"""SequenceModel: input normalisation, a stack of recurrent layers (LSTM or GRU) and a head,
stepped chunk by chunk.

The state (config.state_names: `(h, c)` for an LSTM, `(h,)` for a GRU) is passed in and handed
back, so a caller can feed a sequence in any chunking and get the same outputs as one pass: this
is what lets a server keep each session's state between messages.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lstm_model.config import LSTMConfig

State = tuple[torch.Tensor, ...]  # config.state_names' tensors, each (num_layers, B, hidden)
RNN_CLASSES: dict[str, type[nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU}


class SequenceModel(nn.Module):
    def __init__(self, config: LSTMConfig) -> None:
        super().__init__()
        self.config = config
        # Named after the cell (lstm.*, gru.* in the checkpoint): an LSTM's keys as before GRUs.
        rnn = RNN_CLASSES[config.cell](
            input_size=config.input_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
        )
        self.add_module(config.cell, rnn)
        self.head = nn.Linear(config.hidden_size, config.output_size)
        # Normalisation lives in the model (not persisted: config.json holds it), so callers
        # send raw features. Identity when the config has none.
        mean = torch.tensor(config.input_mean or [0.0] * config.input_size)
        std = torch.tensor(config.input_std or [1.0] * config.input_size)
        self.register_buffer("input_mean", mean, persistent=False)  # (I,)
        self.register_buffer("input_scale", 1.0 / std, persistent=False)  # (I,)

    @property
    def rnn(self) -> nn.RNNBase:
        """The recurrent layers: nn.LSTM or nn.GRU."""
        return getattr(self, self.config.cell)

    def init_state(self, batch: int) -> State:
        """Zero state for `batch` sequences, on the model's device and dtype."""
        weight = self.head.weight
        shape = (self.config.num_layers, batch, self.config.hidden_size)
        return tuple(
            torch.zeros(shape, device=weight.device, dtype=weight.dtype)
            for _ in self.config.state_names
        )

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
        lstm = self.config.cell == "lstm"
        carried = tuple(state) if lstm else state[0]  # nn.LSTM takes (h, c), nn.GRU h
        if lengths is None:
            hidden, carried = self.rnn(x, carried)  # (B, T, H)
        else:
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            packed_out, carried = self.rnn(packed, carried)
            hidden, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=x.shape[1])
        return self.head(hidden), (tuple(carried) if lstm else (carried,))  # (B, T, O)
