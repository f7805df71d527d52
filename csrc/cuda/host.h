// Host-side helpers for the CUDA launchers (csrc/cuda/<op>.cpp): tensor -> kernel parameters,
// PyTorch's current stream, launch error checks. Compiled by the host compiler, never by nvcc.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

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

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Every launch function in csrc/cuda/*.cu returns cudaGetLastError() after its launches; this
// turns a failed launch (bad configuration, too much shared memory, ...) into a RuntimeError
// naming the call site, the equivalent of C10_CUDA_KERNEL_LAUNCH_CHECK across the .cu boundary.
#define GPTFAST_CUDA_LAUNCH_CHECK(expr) C10_CUDA_CHECK(expr)

}  // namespace cuda
}  // namespace gptfast
