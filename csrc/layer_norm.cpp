// gptfast layer_norm: argument checks for the native launchers (bound in bindings.cpp).
#include "common/backend.h"

namespace gptfast {

namespace {
constexpr const char* kOp = "gptfast.layer_norm";

void check_affine(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->device() == x.device(), kOp, ": ", name, " is on ", t->device(),
                    " but x is on ", x.device());
  TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), kOp, ": ", name, " has dtype ",
                   t->scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == x.size(1), kOp, ": ", name,
                    " must have shape (", x.size(1), ",) (x.shape[-1]), got ", t->sizes());
}

// The residual stream's tensors (residual, dresidual): x's shape, dtype and device, contiguous.
void check_stream(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->device() == x.device(), kOp, ": ", name, " is on ", t->device(),
                    " but x is on ", x.device());
  TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), kOp, ": ", name, " has dtype ",
                   t->scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK_VALUE(t->sizes() == x.sizes(), kOp, ": ", name, " must have x's shape (M, N) = ",
                    x.sizes(), ", got ", t->sizes());
  TORCH_CHECK_VALUE(t->is_contiguous(), kOp, ": ", name, " must be contiguous, got strides ",
                    t->strides());
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> layer_norm_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, const std::optional<at::Tensor>& residual) {
  CHECK_DIM(x, 2);
  CHECK_BACKEND_DEVICE(x);
  CHECK_FLOATING(x);
  CHECK_CONTIGUOUS(x);
  TORCH_CHECK_VALUE(x.size(1) > 0, kOp, ": the normalised dimension x.shape[-1] must be > 0");
  check_affine(weight, "weight", x);
  check_affine(bias, "bias", x);
  check_stream(residual, "residual", x);
  TORCH_CHECK_VALUE(eps >= 0, kOp, ": eps must be non-negative, got ", eps);
  return backend::layer_norm_forward(x, weight, bias, eps, residual);
}

std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> layer_norm_backward(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, bool has_bias,
    const std::optional<at::Tensor>& dresidual) {
  CHECK_DIM(x, 2);
  CHECK_BACKEND_DEVICE(x);
  CHECK_FLOATING(x);
  CHECK_CONTIGUOUS(x);
  const int64_t M = x.size(0), N = x.size(1);
  CHECK_SAME_DTYPE(dy, x);
  CHECK_SHAPE(dy, M, N);
  CHECK_CONTIGUOUS(dy);
  check_affine(weight, "weight", x);
  CHECK_SHAPE(mean, M);
  CHECK_SHAPE(rstd, M);
  CHECK_DEVICE(dy, x.device());  // one GPU of several: all on x's
  CHECK_DEVICE(mean, x.device());
  CHECK_DEVICE(rstd, x.device());
  check_stream(dresidual, "dresidual", x);
  return backend::layer_norm_backward(dy, x, weight, mean, rstd, has_bias, dresidual);
}

}  // namespace gptfast
