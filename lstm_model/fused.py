"""One timestep of a SequenceModel as a few matrix products: what a server runs for a batch of
one-step chunks.

`nn.LSTM` is a general sequence call: for a single timestep most of its cost is setup around
two small matrix products per layer. Here each layer's two products are one `addmm` against
the layer's weights concatenated once ([W_ih | W_hh] against [x | h]), and one sigmoid covers
all four gates: tanh(z) = 2·sigmoid(2z) - 1, so the candidate gate's rows are scaled by 2 once
(PyTorch's CPU sigmoid is several times faster than its tanh). The input normalisation is
folded into the first layer's weights. Outputs equal `SequenceModel.forward` on a (B, 1, I) chunk up
to float rounding (the tests hold them within 1e-5).
"""

from __future__ import annotations

import torch

from lstm_model.model import SequenceModel


class FusedStep:
    """y, (h, c) = step(x, h, c) for x (B, I) and h, c (L, B, H); h and c are updated in place."""

    def __init__(self, model: SequenceModel) -> None:
        config, lstm = model.config, model.lstm
        self.hidden = config.hidden_size
        self.classification = config.is_classification
        self.weights: list[torch.Tensor] = []  # per layer: (I_l + H, 4H), gates (i, f, o, g)
        self.biases: list[torch.Tensor] = []  # per layer: (4H,)
        with torch.no_grad():
            for layer in range(config.num_layers):
                w_ih = getattr(lstm, f"weight_ih_l{layer}")  # (4H, I_l), gates (i, f, g, o)
                w_hh = getattr(lstm, f"weight_hh_l{layer}")  # (4H, H)
                bias = getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")
                if layer == 0:  # W·((x - mean) * scale) = (W * scale)·x - W·(mean * scale)
                    bias = bias - w_ih @ (model.input_mean * model.input_scale)
                    w_ih = w_ih * model.input_scale
                weight = _gates_ifog(torch.cat([w_ih, w_hh], dim=1))  # (4H, I_l + H)
                self.weights.append(_double_candidate(weight).t().contiguous())
                self.biases.append(_double_candidate(_gates_ifog(bias)))
            self.head_weight = model.head.weight.t().contiguous()  # (H, O)
            self.head_bias = model.head.bias.clone()  # (O,)

    @torch.inference_mode()
    def __call__(
        self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = self.hidden
        layer_in = x  # (B, I)
        for layer, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            joined = torch.cat([layer_in, h[layer]], dim=1)  # (B, I_l + H)
            gates = torch.addmm(bias, joined, weight)  # (B, 4H)
            sig = gates.sigmoid_()  # (B, 4H): i, f, o, and (g + 1) / 2
            candidate = sig[:, 3 * hidden :].mul_(2).sub_(1)  # (B, H): tanh(g)
            cell = c[layer]  # (B, H)
            cell.mul_(sig[:, hidden : 2 * hidden]).addcmul_(sig[:, :hidden], candidate)
            squashed = torch.mul(cell, 2).sigmoid_().mul_(2).sub_(1)  # (B, H): tanh(cell)
            torch.mul(sig[:, 2 * hidden : 3 * hidden], squashed, out=h[layer])
            layer_in = h[layer]
        y = torch.addmm(self.head_bias, layer_in, self.head_weight)  # (B, O)
        if self.classification:
            y = torch.softmax(y, dim=-1)
        return y, h, c


def _double_candidate(t: torch.Tensor) -> torch.Tensor:
    """Scale the last gate block (g, once reordered) by 2 along dim 0."""
    scale = torch.ones(t.shape[0], *([1] * (t.dim() - 1)), dtype=t.dtype, device=t.device)
    scale[3 * t.shape[0] // 4 :] = 2.0
    return t * scale


def _gates_ifog(t: torch.Tensor) -> torch.Tensor:
    """Reorder nn.LSTM's gate blocks (i, f, g, o) along dim 0 to (i, f, o, g)."""
    i, f, g, o = t.chunk(4, dim=0)
    return torch.cat([i, f, o, g], dim=0)
