// LayerNorm on CUDA tensors, host side: outputs, workspaces and launches of the kernels in
// layer_norm.cu (algorithm and design notes there). Saved by the forward for the backward: the
// per-row mean and rstd, fp32 (and, with the fused residual add, s = x + residual, which the
// caller saves as the backward's x). Arguments are validated by csrc/layer_norm.cpp; this file checks
// only what the kernels add: no float64 (the reference backend serves gradcheck), rows of at most
// kLayerNormMaxCols, and at most INT_MAX rows (one forward block per row).
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <optional>
#include <tuple>

#include "common/backend.h"
#include "cuda/host.h"
#include "cuda/layer_norm.h"

namespace gptfast {
namespace cuda {

namespace {
constexpr const char* kOp = "gptfast.layer_norm";
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> layer_norm_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, const std::optional<at::Tensor>& residual) {
  check_norm_forward_limits(x, kOp, kLayerNormMaxCols);
  const int64_t M = x.size(0), N = x.size(1);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor mean = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({M}, x.options().dtype(at::kFloat));
  std::optional<at::Tensor> s;
  if (residual.has_value()) s = at::empty({M, N}, x.options());
  if (M == 0) return {y, mean, rstd, s};

  const at::Tensor xc = x.contiguous();
  const at::Tensor w = contiguous_or_undefined(weight);
  const at::Tensor b = contiguous_or_undefined(bias);
  LayerNormFwdParams p{};
  p.x = xc.const_data_ptr();
  p.weight = data_or_null(w);
  p.bias = data_or_null(b);
  p.residual = residual.has_value() ? residual->const_data_ptr() : nullptr;  // contiguous: checked
  p.y = y.data_ptr();
  p.residual_out = s.has_value() ? s->data_ptr() : nullptr;
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.rows = M;
  p.cols = static_cast<int>(N);
  p.eps = static_cast<float>(eps);
  p.dtype = dtype_code(x);
  GPTFAST_CUDA_LAUNCH_CHECK(layer_norm_forward_launch(p, current_stream()));
  return {y, mean, rstd, s};
}

std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> layer_norm_backward(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, bool has_bias,
    const std::optional<at::Tensor>& dresidual) {
  check_norm_limits(x, kOp, kLayerNormMaxCols);
  const int64_t M = x.size(0), N = x.size(1);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty({M, N}, x.options());
  std::optional<at::Tensor> dw, db;
  if (M == 0) {  // no rows: the sums over rows are zero, and a zero-size grid is a launch error
    if (weight.has_value()) dw = at::zeros({N}, x.options());
    if (has_bias) db = at::zeros({N}, x.options());
    return {dx, dw, db};
  }
  if (weight.has_value()) dw = at::empty({N}, x.options());
  if (has_bias) db = at::empty({N}, x.options());

  const at::Tensor xc = x.contiguous();
  const at::Tensor dyc = dy.contiguous();
  const at::Tensor w = contiguous_or_undefined(weight);
  // The forward of any backend saves fp32 statistics for these dtypes; .to/.contiguous are no-ops
  // then, and keep the kernels' layout assumption explicit otherwise.
  const at::Tensor mean_c = mean.to(at::kFloat).contiguous();
  const at::Tensor rstd_c = rstd.to(at::kFloat).contiguous();

  LayerNormBwdParams p{};
  p.dy = dyc.const_data_ptr();
  p.x = xc.const_data_ptr();
  p.weight = data_or_null(w);
  p.mean = mean_c.const_data_ptr<float>();
  p.rstd = rstd_c.const_data_ptr<float>();
  p.dresidual = dresidual.has_value() ? dresidual->const_data_ptr() : nullptr;  // contiguous: checked
  p.dx = dx.data_ptr();
  p.dweight = dw.has_value() ? dw->data_ptr() : nullptr;
  p.dbias = db.has_value() ? db->data_ptr() : nullptr;
  p.rows = M;
  p.cols = static_cast<int>(N);
  p.dtype = dtype_code(x);
  int num_blocks = 0;
  GPTFAST_CUDA_LAUNCH_CHECK(layer_norm_backward_num_blocks(p, &num_blocks));
  p.num_blocks = num_blocks;
  // Per-block partial sums of dW and dB (fp32), reduced over blocks by the second kernel.
  at::Tensor dw_partial, db_partial;
  if (dw.has_value()) {
    dw_partial = at::empty({num_blocks, N}, x.options().dtype(at::kFloat));
    p.dweight_partial = dw_partial.data_ptr<float>();
  }
  if (db.has_value()) {
    db_partial = at::empty({num_blocks, N}, x.options().dtype(at::kFloat));
    p.dbias_partial = db_partial.data_ptr<float>();
  }
  GPTFAST_CUDA_LAUNCH_CHECK(layer_norm_backward_launch(p, current_stream()));
  return {dx, dw, db};
}

}  // namespace cuda
}  // namespace gptfast
