// gptfast attention: argument checks for the native launchers (bound in bindings.cpp).
// Shapes, dtypes and return values follow the launcher contract in gptfast/ops/_backend.py.
#include <cmath>

#include "common/backend.h"

namespace gptfast {

namespace {
constexpr const char* kOp = "gptfast.attention";
constexpr int64_t kMaxHeadDim = 256;

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  CHECK_DIM(q, 4);
  CHECK_BACKEND_DEVICE(q);
  CHECK_FLOATING(q);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  TORCH_CHECK_VALUE(D >= 1 && D <= kMaxHeadDim, kOp, ": head dim (q.shape[3]) must be in 1..",
                    kMaxHeadDim, ", got ", D);
  for (const auto* t : {&k, &v}) {
    const at::Tensor& x = *t;
    const char* name = t == &k ? "k" : "v";
    TORCH_CHECK_VALUE(x.device() == q.device(), kOp, ": ", name, " is on ", x.device(),
                      " but q is on ", q.device());
    TORCH_CHECK_TYPE(x.scalar_type() == q.scalar_type(), kOp, ": ", name, " has dtype ",
                     x.scalar_type(), " but q has ", q.scalar_type());
    TORCH_CHECK_VALUE(x.sizes() == q.sizes(), kOp, ": ", name, " must have q's shape ", q.sizes(),
                      " (batch, seqlen, nheads, headdim), got ", x.sizes());
  }
  CHECK_LAST_DIM_CONTIGUOUS(q);
  CHECK_LAST_DIM_CONTIGUOUS(k);
  CHECK_LAST_DIM_CONTIGUOUS(v);
  CHECK_ROWS_DISJOINT(q);
  CHECK_ROWS_DISJOINT(k);
  CHECK_ROWS_DISJOINT(v);
  (void)B, (void)T, (void)H;
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v, bool causal,
                                                     double softmax_scale) {
  check_qkv(q, k, v);
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale), kOp, ": softmax_scale must be finite, got ",
                    softmax_scale);
  return backend::attention_forward(q, k, v, causal, softmax_scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double softmax_scale,
    bool deterministic) {
  check_qkv(q, k, v);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  CHECK_DEVICE(dout, q.device());  // one GPU of several: all on q's
  CHECK_DEVICE(out, q.device());
  CHECK_DEVICE(lse, q.device());
  CHECK_SAME_DTYPE(dout, q);
  CHECK_SAME_DTYPE(out, q);
  CHECK_SHAPE(dout, B, T, H, D);
  CHECK_SHAPE(out, B, T, H, D);
  CHECK_SHAPE(lse, B, H, T);
  CHECK_LAST_DIM_CONTIGUOUS(dout);
  CHECK_LAST_DIM_CONTIGUOUS(out);
  CHECK_ROWS_DISJOINT(dout);
  CHECK_ROWS_DISJOINT(out);
  CHECK_DTYPE(lse, q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  return backend::attention_backward(dout, q, k, v, out, lse, causal, softmax_scale, deterministic);
}

}  // namespace gptfast
