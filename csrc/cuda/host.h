// Host-side helpers for the CUDA launchers (csrc/cuda/<op>.cpp): tensor -> kernel parameters,
// PyTorch's current stream, launch error checks. Compiled by the host compiler, never by nvcc.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <climits>
#include <optional>

#include "cuda/types.h"

namespace gptfast {
namespace cuda {

inline DType dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "gptfast cuda backend: unsupported dtype ", t.scalar_type());
  }
  return DType::kFloat32;  // unreachable
}

inline const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

// An optional weight/bias as a contiguous tensor, or an undefined one.
inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

// What the row-normalisation kernels (layer_norm.cu, rms_norm.cu) add to the op's checks of
// x (M, N): no float64 (the reference backend serves gradcheck), 1 <= N <= max_cols.
inline void check_norm_limits(const at::Tensor& x, const char* op, int64_t max_cols) {
  TORCH_CHECK_TYPE(x.scalar_type() != at::kDouble, op,
                   ": the cuda backend does not support float64 (x has dtype ", x.scalar_type(),
                   "); use float32, float16 or bfloat16, or backend=\"reference\"");
  const int64_t n = x.size(1);
  TORCH_CHECK_VALUE(n >= 1 && n <= max_cols, op, ": the cuda backend supports x.shape[-1] from 1 to ",
                    max_cols, ", got ", n);
}

// check_norm_limits for the forwards, which also take at most INT_MAX rows (one block per row).
inline void check_norm_forward_limits(const at::Tensor& x, const char* op, int64_t max_cols) {
  check_norm_limits(x, op, max_cols);
  TORCH_CHECK_VALUE(x.size(0) <= INT_MAX, op, ": the cuda backend takes at most ", INT_MAX,
                    " rows (x.shape[0] after flattening the leading dimensions), got ", x.size(0));
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Every launch function in csrc/cuda/*.cu returns cudaGetLastError() after its launches; this
// turns a failed launch (bad configuration, too much shared memory, ...) into a RuntimeError
// naming the call site, the equivalent of C10_CUDA_KERNEL_LAUNCH_CHECK across the .cu boundary.
#define GPTFAST_CUDA_LAUNCH_CHECK(expr) C10_CUDA_CHECK(expr)

}  // namespace cuda
}  // namespace gptfast
