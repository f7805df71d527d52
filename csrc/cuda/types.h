// Plain C++ shared by the CUDA kernels (.cu) and their host launchers (.cpp): the element-type
// code carried in launch parameters, and small integer helpers. No CUDA or torch headers.
#pragma once

#include <cstdint>

namespace gptfast {
namespace cuda {

// Element type of a tensor as launch parameters carry it (csrc/cuda/host.h: dtype_code).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace cuda
}  // namespace gptfast
