"""The LSTM written out gate by gate, as the equations go. Slow and plain on purpose: the tests
hold the fast nn.LSTM path (cuDNN / oneDNN) to it.

For each layer and timestep, with [h_{t-1}, x_t] the previous hidden state and this input:

    f_t = σ(W_f · [h_{t-1}, x_t] + b_f)        forget gate
    i_t = σ(W_i · [h_{t-1}, x_t] + b_i)        input gate
    C̃_t = tanh(W_C · [h_{t-1}, x_t] + b_C)     candidate cell
    C_t = f_t ⊙ C_{t-1} + i_t ⊙ C̃_t            cell update
    o_t = σ(W_o · [h_{t-1}, x_t] + b_o)        output gate
    h_t = o_t ⊙ tanh(C_t)                      hidden state

nn.LSTM stores the four gates stacked in the order (i, f, g=C̃, o) in weight_ih_l{k} (4H, in),
weight_hh_l{k} (4H, H), and two biases (4H,) that are simply added.
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


def reference_forward(
    model: SequenceModel, x: torch.Tensor, state: State | None = None
) -> tuple[torch.Tensor, State]:
    """SequenceModel.forward, one timestep and one layer at a time: x (B, T, I) -> y (B, T, O)."""
    config = model.config
    h, c = state if state is not None else model.init_state(x.shape[0])
    h, c = list(h.unbind(0)), list(c.unbind(0))  # num_layers x (B, H)
    x = (x - model.input_mean) * model.input_scale
    lstm = model.lstm
    outputs = []
    for t in range(x.shape[1]):
        layer_input = x[:, t]  # (B, I)
        for k in range(config.num_layers):
            h[k], c[k] = lstm_cell(
                layer_input,
                h[k],
                c[k],
                getattr(lstm, f"weight_ih_l{k}"),
                getattr(lstm, f"weight_hh_l{k}"),
                getattr(lstm, f"bias_ih_l{k}"),
                getattr(lstm, f"bias_hh_l{k}"),
            )
            layer_input = h[k]
        outputs.append(model.head(layer_input))  # (B, O)
    y = torch.stack(outputs, dim=1)  # (B, T, O)
    if config.is_classification:
        y = torch.softmax(y, dim=-1)
    return y, (torch.stack(h), torch.stack(c))
