"""A GRU SequenceModel over a chunk of timesteps on the CPU, for inference: what a server runs
for a batch of multi-step chunks of a GRU model.

PyTorch's CPU `nn.GRU` runs each timestep as a matrix product against a weight it repacks on
every call, and a handful of small kernels; its LSTM goes through oneDNN, which has no GRU
here (`torch.mkldnn_rnn_layer` refuses the mode). So a GRU of the same size, with three gates
to the LSTM's four, came out slower than the LSTM. Here, per layer:

- the input side of every timestep is one matrix product, (T*B, I_l) x (I_l, 3H), time-major so
  each step's slice is contiguous;
- each step's recurrent product uses W_hh packed once for the batch size (MKL's packed sgemm,
  as torch's own CPU inference passes use; plain `addmm` where MKL is absent);
- then the step's gates: r, z, n = tanh(gi_n + r * gh_n) and h' = n + z * (h - n), written
  straight into the layer's output. The native loop (csrc/gru_layer.cpp, built by native.py)
  does them in one pass over the rows split between the threads; without it, the Python loop
  below does them in five kernels into reused buffers.

The Python loop spends about 45 us a step (hidden 256, 64 rows) launching those five kernels,
single-threaded; the native pass takes about 5. Offline, 2 threads, hidden 256, 2 layers, 32
steps: the native loop takes 0.84-0.89 of nn.LSTM's time for 17 to 64 rows, the Python loop
1.05-1.27 (docs/performance.md has the table).

A packed weight serves one batch size and holds about three times W_hh's bytes (2.3 MB
resident for a 256-hidden layer). The last PACKED_BATCH_SIZES sizes' packed weights are kept. A
server's batches come in every size, so most batches pack anew (into the buffers the evicted
size gave back), and that still beats `addmm`: through lstm-serve, 64 sessions of 32-step
messages, 5 alternating trials, 117,434 timesteps/s against 109,510 when only the four most
frequent sizes were packed and the rest ran `addmm` (Python loop).

Outputs and states equal `SequenceModel.forward` up to float rounding (the tests hold them
within 1e-5).
"""

from __future__ import annotations

import torch

from lstm_model import native
from lstm_model.model import SequenceModel, State

PACKED_BATCH_SIZES = 4  # packed W_hh kept for this many batch sizes (the newest used)
NOT_PACKED = torch.empty(0)  # what the native loop is given for "run addmm"


