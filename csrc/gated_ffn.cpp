// gptfast gated_ffn: argument checks for the native launchers (bound in bindings.cpp). The fused
// gate_up weight of the public op is split into two row-slice views in Python; here w_gate and
// w_up are always separate (H, K) tensors.
#include "common/backend.h"

#include <string>

namespace gptfast {

namespace {
constexpr const char* kOp = "gptfast.gated_ffn";

// 0 SiLU, 1 GELU tanh, 2 GELU erf: the kAct of csrc/cpu/gated_ffn.cpp.
int64_t parse_activation(const std::string& activation) {
  if (activation == "silu") return 0;
  if (activation == "gelu_tanh") return 1;
  if (activation == "gelu") return 2;
  TORCH_CHECK_VALUE(false, kOp, ": activation must be 'silu', 'gelu_tanh' or 'gelu', got '", activation, "'");
  return -1;
}

void check_param(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.device() == x.device(), kOp, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), kOp, ": ", name, " has dtype ", t.scalar_type(),
                   " but x has ", x.scalar_type());
}

void check_weights(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                   const at::Tensor& w_down) {
  CHECK_DIM(x, 2);
  CHECK_BACKEND_DEVICE(x);
  CHECK_FLOATING(x);
  CHECK_CONTIGUOUS(x);
  CHECK_DIM(w_gate, 2);
  CHECK_DIM(w_up, 2);
  CHECK_DIM(w_down, 2);
  check_param(w_gate, "w_gate", x);
  check_param(w_up, "w_up", x);
  check_param(w_down, "w_down", x);
  TORCH_CHECK_VALUE(w_gate.size(1) == x.size(1), kOp, ": w_gate must have shape (hidden, ", x.size(1),
                    ") to match x.shape[-1], got ", w_gate.sizes());
  TORCH_CHECK_VALUE(w_up.sizes() == w_gate.sizes(), kOp, ": w_up must have w_gate's shape ", w_gate.sizes(),
                    ", got ", w_up.sizes());
  TORCH_CHECK_VALUE(w_down.size(1) == w_gate.size(0), kOp, ": w_down must have shape (out, ", w_gate.size(0),
                    ") to match w_gate's hidden size, got ", w_down.sizes());
}

void check_bias(const std::optional<at::Tensor>& b, const char* name, int64_t n, const at::Tensor& x) {
  if (!b) return;
  check_param(*b, name, x);
  TORCH_CHECK_VALUE(b->dim() == 1 && b->size(0) == n && b->is_contiguous(), kOp, ": ", name,
                    " must be a contiguous (", n, ",) vector, got shape ", b->sizes(), " strides ", b->strides());
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_ffn_forward(
    const at::Tensor& x, const at::Tensor& w_gate, const std::optional<at::Tensor>& b_gate,
    const at::Tensor& w_up, const std::optional<at::Tensor>& b_up, const at::Tensor& w_down,
    const std::optional<at::Tensor>& b_down, const std::string& activation) {
  const int64_t act = parse_activation(activation);
  check_weights(x, w_gate, w_up, w_down);
  check_bias(b_gate, "b_gate", w_gate.size(0), x);
  check_bias(b_up, "b_up", w_gate.size(0), x);
  check_bias(b_down, "b_down", w_down.size(0), x);
  return backend::gated_ffn_forward(x, w_gate, b_gate, w_up, b_up, w_down, b_down, act);
}

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>, at::Tensor, std::optional<at::Tensor>, at::Tensor,
           std::optional<at::Tensor>>
gated_ffn_backward(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& g, const at::Tensor& u,
                   const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down, bool has_b_gate,
                   bool has_b_up, bool has_b_down, const std::string& activation) {
  const int64_t act = parse_activation(activation);
  check_weights(x, w_gate, w_up, w_down);
  const int64_t M = x.size(0);
  check_param(dout, "dout", x);
  check_param(g, "g", x);
  check_param(u, "u", x);
  CHECK_SHAPE(dout, M, w_down.size(0));
  CHECK_SHAPE(g, M, w_gate.size(0));
  CHECK_SHAPE(u, M, w_gate.size(0));
  CHECK_CONTIGUOUS(dout);
  return backend::gated_ffn_backward(dout, x, g, u, w_gate, w_up, w_down, has_b_gate, has_b_up, has_b_down, act);
}

}  // namespace gptfast
