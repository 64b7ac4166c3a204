// lstm_stream::gru_layer: one GRU layer over a chunk of timesteps on the CPU, for inference.
//
// Per step: the recurrent product (MKL's packed sgemm when given W_hh packed for the batch
// size, else addmm), then every gate of the step in one pass over the rows, split between the
// intra-op threads: r and z, the candidate n, and h' = n + z * (h - n), written straight into
// the layer's output. Python's loop spent five kernel launches and their dispatch on what this
// pass does (lstm_model/gru_sequence.py says why the GRU needs its own loop on the CPU).
//
// Built by lstm_model/native.py once per ATen CPU capability (AVX512, AVX2, DEFAULT), each with
// the compiler flags that make at::vec::Vectorized<float> that capability's vector width.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

namespace {

using Vec = at::vec::Vectorized<float>;

// exp_u20 is ATen's polynomial exp (within 20 ulp, clamped to float's range), as ATen's own
// fused CPU kernels use it; tanh(x) = 2 sigmoid(2x) - 1.
Vec sigmoid(Vec x) { return (Vec(1.0f) + x.neg().exp_u20()).reciprocal(); }
Vec tanh(Vec x) { return Vec(2.0f) * sigmoid(x + x) - Vec(1.0f); }

// Rows [begin, end) of one step. gates_in, gates_h (B, 3H), gate blocks r, z, n; the input
// side carries b_ih and the recurrent side b_hh, so n = tanh(gi_n + r * gh_n) is PyTorch's GRU.
// h, h_next (B, H).
void step_rows(const float* gates_in, const float* gates_h, const float* h, float* h_next,
               int64_t hidden, int64_t begin, int64_t end) {
  const int64_t width = 3 * hidden;
  for (int64_t row = begin; row < end; ++row) {
    const float* gi = gates_in + row * width;
    const float* gh = gates_h + row * width;
    const float* h_row = h + row * hidden;
    float* out = h_next + row * hidden;
    for (int64_t j = 0; j < hidden; j += Vec::size()) {
      const int64_t count = std::min<int64_t>(Vec::size(), hidden - j);  // the last may be short
      auto at = [count](const float* p) { return Vec::loadu(p, count); };
      const Vec r = sigmoid(at(gi + j) + at(gh + j));
      const Vec z = sigmoid(at(gi + hidden + j) + at(gh + hidden + j));
      const Vec n = tanh(at(gi + 2 * hidden + j) + r * at(gh + 2 * hidden + j));
      (n + z * (at(h_row + j) - n)).store(out + j, count);
    }
  }
}

at::Tensor packed_linear(const at::Tensor& h, const at::Tensor& packed, const at::Tensor& weight,
                         const at::Tensor& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkl::_mkl_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, int64_t)>();
  return op.call(h, packed, weight, bias, h.size(0));
}

// gates_in (T, B, 3H) contiguous: each step's input side, b_ih included; h0 (B, H); w_hh (3H, H);
// b_hh (3H); packed: w_hh packed for B by mkl::_mkl_reorder_linear_weight, or empty (addmm);
// out (T, B, H) contiguous, filled with each step's h.
void gru_layer(const at::Tensor& gates_in, const at::Tensor& h0, const at::Tensor& w_hh,
                     const at::Tensor& b_hh, const at::Tensor& packed, at::Tensor out) {
  TORCH_CHECK(gates_in.dim() == 3 && gates_in.is_contiguous(),
              "gru_layer: gates_in must be a contiguous (T, B, 3H) tensor, got sizes ",
              gates_in.sizes());
  const int64_t steps = gates_in.size(0), batch = gates_in.size(1);
  const int64_t hidden = w_hh.size(1);
  TORCH_CHECK(gates_in.scalar_type() == at::kFloat && h0.scalar_type() == at::kFloat,
              "gru_layer: float32 tensors only, got ", gates_in.scalar_type());
  TORCH_CHECK(gates_in.size(2) == 3 * hidden && w_hh.size(0) == 3 * hidden,
              "gru_layer: gates_in (T, B, 3H) and w_hh (3H, H) with H = ", hidden, ", got ",
              gates_in.sizes(), " and ", w_hh.sizes());
  TORCH_CHECK(h0.sizes() == at::IntArrayRef({batch, hidden}), "gru_layer: h0 must be (B, H) = (",
              batch, ", ", hidden, "), got ", h0.sizes());
  TORCH_CHECK(out.is_contiguous() && out.sizes() == at::IntArrayRef({steps, batch, hidden}),
              "gru_layer: out must be a contiguous (T, B, H) tensor, got sizes ", out.sizes());
  const bool use_packed = packed.defined() && packed.numel() > 0;
  const at::Tensor w_t = w_hh.t();
  const int64_t grain = std::max<int64_t>(1, 4096 / hidden);  // rows per thread, at least
  at::Tensor h = h0.contiguous();
  // (B, 3H): MKL's packed product returns its own; addmm writes into this one, step after step.
  at::Tensor gates_h =
      use_packed ? at::Tensor() : at::empty({batch, 3 * hidden}, gates_in.options());
  for (int64_t t = 0; t < steps; ++t) {
    if (use_packed) {
      gates_h = packed_linear(h, packed, w_hh, b_hh);
    } else {
      at::addmm_out(gates_h, b_hh, h, w_t);
    }
    at::Tensor h_next = out.select(0, t);  // (B, H)
    const float* gi = gates_in.select(0, t).const_data_ptr<float>();
    const float* gh = gates_h.const_data_ptr<float>();
    const float* h_now = h.const_data_ptr<float>();
    float* next = h_next.data_ptr<float>();
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
      step_rows(gi, gh, h_now, next, hidden, begin, end);
    });
    h = h_next;
  }
}

}  // namespace

TORCH_LIBRARY(lstm_stream, m) {
  m.def(
      "gru_layer(Tensor gates_in, Tensor h0, Tensor w_hh, Tensor b_hh, Tensor packed, "
      "Tensor(a!) out) -> ()");
}

// Any backend: the packed weight is an MKL-DNN tensor, the rest dense CPU tensors.
TORCH_LIBRARY_IMPL(lstm_stream, CompositeExplicitAutograd, m) { m.impl("gru_layer", gru_layer); }
