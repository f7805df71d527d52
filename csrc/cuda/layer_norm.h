// Launch parameters and launch functions of the CUDA LayerNorm kernels (csrc/cuda/layer_norm.cu).
// Plain C++: shared by the kernels (nvcc) and the host launcher layer_norm.cpp (host compiler).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "types.h"

namespace gptfast {
namespace cuda {

// Longest row (x.shape[-1]) the kernels are built and tested for. Longer rows would still be
// correct (one block per row, loops over the row), but nothing above this is exercised.
constexpr int kLayerNormMaxCols = 65536;

// x, y: (rows, cols) contiguous, elements of `dtype`; weight, bias: (cols,) contiguous or nullptr.
// residual, residual_out: both (rows, cols) contiguous, or both nullptr; with them the kernel
// normalises s = x + residual (rounded to `dtype`) and stores s in residual_out.
// Any alignment: the launcher picks 16-byte vector accesses only when every pointer allows them.
struct LayerNormFwdParams {
  const void* x;
  const void* weight;
  const void* bias;
  const void* residual;
  void* y;
  void* residual_out;
  float* mean;  // (rows,)
  float* rstd;  // (rows,): 1 / sqrt(biased variance + eps)
  int64_t rows;  // >= 1, <= INT_MAX (one block per row)
  int cols;      // 1..kLayerNormMaxCols
  float eps;
  DType dtype;
};

// dy, x, dx: (rows, cols) contiguous; weight: (cols,) contiguous or nullptr; mean, rstd: (rows,)
// fp32 as the forward saved them; dresidual: (rows, cols) contiguous, added to dx, or nullptr. dweight / dbias: (cols,) outputs of `dtype`, or nullptr when not
// wanted. dweight_partial / dbias_partial: fp32 workspaces of (num_blocks, cols), one per wanted
// output (nullptr otherwise); every element is written before it is read, so they need no
// zeroing. The vectorised kernel wants them 16-byte aligned (torch's allocator gives 512); a
// less aligned buffer selects the scalar kernel.
struct LayerNormBwdParams {
  const void* dy;
  const void* x;
  const void* weight;
  const float* mean;
  const float* rstd;
  const void* dresidual;
  void* dx;
  void* dweight;
  void* dbias;
  float* dweight_partial;
  float* dbias_partial;
  int64_t rows;    // >= 1
  int cols;        // 1..kLayerNormMaxCols
  int num_blocks;  // from layer_norm_backward_num_blocks; 1..rows
  DType dtype;
};

cudaError_t layer_norm_forward_launch(const LayerNormFwdParams& params, cudaStream_t stream);

// Grid size of the backward kernel for the current device, i.e. the number of rows of the partial
// workspaces. Call it with every field but the partials and num_blocks filled in (the choice of
// kernel depends on the alignment of dy, x, dx, weight and dresidual, and on dresidual's presence).
cudaError_t layer_norm_backward_num_blocks(const LayerNormBwdParams& params, int* num_blocks);

cudaError_t layer_norm_backward_launch(const LayerNormBwdParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace gptfast
