// gptfast.linear_cross_entropy's logits epilogue on CUDA tensors, host side: the losses and the
// launch of linear_cross_entropy.cu's kernel (algorithm there). Arguments are validated by
// csrc/linear_cross_entropy.cpp (z fp32 contiguous on the GPU; targets, row_scale alike); the
// targets' range is checked by the op in Python (one reduction, not a copy to the host here).
#include <ATen/ops/empty.h>

#include <climits>
#include <optional>

#include "common/backend.h"
#include "cuda/host.h"
#include "cuda/linear_cross_entropy.h"

namespace gptfast {
namespace cuda {

at::Tensor cross_entropy_logits_(at::Tensor& z, const at::Tensor& targets, const std::optional<at::Tensor>& row_scale,
                                 int64_t ignore_index, double label_smoothing, double softcap) {
  constexpr const char* kOp = "gptfast.linear_cross_entropy";
  const int64_t c = z.size(0), v = z.size(1);
  TORCH_CHECK_VALUE(c <= INT_MAX && v <= INT_MAX, kOp, ": the cuda backend takes at most ", INT_MAX,
                    " rows and ", INT_MAX, " classes per chunk, got z of shape ", z.sizes());
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor losses = at::empty({c}, z.options());
  if (c == 0) return losses;
  CrossEntropyParams p{};
  p.z = z.data_ptr<float>();
  p.targets = targets.const_data_ptr<int64_t>();
  p.row_scale = row_scale.has_value() ? row_scale->const_data_ptr<float>() : nullptr;
  p.losses = losses.data_ptr<float>();
  p.rows = c;
  p.vocab = v;
  p.ignore_index = ignore_index;
  p.label_smoothing = static_cast<float>(label_smoothing);
  p.softcap = static_cast<float>(softcap);
  GPTFAST_CUDA_LAUNCH_CHECK(cross_entropy_logits_launch(p, current_stream()));
  return losses;
}

}  // namespace cuda
}  // namespace gptfast
