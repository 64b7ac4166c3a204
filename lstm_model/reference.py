"""The LSTM and the GRU written out gate by gate, as the equations go. Slow and plain on
purpose: the tests hold the fast nn.LSTM and nn.GRU paths (cuDNN / oneDNN) to them.

For each layer and timestep, with [h_{t-1}, x_t] the previous hidden state and this input:

    f_t = σ(W_f · [h_{t-1}, x_t] + b_f)        forget gate
    i_t = σ(W_i · [h_{t-1}, x_t] + b_i)        input gate
    C̃_t = tanh(W_C · [h_{t-1}, x_t] + b_C)     candidate cell
    C_t = f_t ⊙ C_{t-1} + i_t ⊙ C̃_t            cell update
    o_t = σ(W_o · [h_{t-1}, x_t] + b_o)        output gate
    h_t = o_t ⊙ tanh(C_t)                      hidden state

nn.LSTM stores the four gates stacked in the order (i, f, g=C̃, o) in weight_ih_l{k} (4H, in),
weight_hh_l{k} (4H, H), and two biases (4H,) that are simply added.

The GRU, with the same notation (no cell: its state is h alone):

    r_t = σ(W_ir · x_t + b_ir + W_hr · h_{t-1} + b_hr)         reset gate
    z_t = σ(W_iz · x_t + b_iz + W_hz · h_{t-1} + b_hz)         update gate
    n_t = tanh(W_in · x_t + b_in + r_t ⊙ (W_hn · h_{t-1} + b_hn))   candidate state
    h_t = (1 - z_t) ⊙ n_t + z_t ⊙ h_{t-1}                      interpolation

nn.GRU stacks its three gates in the order (r, z, n), 3H rows. The reset gate scales the
hidden part of the candidate after its bias is added, so the two biases are not one here.
"""

from __future__ import annotations

import torch

from lstm_model.model import SequenceModel, State


def lstm_cell(
    x: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor,
    b_hh: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One timestep of one layer: x (B, in), h and c (B, H) -> new h, c (B, H)."""
    hidden = h.shape[-1]

    def gate(k: int) -> torch.Tensor:
        rows = slice(k * hidden, (k + 1) * hidden)
        return x @ w_ih[rows].T + b_ih[rows] + h @ w_hh[rows].T + b_hh[rows]  # (B, H)

    input_gate = torch.sigmoid(gate(0))
    forget_gate = torch.sigmoid(gate(1))
    candidate = torch.tanh(gate(2))
    output_gate = torch.sigmoid(gate(3))
    c_new = forget_gate * c + input_gate * candidate
    h_new = output_gate * torch.tanh(c_new)
    return h_new, c_new


def gru_cell(
    x: torch.Tensor,
    h: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor,
    b_hh: torch.Tensor,
) -> torch.Tensor:
    """One timestep of one GRU layer: x (B, in), h (B, H) -> new h (B, H)."""
    hidden = h.shape[-1]

    def from_input(k: int) -> torch.Tensor:
        rows = slice(k * hidden, (k + 1) * hidden)
        return x @ w_ih[rows].T + b_ih[rows]  # (B, H)

    def from_hidden(k: int) -> torch.Tensor:
        rows = slice(k * hidden, (k + 1) * hidden)
        return h @ w_hh[rows].T + b_hh[rows]  # (B, H)

    reset_gate = torch.sigmoid(from_input(0) + from_hidden(0))
    update_gate = torch.sigmoid(from_input(1) + from_hidden(1))
    candidate = torch.tanh(from_input(2) + reset_gate * from_hidden(2))
    return (1 - update_gate) * candidate + update_gate * h


def reference_forward(
    model: SequenceModel, x: torch.Tensor, state: State | None = None
) -> tuple[torch.Tensor, State]:
    """SequenceModel.forward, one timestep and one layer at a time: x (B, T, I) -> y (B, T, O)."""
    config = model.config
    state = state if state is not None else model.init_state(x.shape[0])
    layers = [list(tensor.unbind(0)) for tensor in state]  # per state tensor: L x (B, H)
    x = (x - model.input_mean) * model.input_scale
    rnn = model.rnn
    outputs = []
    for t in range(x.shape[1]):
        layer_input = x[:, t]  # (B, I)
        for k in range(config.num_layers):
            weights = [
                getattr(rnn, f"{name}_l{k}")
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            ]
            if config.cell == "lstm":
                h, c = layers
                h[k], c[k] = lstm_cell(layer_input, h[k], c[k], *weights)
            else:
                (h,) = layers
                h[k] = gru_cell(layer_input, h[k], *weights)
            layer_input = h[k]
        outputs.append(model.head(layer_input))  # (B, O)
    y = torch.stack(outputs, dim=1)  # (B, T, O)
    if config.is_classification:
        y = torch.softmax(y, dim=-1)
    return y, tuple(torch.stack(tensor) for tensor in layers)
