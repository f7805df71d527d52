// gptfast layer_norm: argument checks for the native launchers (bound in bindings.cpp).
//
// x may be (..., N): the rows are its leading dimensions flattened (x is contiguous), the
// backends see (M, N), and y, s and dx come back in x's shape. Flattening and restoring here
// costs two C++ views; done in Python around the call, they were two of the op's largest host
// costs on small inputs (~2.5 us each).
#include "common/backend.h"

namespace gptfast {

namespace {
constexpr const char* kOp = "gptfast.layer_norm";
constexpr const char* kRmsOp = "gptfast.rms_norm";

void check_affine(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x,
                  const char* op = kOp) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->device() == x.device(), op, ": ", name, " is on ", t->device(),
                    " but x is on ", x.device());
  TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ",
                   t->scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == x.size(-1), op, ": ", name,
                    " must have shape (", x.size(-1), ",) (x.shape[-1]), got ", t->sizes());
}

// The residual stream's tensors (residual, dresidual): x's shape, dtype and device, contiguous.
void check_stream(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x,
                  const char* op = kOp) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->device() == x.device(), op, ": ", name, " is on ", t->device(),
                    " but x is on ", x.device());
  TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ",
                   t->scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK_VALUE(t->sizes() == x.sizes(), op, ": ", name, " must have x's shape ",
                    x.sizes(), ", got ", t->sizes());
  TORCH_CHECK_VALUE(t->is_contiguous(), op, ": ", name, " must be contiguous, got strides ",
                    t->strides());
}

void check_rows(const at::Tensor& x, const char* op = kOp) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0, op,
                    ": x must be (..., N) with N > 0 (the normalised dimension), got shape ", x.sizes());
}

// (..., N) -> (M, N); a 2-D tensor as it is
at::Tensor rows(const at::Tensor& t) { return t.dim() == 2 ? t : t.view({-1, t.size(-1)}); }
std::optional<at::Tensor> rows(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(rows(*t)) : std::nullopt;
}
at::Tensor shaped(const at::Tensor& t, const at::Tensor& like) {
  return like.dim() == 2 ? t : t.view(like.sizes());
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> layer_norm_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, const std::optional<at::Tensor>& residual) {
  check_rows(x);
  CHECK_BACKEND_DEVICE(x);
  CHECK_FLOATING(x);
  CHECK_CONTIGUOUS(x);
  check_affine(weight, "weight", x);
  check_affine(bias, "bias", x);
  check_stream(residual, "residual", x);
  TORCH_CHECK_VALUE(eps >= 0, kOp, ": eps must be non-negative, got ", eps);
  auto [y, mean, rstd, s] = backend::layer_norm_forward(rows(x), weight, bias, eps, rows(residual));
  if (s.has_value()) s = shaped(*s, x);
  return {shaped(y, x), mean, rstd, s};
}

std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> layer_norm_backward(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, bool has_bias,
    const std::optional<at::Tensor>& dresidual) {
  check_rows(x);
  CHECK_BACKEND_DEVICE(x);
  CHECK_FLOATING(x);
  CHECK_CONTIGUOUS(x);
  const int64_t N = x.size(-1), M = x.numel() / N;
  CHECK_SAME_DTYPE(dy, x);
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes(), kOp, ": dy must have x's shape ", x.sizes(), ", got ",
                    dy.sizes());
  CHECK_CONTIGUOUS(dy);
  check_affine(weight, "weight", x);
  CHECK_SHAPE(mean, M);
  CHECK_SHAPE(rstd, M);
  CHECK_DEVICE(dy, x.device());  // one GPU of several: all on x's
  CHECK_DEVICE(mean, x.device());
  CHECK_DEVICE(rstd, x.device());
  check_stream(dresidual, "dresidual", x);
  auto [dx, dw, db] = backend::layer_norm_backward(rows(dy), rows(x), weight, mean, rstd, has_bias,
                                                   rows(dresidual));
  return {shaped(dx, x), dw, db};
}

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> rms_norm_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps, double offset,
    const std::optional<at::Tensor>& residual) {
  constexpr const char* kOp = kRmsOp;  // the CHECK_* macros name the op through kOp
  check_rows(x, kOp);
  CHECK_BACKEND_DEVICE(x);
  CHECK_FLOATING(x);
  CHECK_CONTIGUOUS(x);
  check_affine(weight, "weight", x, kOp);
  check_stream(residual, "residual", x, kOp);
  TORCH_CHECK_VALUE(eps >= 0, kOp, ": eps must be non-negative, got ", eps);
  auto [y, rstd, s] = backend::rms_norm_forward(rows(x), weight, eps, offset, rows(residual));
  if (s.has_value()) s = shaped(*s, x);
  return {shaped(y, x), rstd, s};
}

std::tuple<at::Tensor, std::optional<at::Tensor>> rms_norm_backward(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& rstd, double offset, const std::optional<at::Tensor>& dresidual) {
  constexpr const char* kOp = kRmsOp;
  check_rows(x, kOp);
  CHECK_BACKEND_DEVICE(x);
  CHECK_FLOATING(x);
  CHECK_CONTIGUOUS(x);
  CHECK_SAME_DTYPE(dy, x);
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes(), kOp, ": dy must have x's shape ", x.sizes(), ", got ",
                    dy.sizes());
  CHECK_CONTIGUOUS(dy);
  check_affine(weight, "weight", x, kOp);
  CHECK_SHAPE(rstd, x.numel() / x.size(-1));
  CHECK_DEVICE(rstd, x.device());
  check_stream(dresidual, "dresidual", x, kOp);
  auto [dx, dw] = backend::rms_norm_backward(rows(dy), rows(x), weight, rstd, offset, rows(dresidual));
  return {shaped(dx, x), dw};
}

}  // namespace gptfast
