// gptfast gelu_ffn: argument checks for the native launchers (bound in bindings.cpp).
#include "common/backend.h"

#include <string>

namespace gptfast {

namespace {
constexpr const char* kOp = "gptfast.gelu_ffn";

bool parse_approximate(const std::string& approximate) {
  TORCH_CHECK_VALUE(approximate == "tanh" || approximate == "none", kOp,
                    ": approximate must be 'tanh' or 'none', got '", approximate, "'");
  return approximate == "tanh";
}

void check_param(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.device() == x.device(), kOp, ": ", name, " is on ", t.device(),
                    " but x is on ", x.device());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), kOp, ": ", name, " has dtype ",
                   t.scalar_type(), " but x has ", x.scalar_type());
}

void check_weights(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
  CHECK_DIM(x, 2);
  CHECK_BACKEND_DEVICE(x);
  CHECK_FLOATING(x);
  CHECK_CONTIGUOUS(x);
  CHECK_DIM(w1, 2);
  CHECK_DIM(w2, 2);
  check_param(w1, "w1", x);
  check_param(w2, "w2", x);
  TORCH_CHECK_VALUE(w1.size(1) == x.size(1), kOp, ": w1 must have shape (hidden, ", x.size(1),
                    ") to match x.shape[-1], got ", w1.sizes());
  TORCH_CHECK_VALUE(w2.size(1) == w1.size(0), kOp, ": w2 must have shape (out, ", w1.size(0),
                    ") to match w1's hidden size, got ", w2.sizes());
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> gelu_ffn_forward(const at::Tensor& x, const at::Tensor& w1,
                                                    const std::optional<at::Tensor>& b1,
                                                    const at::Tensor& w2,
                                                    const std::optional<at::Tensor>& b2,
                                                    const std::string& approximate) {
  const bool tanh_approx = parse_approximate(approximate);
  check_weights(x, w1, w2);
  if (b1) {
    check_param(*b1, "b1", x);
    CHECK_SHAPE(*b1, w1.size(0));
  }
  if (b2) {
    check_param(*b2, "b2", x);
    CHECK_SHAPE(*b2, w2.size(0));
  }
  return backend::gelu_ffn_forward(x, w1, b1, w2, b2, tanh_approx);
}

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>, at::Tensor, std::optional<at::Tensor>>
gelu_ffn_backward(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& h,
                  const at::Tensor& w1, const at::Tensor& w2, bool has_b1, bool has_b2,
                  const std::string& approximate) {
  const bool tanh_approx = parse_approximate(approximate);
  check_weights(x, w1, w2);
  const int64_t M = x.size(0);
  check_param(dout, "dout", x);
  check_param(h, "h", x);
  CHECK_SHAPE(dout, M, w2.size(0));
  CHECK_SHAPE(h, M, w1.size(0));
  CHECK_CONTIGUOUS(dout);
  return backend::gelu_ffn_backward(dout, x, h, w1, w2, has_b1, has_b2, tanh_approx);
}

}  // namespace gptfast
