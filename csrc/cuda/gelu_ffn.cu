// Element-wise and reduction kernels of the CUDA GELU feed-forward block
//   out = GELU(x w1^T + b1) w2^T + b2        (GELU: tanh approximation or exact erf)
// The four GEMMs, and where cuBLASLt offers them the tanh-GELU epilogues (GELU_AUX_BIAS forward,
// DGELU_BGRAD backward), run in csrc/cuda/gelu_ffn.cpp; these kernels do the rest, memory-bound:
//
//   gelu_forward_kernel   a = GELU(h): the exact-GELU epilogue of the first GEMM (cuBLASLt's GELU
//                         is the tanh form), the tanh form where that epilogue is not used (fp32,
//                         sizes it rejects), and the backward's recomputation of GELU(h) (h is
//                         saved, GELU(h) is not).
//   gelu_backward_kernel  dh = dA * GELU'(h) in place, a = GELU(h) and per-chunk column partial
//                         sums of dh for db1, in one pass over (M, H): the dGELU epilogue where
//                         cuBLASLt's DGELU_BGRAD is not used (exact GELU, fp32, sizes it rejects).
//   column_partials_kernel / column_finalize_kernel   db2 = column sums of dout, and the second
//                         stage of db1: partial rows summed in a fixed order, so bias gradients
//                         are deterministic (no atomics).
//
// GELU and GELU' are evaluated in fp32 with PyTorch's formulas (ActivationGeluKernel.cu) using
// the precise tanhf/erff/expf, never the .approx instructions: NaN propagates, and fp32 results
// stay fp32-accurate. 16-byte loads/stores (8 x 16-bit or 4 x fp32) when
// the pointers are 16-byte aligned (and, for the 2-D kernels, the row length is a multiple of 8
// or 4); scalar otherwise. One instantiation per dtype x GELU variant.
//
// No torch headers here: nvcc's host pass over them costs ~40 s per file.
#include "cuda/gelu_ffn.h"

#include <cstdint>

#include "cuda/ffn_common.cuh"
#include "cuda/static_switch.h"

