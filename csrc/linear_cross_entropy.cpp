// gptfast linear_cross_entropy: argument checks of the logits epilogue (bound in bindings.cpp);
// the chunk driver and its GEMMs are gptfast/ops/linear_cross_entropy.py's.
#include <cmath>

#include "common/backend.h"

namespace gptfast {

namespace {
constexpr const char* kOp = "gptfast.linear_cross_entropy";
}  // namespace

at::Tensor cross_entropy_logits_(at::Tensor& z, const at::Tensor& targets,
                                 const std::optional<at::Tensor>& row_scale, int64_t ignore_index,
                                 double label_smoothing, double softcap) {
  CHECK_BACKEND_DEVICE(z);
  TORCH_CHECK_VALUE(z.dim() == 2 && z.size(1) > 0, kOp, ": z (the logits chunk) must be (C, V) with V > 0, got ",
                    z.sizes());
  TORCH_CHECK_VALUE(z.is_contiguous(), kOp, ": z must be contiguous, got strides ", z.strides());
  const bool wide = z.scalar_type() == at::kFloat || (z.scalar_type() == at::kDouble && !z.is_cuda());
  TORCH_CHECK_TYPE(wide, kOp, ": z must be float32", z.is_cuda() ? "" : " or float64", ", got ", z.scalar_type());
  TORCH_CHECK_VALUE(targets.device() == z.device(), kOp, ": targets is on ", targets.device(), " but z is on ",
                    z.device());
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong, kOp, ": targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == z.size(0) && targets.is_contiguous(), kOp,
                    ": targets must be contiguous (", z.size(0), ",) (z.shape[0]), got ", targets.sizes());
  if (row_scale.has_value()) {
    TORCH_CHECK_VALUE(row_scale->device() == z.device(), kOp, ": row_scale is on ", row_scale->device(),
                      " but z is on ", z.device());
    TORCH_CHECK_TYPE(row_scale->scalar_type() == z.scalar_type(), kOp, ": row_scale has dtype ",
                     row_scale->scalar_type(), " but z has ", z.scalar_type());
    TORCH_CHECK_VALUE(row_scale->dim() == 1 && row_scale->size(0) == z.size(0) && row_scale->is_contiguous(), kOp,
                      ": row_scale must be contiguous (", z.size(0), ",), got ", row_scale->sizes());
  }
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, kOp,
                    ": label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(softcap >= 0.0 && std::isfinite(softcap), kOp, ": softcap must be >= 0 (0: none), got ",
                    softcap);
  // targets outside [0, V) that are not ignore_index: gptfast/ops/linear_cross_entropy.py raises
  // IndexError before any kernel runs; a kernel called directly clamps nothing, so check here too
  // (one pass over C integers on the CPU)
  if (!z.is_cuda()) {
    const int64_t* t = targets.data_ptr<int64_t>();
    for (int64_t i = 0; i < z.size(0); ++i)
      TORCH_CHECK_INDEX(t[i] == ignore_index || (t[i] >= 0 && t[i] < z.size(1)), kOp, ": targets[", i, "] = ",
                        t[i], " is outside [0, ", z.size(1), ") and is not ignore_index (", ignore_index, ")");
  }
  return backend::cross_entropy_logits_(z, targets, row_scale, ignore_index, label_smoothing, softcap);
}

}  // namespace gptfast
