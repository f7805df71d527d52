// RMSNorm on CUDA tensors, host side: outputs, workspace and launches of the kernels in
// rms_norm.cu (algorithm and design notes there). Saved by the forward for the backward: the
// per-row rstd, fp32 (and, with the fused residual add, s = x + residual, which the caller saves
// as the backward's x). Arguments are validated by csrc/layer_norm.cpp; this file checks only what
// the kernels add (host.h check_norm_limits: no float64, rows of at most kRmsNormMaxCols; and
// check_norm_forward_limits: at most INT_MAX rows, one forward block per row).
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <optional>
#include <tuple>

#include "common/backend.h"
#include "cuda/host.h"
#include "cuda/rms_norm.h"

namespace gptfast {
namespace cuda {

namespace {
constexpr const char* kOp = "gptfast.rms_norm";
}  // namespace

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> rms_norm_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps, double offset,
    const std::optional<at::Tensor>& residual) {
  check_norm_forward_limits(x, kOp, kRmsNormMaxCols);
  const int64_t M = x.size(0), N = x.size(1);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor rstd = at::empty({M}, x.options().dtype(at::kFloat));
  std::optional<at::Tensor> s;
  if (residual.has_value()) s = at::empty({M, N}, x.options());
  if (M == 0) return {y, rstd, s};

  const at::Tensor xc = x.contiguous();
  const at::Tensor w = contiguous_or_undefined(weight);
  RmsNormFwdParams p{};
  p.x = xc.const_data_ptr();
  p.weight = data_or_null(w);
  p.residual = residual.has_value() ? residual->const_data_ptr() : nullptr;  // contiguous: checked
  p.y = y.data_ptr();
  p.residual_out = s.has_value() ? s->data_ptr() : nullptr;
  p.rstd = rstd.data_ptr<float>();
  p.rows = M;
  p.cols = static_cast<int>(N);
  p.eps = static_cast<float>(eps);
  p.offset = static_cast<float>(offset);
  p.dtype = dtype_code(x);
  GPTFAST_CUDA_LAUNCH_CHECK(rms_norm_forward_launch(p, current_stream()));
  return {y, rstd, s};
}

std::tuple<at::Tensor, std::optional<at::Tensor>> rms_norm_backward(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& rstd, double offset, const std::optional<at::Tensor>& dresidual) {
  check_norm_limits(x, kOp, kRmsNormMaxCols);
  const int64_t M = x.size(0), N = x.size(1);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty({M, N}, x.options());
  std::optional<at::Tensor> dw;
  if (M == 0) {  // no rows: the sum over rows is zero, and a zero-size grid is a launch error
    if (weight.has_value()) dw = at::zeros({N}, x.options());
    return {dx, dw};
  }
  if (weight.has_value()) dw = at::empty({N}, x.options());

  const at::Tensor xc = x.contiguous();
  const at::Tensor dyc = dy.contiguous();
  const at::Tensor w = contiguous_or_undefined(weight);
  // Every backend's forward saves fp32 rstd for these dtypes; a no-op then.
  const at::Tensor rstd_c = rstd.to(at::kFloat).contiguous();

  RmsNormBwdParams p{};
  p.dy = dyc.const_data_ptr();
  p.x = xc.const_data_ptr();
  p.weight = data_or_null(w);
  p.rstd = rstd_c.const_data_ptr<float>();
  p.dresidual = dresidual.has_value() ? dresidual->const_data_ptr() : nullptr;  // contiguous: checked
  p.dx = dx.data_ptr();
  p.dweight = dw.has_value() ? dw->data_ptr() : nullptr;
  p.rows = M;
  p.cols = static_cast<int>(N);
  p.offset = static_cast<float>(offset);
  p.dtype = dtype_code(x);
  int num_blocks = 0;
  GPTFAST_CUDA_LAUNCH_CHECK(rms_norm_backward_num_blocks(p, &num_blocks));
  p.num_blocks = num_blocks;
  at::Tensor dw_partial;  // per-block partial sums of dW (fp32), reduced over blocks by the second kernel
  if (dw.has_value()) {
    dw_partial = at::empty({num_blocks, N}, x.options().dtype(at::kFloat));
    p.dweight_partial = dw_partial.data_ptr<float>();
  }
  GPTFAST_CUDA_LAUNCH_CHECK(rms_norm_backward_launch(p, current_stream()));
  return {dx, dw};
}

}  // namespace cuda
}  // namespace gptfast
