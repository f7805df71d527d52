// Launch parameters and launch function of the CUDA logits epilogue of gptfast.linear_cross_entropy
// (csrc/cuda/linear_cross_entropy.cu). Plain C++: shared by the kernel (nvcc) and the host launcher
// linear_cross_entropy.cpp (host compiler).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "types.h"

namespace gptfast {
namespace cuda {

// z: (rows, vocab) fp32 contiguous logits; with row_scale ((rows,) fp32) z is overwritten by the
// gradient of sum(row_scale * losses), without it z may be left softcapped or unchanged.
// targets: (rows,) int64 in [0, vocab) or ignore_index (a row with ignore_index gets loss 0 and a
// zero gradient row; any other target outside [0, vocab) gets a NaN loss: the op raises
// IndexError before any kernel runs). losses: (rows,) fp32. Any alignment of z: the launcher
// picks 16-byte accesses when vocab % 4 == 0 and z is 16-byte aligned.
struct CrossEntropyParams {
  float* z;
  const int64_t* targets;
  const float* row_scale;
  float* losses;
  int64_t rows;   // >= 1, <= INT_MAX (one block per row)
  int64_t vocab;  // >= 1
  int64_t ignore_index;
  float label_smoothing;  // in [0, 1]
  float softcap;          // > 0, or 0: none
};

cudaError_t cross_entropy_logits_launch(const CrossEntropyParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace gptfast