namespace gptfast {
namespace cuda {
namespace {

template <bool kTanh>
__device__ __forceinline__ float gelu(float x) {
  if constexpr (kTanh) {
    const float inner = kSqrt2OverPi * (x + kKappa * x * x * x);
    return 0.5f * x * (1.f + tanhf(inner));
  } else {
    return x * 0.5f * (1.f + erff(x * kInvSqrt2));
  }
}

// GELU(x), and dGELU/dx in *grad.
template <bool kTanh>
__device__ __forceinline__ float gelu_and_grad(float x, float* grad) {
  if constexpr (kTanh) {
    const float x_sq = x * x;
    const float inner = kSqrt2OverPi * (x + kKappa * x_sq * x);
    const float t = tanhf(inner);
    const float left = 0.5f * x;
    const float right = 1.f + t;
    const float right_derivative = (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * kKappa * x_sq);
    *grad = 0.5f * right + left * right_derivative;
    return left * right;
  } else {
    const float cdf = 0.5f * (1.f + erff(x * kInvSqrt2));
    const float pdf = expf(-0.5f * x * x) * kInvSqrt2Pi;
    *grad = cdf + x * pdf;
    return x * cdf;
  }
}

template <typename T, bool kTanh>
__global__ void __launch_bounds__(kThreads)
gelu_forward_kernel(const T* __restrict__ h,  // (numel,)
                    T* __restrict__ a,        // (numel,) GELU(h)
                    int64_t numel,
                    bool vectorized) {        // h and a 16-byte aligned
  constexpr int kN = Vec<T>::kN;
  grid_stride<kN>(
      numel, vectorized,
      [&](int64_t i) {
        T in[kN], out[kN];
        load_vec<T>(h + i, true, kN, in);
#pragma unroll
        for (int j = 0; j < kN; ++j) out[j] = from_float<T>(gelu<kTanh>(to_float<T>(in[j])));
        store_vec<T>(a + i, true, kN, out);
      },
      [&](int64_t i) { a[i] = from_float<T>(gelu<kTanh>(to_float<T>(h[i]))); });
}

template <typename T, bool kTanh>
__global__ void __launch_bounds__(kThreads)
gelu_backward_kernel(const T* __restrict__ h,        // (rows, cols)
                     T* dh,                          // (rows, cols) dA in, dh out: not __restrict__
                     T* __restrict__ a,              // (rows, cols) GELU(h)
                     float* __restrict__ partials,   // (chunks, cols) column sums of dh per chunk, or null
                     int64_t rows, int64_t cols,
                     int64_t rows_per_chunk,
                     bool vectorized) {              // cols % kN == 0 and h, dh, a 16-byte aligned
  constexpr int kN = Vec<T>::kN;
  const auto [col0, row_begin, row_end] = chunk_tile<kN>(rows, rows_per_chunk);
  float acc[kN];
#pragma unroll
  for (int j = 0; j < kN; ++j) acc[j] = 0.f;
  if (col0 < cols) {
    const int64_t valid = cols - col0;
    for (int64_t r = row_begin + threadIdx.y; r < row_end; r += kTileY) {
      const int64_t off = r * cols + col0;
      T hv[kN], dv[kN], av[kN];
      load_vec<T>(h + off, vectorized, valid, hv);
      load_vec<T>(dh + off, vectorized, valid, dv);
#pragma unroll
      for (int j = 0; j < kN; ++j) {
        float g;
        av[j] = from_float<T>(gelu_and_grad<kTanh>(to_float<T>(hv[j]), &g));
        dv[j] = from_float<T>(to_float<T>(dv[j]) * g);
        acc[j] += to_float<T>(dv[j]);  // db1 sums the rounded dh, as the reference does
      }
      store_vec<T>(dh + off, vectorized, valid, dv);
      store_vec<T>(a + off, vectorized, valid, av);
    }
  }
  if (partials != nullptr) write_column_partials<kN>(acc, partials + blockIdx.y * cols, cols);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
column_partials_kernel(const T* __restrict__ x,        // (rows, cols)
                       float* __restrict__ partials,   // (chunks, cols)
                       int64_t rows, int64_t cols,
                       int64_t rows_per_chunk,
                       bool vectorized) {              // cols % kN == 0 and x 16-byte aligned
  constexpr int kN = Vec<T>::kN;
  const auto [col0, row_begin, row_end] = chunk_tile<kN>(rows, rows_per_chunk);
  float acc[kN];
#pragma unroll
  for (int j = 0; j < kN; ++j) acc[j] = 0.f;
  if (col0 < cols) {
    const int64_t valid = cols - col0;
    for (int64_t r = row_begin + threadIdx.y; r < row_end; r += kTileY) {
      T xv[kN];
      load_vec<T>(x + r * cols + col0, vectorized, valid, xv);
#pragma unroll
      for (int j = 0; j < kN; ++j) acc[j] += to_float<T>(xv[j]);
    }
  }
  write_column_partials<kN>(acc, partials + blockIdx.y * cols, cols);
}

}  // namespace

cudaError_t gelu_forward(const GeluForwardParams& p, cudaStream_t stream) {
  if (p.numel <= 0) return cudaSuccess;
  const bool vectorized = aligned16(p.h) && aligned16(p.a);
  FLOAT_SWITCH(p.dtype, [&] {
    BOOL_SWITCH(p.tanh_approx, kTanh, [&] {
      const int64_t work = vectorized ? ceil_div64(p.numel, Vec<elem_t>::kN) : p.numel;
      const int64_t blocks = std::min(ceil_div64(work, kThreads), kMaxBlocks1D);
      gelu_forward_kernel<elem_t, kTanh><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          static_cast<const elem_t*>(p.h), static_cast<elem_t*>(p.a), p.numel, vectorized);
    });
  });
  return cudaGetLastError();
}

cudaError_t gelu_backward(const GeluBackwardParams& p, cudaStream_t stream) {
  if (p.cols <= 0) return cudaSuccess;
  if (p.rows <= 0) {  // empty sum
    if (p.dbias != nullptr) {
      const size_t elem = p.dtype == DType::kFloat32 ? 4 : 2;
      return cudaMemsetAsync(p.dbias, 0, static_cast<size_t>(p.cols) * elem, stream);
    }
    return cudaSuccess;
  }
  const ColumnChunks chunks = column_chunks(p.rows);
  FLOAT_SWITCH(p.dtype, [&] {
    BOOL_SWITCH(p.tanh_approx, kTanh, [&] {
      constexpr int kN = Vec<elem_t>::kN;
      const bool vectorized = p.cols % kN == 0 && aligned16(p.h) && aligned16(p.dh) && aligned16(p.a);
      const dim3 grid(static_cast<unsigned>(ceil_div64(p.cols, kTileX * kN)),
                      static_cast<unsigned>(chunks.count));
      float* partials = p.dbias != nullptr ? p.workspace : nullptr;
      gelu_backward_kernel<elem_t, kTanh><<<grid, dim3(kTileX, kTileY), 0, stream>>>(
          static_cast<const elem_t*>(p.h), static_cast<elem_t*>(p.dh), static_cast<elem_t*>(p.a), partials,
          p.rows, p.cols, chunks.rows_per_chunk, vectorized);
      if (partials != nullptr) launch_finalize<elem_t>(partials, p.dbias, chunks.count, p.cols, stream);
    });
  });
  return cudaGetLastError();
}

cudaError_t column_sum(const ColumnSumParams& p, cudaStream_t stream) {
  if (p.cols <= 0) return cudaSuccess;
  if (p.rows <= 0) {
    const size_t elem = p.dtype == DType::kFloat32 ? 4 : 2;
    return cudaMemsetAsync(p.out, 0, static_cast<size_t>(p.cols) * elem, stream);
  }
  const ColumnChunks chunks = column_chunks(p.rows);
  FLOAT_SWITCH(p.dtype, [&] {
    constexpr int kN = Vec<elem_t>::kN;
    const bool vectorized = p.cols % kN == 0 && aligned16(p.x);
    const dim3 grid(static_cast<unsigned>(ceil_div64(p.cols, kTileX * kN)),
                    static_cast<unsigned>(chunks.count));
    column_partials_kernel<elem_t><<<grid, dim3(kTileX, kTileY), 0, stream>>>(
        static_cast<const elem_t*>(p.x), p.workspace, p.rows, p.cols, chunks.rows_per_chunk, vectorized);
    launch_finalize<elem_t>(p.workspace, p.out, chunks.count, p.cols, stream);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace gptfast
