// Element-wise and reduction kernels of the CUDA GELU feed-forward block (csrc/cuda/gelu_ffn.cu),
// called by its host code (csrc/cuda/gelu_ffn.cpp), which runs the GEMMs on cuBLASLt.
//
// The kernels cover what no cuBLASLt epilogue does for us: exact (erf) GELU and its derivative,
// GELU(h) recomputed in the backward, and the bias gradients as deterministic column sums
// (per-chunk fp32 partial sums, then one pass adding the chunks in a fixed order; no atomics).
// All math is fp32; tensors are float32, float16 or bfloat16, row-major and contiguous.
//
// Plain C++ (no CUDA or torch headers beyond the runtime API), so that both nvcc and the host
// compiler read it. Every launch function returns cudaGetLastError() after its launches (wrap it
// in GPTFAST_CUDA_LAUNCH_CHECK, csrc/cuda/host.h) and launches nothing for empty inputs.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

#include "cuda/types.h"

namespace gptfast {
namespace cuda {

// a = GELU(h) over `numel` contiguous elements.
struct GeluForwardParams {
  const void* h;     // (numel,) pre-activation
  void* a;           // (numel,) GELU(h); must not overlap h
  int64_t numel;
  DType dtype;       // of h and a
  bool tanh_approx;  // tanh approximation, else exact erf GELU
};
cudaError_t gelu_forward(const GeluForwardParams& params, cudaStream_t stream);

// The backward of GELU for a (rows, cols) matrix, in one pass:
//   dh = dA * GELU'(h)   (in place: `dh` holds dA on entry; the result is rounded to dtype),
//   a  = GELU(h)         (recomputed for the second weight's gradient),
//   dbias[j] = sum_i dh[i, j]   (of the rounded dh, accumulated in fp32) when dbias is not null.
struct GeluBackwardParams {
  const void* h;       // (rows, cols) pre-activation
  void* dh;            // (rows, cols) dA in, dh out
  void* a;             // (rows, cols) GELU(h) out; must not overlap h or dh
  void* dbias;         // (cols,) or null
  float* workspace;    // column_sum_workspace_floats(rows, cols) floats when dbias is set, else unused
  int64_t rows, cols;
  DType dtype;         // of every tensor above except the fp32 workspace
  bool tanh_approx;
};
cudaError_t gelu_backward(const GeluBackwardParams& params, cudaStream_t stream);

// out[j] = sum_i x[i, j] for a (rows, cols) matrix, accumulated in fp32 (the second bias' gradient).
struct ColumnSumParams {
  const void* x;       // (rows, cols)
  void* out;           // (cols,)
  float* workspace;    // column_sum_workspace_floats(rows, cols) floats
  int64_t rows, cols;
  DType dtype;         // of x and out
};
cudaError_t column_sum(const ColumnSumParams& params, cudaStream_t stream);

// How the column sums split the rows: `count` chunks of `rows_per_chunk` rows (the last may be
// shorter), each reduced by one row of thread blocks into one fp32 partial row. The split depends
// on `rows` alone, so the summation order -- and the result -- is the same on every run and GPU.
// At least 32 rows per chunk (smaller chunks only add partial rows), at most 512 chunks (bounds
// the workspace to 2 KiB per column and the grid's y dimension).
struct ColumnChunks {
  int64_t rows_per_chunk;
  int64_t count;
};
inline ColumnChunks column_chunks(int64_t rows) {
  constexpr int64_t kMinRowsPerChunk = 32;
  constexpr int64_t kMaxChunks = 512;
  if (rows <= 0) return {1, 0};
  const int64_t want = std::min((rows + kMinRowsPerChunk - 1) / kMinRowsPerChunk, kMaxChunks);
  const int64_t rows_per_chunk = (rows + want - 1) / want;
  return {rows_per_chunk, (rows + rows_per_chunk - 1) / rows_per_chunk};
}

// fp32 workspace the column sums need: one partial row per chunk.
inline int64_t column_sum_workspace_floats(int64_t rows, int64_t cols) {
  return column_chunks(rows).count * cols;
}

}  // namespace cuda
}  // namespace gptfast