class GruSequence:
    """y, (h,) = run(x, (h,)) for x (B, T, I) and h (L, B, H) on the CPU; `lengths` (rows of
    different lengths) go to the module itself."""

    def __init__(self, model: SequenceModel, use_native: bool = True) -> None:
        config, gru = model.config, model.rnn
        if config.cell != "gru":
            raise ValueError(f"GruSequence: expected a GRU model, got cell {config.cell!r}")
        self.model = model
        self.hidden = config.hidden_size
        self.classification = config.is_classification
        self.input_mean, self.input_scale = model.input_mean, model.input_scale  # (I,)
        self.input_weights: list[torch.Tensor] = []  # per layer: (I_l, 3H), gates (r, z, n)
        self.input_biases: list[torch.Tensor] = []  # (3H,)
        self.hidden_weights: list[torch.Tensor] = []  # (3H, H)
        self.hidden_biases: list[torch.Tensor] = []  # (3H,)
        with torch.no_grad():
            for layer in range(config.num_layers):
                w_ih = getattr(gru, f"weight_ih_l{layer}")  # (3H, I_l)
                self.input_weights.append(w_ih.t().contiguous())
                self.input_biases.append(getattr(gru, f"bias_ih_l{layer}").detach().clone())
                self.hidden_weights.append(getattr(gru, f"weight_hh_l{layer}").detach().clone())
                self.hidden_biases.append(getattr(gru, f"bias_hh_l{layer}").detach().clone())
            self.head_weight = model.head.weight.t().contiguous()  # (H, O)
            self.head_bias = model.head.bias.clone()  # (O,)
        self._packed: dict[int, list[torch.Tensor]] = {}  # batch size -> per layer packed W_hh
        self._can_pack = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
        # The C++ layer loop (lstm_model/native.py), or None: the Python loop below.
        self.native = native.gru_layer() if use_native else None

    @torch.inference_mode()
    def __call__(
        self, x: torch.Tensor, state: State, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, State]:
        if lengths is not None or x.device.type != "cpu" or x.dtype != torch.float32:
            return self.model(x, state, lengths)
        batch, steps, _ = x.shape
        (h0,) = state  # (L, B, H)
        x = (x - self.input_mean) * self.input_scale  # (B, T, I), as the module normalises
        layer_in = x.transpose(0, 1).reshape(steps * batch, -1)  # (T*B, I): time-major
        packed = self._packed_for(batch)
        finals = []
        for layer, w_ih in enumerate(self.input_weights):
            gates_in = torch.addmm(self.input_biases[layer], layer_in, w_ih)  # (T*B, 3H)
            out = torch.empty(steps, batch, self.hidden)  # (T, B, H)
            finals.append(
                self._layer(gates_in.view(steps, batch, -1), h0[layer], layer, packed, out)
            )
            layer_in = out.view(steps * batch, self.hidden)  # (T*B, H)
        y = torch.addmm(self.head_bias, layer_in, self.head_weight)  # (T*B, O)
        if self.classification:
            y = torch.softmax(y, dim=-1)
        y = y.view(steps, batch, -1).transpose(0, 1).contiguous()  # (B, T, O)
        return y, (torch.stack(finals),)

    def _layer(
        self,
        gates_in: torch.Tensor,
        h: torch.Tensor,
        layer: int,
        packed: list[torch.Tensor] | None,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """One layer over the chunk: gates_in (T, B, 3H) from its inputs, h (B, H) at the start;
        out (T, B, H) filled; the final h."""
        weight, bias = self.hidden_weights[layer], self.hidden_biases[layer]
        if self.native is not None:
            self.native(
                gates_in, h, weight, bias, NOT_PACKED if packed is None else packed[layer], out
            )
            return out[-1] if len(out) else h
        hidden = self.hidden
        batch = h.shape[0]
        w_t = weight.t()
        rz = torch.empty(batch, 2 * hidden)  # (B, 2H): r, z
        r, z = rz[:, :hidden], rz[:, hidden:]
        n = torch.empty(batch, hidden)  # (B, H)
        rz_in = gates_in[:, :, : 2 * hidden].unbind(0)  # T x (B, 2H)
        n_in = gates_in[:, :, 2 * hidden :].unbind(0)  # T x (B, H)
        for t, h_out in enumerate(out.unbind(0)):
            if packed is None:
                gates_h = torch.addmm(bias, h, w_t)  # (B, 3H)
            else:
                gates_h = torch.ops.mkl._mkl_linear(h, packed[layer], weight, bias, batch)
            torch.add(rz_in[t], gates_h[:, : 2 * hidden], out=rz).sigmoid_()
            torch.addcmul(n_in[t], r, gates_h[:, 2 * hidden :], out=n).tanh_()
            h = torch.lerp(n, h, z, out=h_out)  # (1 - z) * n + z * h
        return h

    def _packed_for(self, batch: int) -> list[torch.Tensor] | None:
        """Each layer's W_hh packed for this batch size, or None without MKL's packed linear
        in this torch (the call runs `addmm`)."""
        if not self._can_pack:
            return None
        packed = self._packed.pop(batch, None)
        if packed is None:
            if len(self._packed) >= PACKED_BATCH_SIZES:
                del self._packed[next(iter(self._packed))]  # the least recently used
            pack = torch.ops.mkl._mkl_reorder_linear_weight
            packed = [pack(w, batch) for w in self.hidden_weights]
        self._packed[batch] = packed
        return packed
