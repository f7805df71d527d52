// Launch parameters and launch functions of the CUDA RMSNorm kernels (csrc/cuda/rms_norm.cu).
// Plain C++: shared by the kernels (nvcc) and the host launcher rms_norm.cpp (host compiler).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "types.h"

namespace gptfast {
namespace cuda {

// Longest row (x.shape[-1]) the kernels are built and tested for, as LayerNorm's.
constexpr int kRmsNormMaxCols = 65536;

// x, y: (rows, cols) contiguous, elements of `dtype`; weight: (cols,) contiguous or nullptr (then
// y = x * rstd and offset is unused); the scale is offset + weight, formed in fp32. residual,
// residual_out: both (rows, cols) contiguous, or both nullptr; with them the kernel normalises
// s = x + residual (rounded to `dtype`) and stores s in residual_out. Any alignment: the launcher
// picks 16-byte vector accesses only when every pointer allows them.
struct RmsNormFwdParams {
  const void* x;
  const void* weight;
  const void* residual;
  void* y;
  void* residual_out;
  float* rstd;  // (rows,): 1 / sqrt(mean(x^2) + eps)
  int64_t rows;  // >= 1, <= INT_MAX (one block per row)
  int cols;      // 1..kRmsNormMaxCols
  float eps;
  float offset;
  DType dtype;
};

// dy, x, dx: (rows, cols) contiguous; weight: (cols,) contiguous or nullptr; rstd: (rows,) fp32 as
// the forward saved it; dresidual: (rows, cols) contiguous, added to dx, or nullptr. dweight:
// (cols,) output of `dtype` (nullptr without a weight), with dweight_partial its fp32 workspace of
// (num_blocks, cols) (every element written before it is read: no zeroing; 16-byte aligned for
// the vectorised kernel, else the scalar one is chosen).
struct RmsNormBwdParams {
  const void* dy;
  const void* x;
  const void* weight;
  const float* rstd;
  const void* dresidual;
  void* dx;
  void* dweight;
  float* dweight_partial;
  int64_t rows;    // >= 1
  int cols;        // 1..kRmsNormMaxCols
  int num_blocks;  // from rms_norm_backward_num_blocks; 1..rows
  float offset;
  DType dtype;
};

cudaError_t rms_norm_forward_launch(const RmsNormFwdParams& params, cudaStream_t stream);

// Grid size of the backward kernel for the current device, i.e. the number of rows of the partial
// workspace. Call it with every field but dweight_partial and num_blocks filled in (the kernel
// depends on the alignment of dy, x, dx, weight and dresidual, and on dresidual's presence).
cudaError_t rms_norm_backward_num_blocks(const RmsNormBwdParams& params, int* num_blocks);

cudaError_t rms_norm_backward_launch(const RmsNormBwdParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace gptfast
