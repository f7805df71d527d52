// What the feed-forward blocks' element-wise kernels (gelu_ffn.cu, gated_ffn.cu) share: the block
// shapes, PyTorch's GELU constants, the 16-byte vector loads/stores, the 2-D kernels' chunk tile and
// their per-chunk column partial sums, and the deterministic second kernel that sums the partial
// rows in a fixed order (bias gradients without atomics). The algorithms are in each .cu file's
// header.
//
// Everything here has internal linkage (an anonymous namespace): each .cu file compiles its own
// copies, as when they were written in it.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common.cuh"

namespace gptfast {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // threads per block, every kernel
constexpr int kTileX = 32;     // 2-D kernels: threads across columns (one warp)...
constexpr int kTileY = 8;      // ...times threads across rows
constexpr int64_t kMaxBlocks1D = 65536;  // grid-stride beyond this

// sqrt(2/pi), 0.044715, 1/sqrt(2), 1/sqrt(2*pi) as PyTorch spells them (fp32-rounded).
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kKappa = 0.044715f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

template <typename T>
struct Vec {
  static constexpr int kN = 16 / sizeof(T);  // elements per 16-byte access
};

// n = Vec<T>::kN elements at p into registers: one 16-byte access when `full` (p 16-byte aligned),
// else element by element for those of the first `valid`, zero beyond.
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, bool full, int64_t valid, T (&out)[Vec<T>::kN]) {
  if (full) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    memcpy(out, &raw, sizeof(raw));  // not a type-punned pointer (undefined behaviour)
  } else {
#pragma unroll
    for (int j = 0; j < Vec<T>::kN; ++j) out[j] = j < valid ? p[j] : from_float<T>(0.f);
  }
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, bool full, int64_t valid, const T (&in)[Vec<T>::kN]) {
  if (full) {
    uint4 raw;
    memcpy(&raw, in, sizeof(raw));  // not a type-punned pointer (undefined behaviour)
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
#pragma unroll
    for (int j = 0; j < Vec<T>::kN; ++j)
      if (j < valid) p[j] = in[j];
  }
}

// The 1-D kernels' grid-stride loop over `numel` elements: vec(i) for each whole kN-element vector
// at offset i when `vectorized` (the pointers 16-byte aligned), then scalar(i) for the rest.
template <int kN, typename VecOp, typename ScalarOp>
__device__ __forceinline__ void grid_stride(int64_t numel, bool vectorized, VecOp&& vec, ScalarOp&& scalar) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t tail = 0;
  if (vectorized) {
    const int64_t nvec = numel / kN;
    for (int64_t v = tid; v < nvec; v += stride) vec(v * kN);
    tail = nvec * kN;
  }
  for (int64_t i = tail + tid; i < numel; i += stride) scalar(i);
}

// The 2-D kernels' block (kTileX, kTileY) covers kTileX * kN columns starting at
// blockIdx.x * kTileX * kN and the rows of chunk blockIdx.y; thread (x, y) owns columns
// [col0, col0 + kN) and rows y, y + kTileY, ...
// This sums the threads' per-column fp32 totals over threadIdx.y (fixed order) and writes the
// block's partial row segment. Called by all threads of the block; starts and ends with a barrier,
// so back-to-back calls may share the tile.
template <int kN>
__device__ __forceinline__ void write_column_partials(const float (&acc)[kN], float* __restrict__ partial_row,
                                                      int64_t cols) {
  __shared__ float tile[kTileY][kTileX * kN];
  __syncthreads();  // a previous call's readers are done with the tile
#pragma unroll
  for (int j = 0; j < kN; ++j) tile[threadIdx.y][threadIdx.x * kN + j] = acc[j];
  __syncthreads();
  const int t = threadIdx.y * kTileX + threadIdx.x;
  if (t < kTileX * kN) {
    float s = 0.f;
#pragma unroll
    for (int y = 0; y < kTileY; ++y) s += tile[y][t];
    const int64_t col = static_cast<int64_t>(blockIdx.x) * (kTileX * kN) + t;
    if (col < cols) partial_row[col] = s;
  }
}

// This thread's part of the 2-D kernels' grid (see write_column_partials): its first column and
// the rows [row_begin, row_end) of its block's chunk.
struct ChunkTile {
  int64_t col0, row_begin, row_end;
};
template <int kN>
__device__ __forceinline__ ChunkTile chunk_tile(int64_t rows, int64_t rows_per_chunk) {
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  return {(static_cast<int64_t>(blockIdx.x) * kTileX + threadIdx.x) * kN, row_begin,
          min(rows, row_begin + rows_per_chunk)};
}

// out[j] = sum over chunks of partials[chunk, j], in a fixed order; block (kTileX, kTileY).
template <typename T>
__global__ void __launch_bounds__(kThreads)
column_finalize_kernel(const float* __restrict__ partials,  // (chunks, cols)
                       T* __restrict__ out,                 // (cols,)
                       int64_t chunks, int64_t cols) {
  __shared__ float sums[kTileY][kTileX + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kTileX + threadIdx.x;
  float s = 0.f;
  if (col < cols)
    for (int64_t c = threadIdx.y; c < chunks; c += kTileY) s += partials[c * cols + col];
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float total = 0.f;
#pragma unroll
    for (int y = 0; y < kTileY; ++y) total += sums[y][threadIdx.x];
    out[col] = from_float<T>(total);
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Second stage of the column sums (partials already written by one of the 2-D kernels).
template <typename T>
void launch_finalize(const float* partials, void* out, int64_t chunks, int64_t cols, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div64(cols, kTileX)));
  column_finalize_kernel<T><<<grid, dim3(kTileX, kTileY), 0, stream>>>(partials, static_cast<T*>(out),
                                                                       chunks, cols);
}

}  // namespace
}  // namespace cuda
}  // namespace gptfast
