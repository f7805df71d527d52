// Which kernels this build of the extension binds. The same bindings and argument checks
// (csrc/bindings.cpp, csrc/<op>.cpp) are compiled twice by gptfast/_build.py: once for the cpu
// backend (csrc/cpu/), once with -DGPTFAST_CUDA for the cuda backend (csrc/cuda/), so that each
// backend loads, and fails to build, on its own.
#pragma once

#include "common/checks.h"

#ifdef GPTFAST_CUDA
#include "common/cuda_kernels.h"
namespace gptfast {
namespace backend = cuda;
constexpr const char* kBackendName = "cuda";
}  // namespace gptfast
#define CHECK_BACKEND_DEVICE(x)                                                                  \
  TORCH_CHECK_VALUE((x).is_cuda(), kOp, ": ", #x,                                                \
                    " must be a CUDA tensor for the cuda backend, got ", (x).device())
#else
#include "common/cpu_kernels.h"
namespace gptfast {
namespace backend = cpu;
constexpr const char* kBackendName = "cpu";
}  // namespace gptfast
#define CHECK_BACKEND_DEVICE(x) CHECK_CPU(x)
#endif
