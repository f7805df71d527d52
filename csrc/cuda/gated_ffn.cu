// Element-wise kernels of the CUDA gated feed-forward block (csrc/cuda/gated_ffn.h):
//   gated_forward_kernel   a = act(g) * u over contiguous (M, H): the step between the gate/up
//                          GEMMs and the down GEMM (no cuBLASLt epilogue multiplies two GEMMs).
//   gated_backward_kernel  dg = da * u * act'(g) in place, du = da * act(g), a = act(g) * u
//                          (recomputed for dw_down) and the per-chunk column partial sums of dg and
//                          du (db_gate, db_up) in one pass over (M, H); then
//   column_finalize_kernel sums the partial rows in a fixed order (deterministic, no atomics).
//
// act: SiLU g * sigmoid(g) (SiLU' = s (1 + g (1 - s))), GELU tanh / erf with PyTorch's formulas,
// all in fp32 with the precise expf/tanhf/erff (never .approx: NaN propagates, fp32 stays
// fp32-accurate; the sigmoid's one division is __fdividef, see activation()). 16-byte loads/stores (8 x 16-bit or 4 x fp32) where pointers are 16-byte aligned
// (and, for the 2-D kernel, H is a multiple of 8 or 4); scalar otherwise. One instantiation per
// dtype x activation.
//
// No torch headers here: nvcc's host pass over them costs ~40 s per file.
#include "cuda/gated_ffn.h"

#include <cstdint>

#include "cuda/ffn_common.cuh"
#include "cuda/static_switch.h"

namespace gptfast {
namespace cuda {
namespace {

// act(x), and act'(x) in *grad when kGrad.
template <int kAct, bool kGrad>
__device__ __forceinline__ float activation(float x, float* grad) {
  if constexpr (kAct == static_cast<int>(GatedActivation::kSilu)) {
    // __fdividef (2 ulp; 0 once expf(-x) > 2^126, where sigmoid < 2^-126 anyway; NaN stays NaN):
    // the precise '/' adds a slow-path subroutine that spills in the fp32 kernels on sm_80.
    const float s = __fdividef(1.f, 1.f + expf(-x));
    if constexpr (kGrad) *grad = s * (1.f + x * (1.f - s));
    return x * s;
  } else if constexpr (kAct == static_cast<int>(GatedActivation::kGeluTanh)) {
    const float x_sq = x * x;
    const float t = tanhf(kSqrt2OverPi * (x + kKappa * x_sq * x));
    const float left = 0.5f * x, right = 1.f + t;
    if constexpr (kGrad) {
      const float right_derivative = (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * kKappa * x_sq);
      *grad = 0.5f * right + left * right_derivative;
    }
    return left * right;
  } else {
    const float cdf = 0.5f * (1.f + erff(x * kInvSqrt2));
    if constexpr (kGrad) *grad = cdf + x * expf(-0.5f * x * x) * kInvSqrt2Pi;
    return x * cdf;
  }
}

// The three activations as a compile-time int (one kernel instantiation each).
#define ACT_SWITCH(ACT, CONST_NAME, ...)                                          \
  [&] {                                                                           \
    if ((ACT) == GatedActivation::kSilu) {                                        \
      constexpr static int CONST_NAME = static_cast<int>(GatedActivation::kSilu); \
      return __VA_ARGS__();                                                       \
    } else if ((ACT) == GatedActivation::kGeluTanh) {                             \
      constexpr static int CONST_NAME = static_cast<int>(GatedActivation::kGeluTanh); \
      return __VA_ARGS__();                                                       \
    } else {                                                                      \
      constexpr static int CONST_NAME = static_cast<int>(GatedActivation::kGelu); \
      return __VA_ARGS__();                                                       \
    }                                                                             \
  }()

template <typename T, int kAct>
__global__ void __launch_bounds__(kThreads)
gated_forward_kernel(const T* __restrict__ g,  // (numel,)
                     const T* __restrict__ u,  // (numel,)
                     T* __restrict__ a,        // (numel,) act(g) * u
                     int64_t numel,
                     bool vectorized) {        // g, u, a 16-byte aligned
  constexpr int kN = Vec<T>::kN;
  grid_stride<kN>(
      numel, vectorized,
      [&](int64_t i) {
        T gv[kN], uv[kN], av[kN];
        load_vec<T>(g + i, true, kN, gv);
        load_vec<T>(u + i, true, kN, uv);
#pragma unroll
        for (int j = 0; j < kN; ++j)
          av[j] = from_float<T>(activation<kAct, false>(to_float<T>(gv[j]), nullptr) * to_float<T>(uv[j]));
        store_vec<T>(a + i, true, kN, av);
      },
      [&](int64_t i) {
        a[i] = from_float<T>(activation<kAct, false>(to_float<T>(g[i]), nullptr) * to_float<T>(u[i]));
      });
}

template <typename T, int kAct>
__global__ void __launch_bounds__(kThreads)
gated_backward_kernel(const T* __restrict__ g,        // (rows, cols)
                      const T* __restrict__ u,        // (rows, cols)
                      T* __restrict__ dgu,            // (rows, 2 cols): [da | -] in, [dg | du] out
                      T* __restrict__ a,              // (rows, cols) act(g) * u
                      float* __restrict__ partials,   // (chunks, 2 cols) column sums per chunk, or null
                      int64_t rows, int64_t cols,
                      int64_t rows_per_chunk,
                      bool vectorized) {              // cols % kN == 0 and g, u, dgu, a 16-byte aligned
  constexpr int kN = Vec<T>::kN;
  const auto [col0, row_begin, row_end] = chunk_tile<kN>(rows, rows_per_chunk);
  float acc_g[kN], acc_u[kN];
#pragma unroll
  for (int j = 0; j < kN; ++j) acc_g[j] = acc_u[j] = 0.f;
  if (col0 < cols) {
    const int64_t valid = cols - col0;
    for (int64_t r = row_begin + threadIdx.y; r < row_end; r += kTileY) {
      const int64_t off = r * cols + col0, doff = r * 2 * cols + col0;
      T gv[kN], uv[kN], dv[kN], duv[kN], av[kN];
      load_vec<T>(g + off, vectorized, valid, gv);
      load_vec<T>(u + off, vectorized, valid, uv);
      load_vec<T>(dgu + doff, vectorized, valid, dv);
#pragma unroll
      for (int j = 0; j < kN; ++j) {
        float grad;
        const float act = activation<kAct, true>(to_float<T>(gv[j]), &grad);
        const float uf = to_float<T>(uv[j]), da = to_float<T>(dv[j]);
        av[j] = from_float<T>(act * uf);
        dv[j] = from_float<T>(da * uf * grad);
        duv[j] = from_float<T>(da * act);
        acc_g[j] += to_float<T>(dv[j]);  // the bias gradients sum the rounded dg, du
        acc_u[j] += to_float<T>(duv[j]);
      }
      store_vec<T>(dgu + doff, vectorized, valid, dv);
      store_vec<T>(dgu + doff + cols, vectorized, valid, duv);
      store_vec<T>(a + off, vectorized, valid, av);
    }
  }
  if (partials != nullptr) {
    float* row = partials + static_cast<int64_t>(blockIdx.y) * 2 * cols;
    write_column_partials<kN>(acc_g, row, cols);
    write_column_partials<kN>(acc_u, row + cols, cols);
  }
}

}  // namespace

cudaError_t gated_forward(const GatedForwardParams& p, cudaStream_t stream) {
  if (p.numel <= 0) return cudaSuccess;
  const bool vectorized = aligned16(p.g) && aligned16(p.u) && aligned16(p.a);
  FLOAT_SWITCH(p.dtype, [&] {
    ACT_SWITCH(p.act, kAct, [&] {
      const int64_t work = vectorized ? ceil_div64(p.numel, Vec<elem_t>::kN) : p.numel;
      const int64_t blocks = std::min(ceil_div64(work, kThreads), kMaxBlocks1D);
      gated_forward_kernel<elem_t, kAct><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          static_cast<const elem_t*>(p.g), static_cast<const elem_t*>(p.u), static_cast<elem_t*>(p.a), p.numel,
          vectorized);
    });
  });
  return cudaGetLastError();
}

cudaError_t gated_backward(const GatedBackwardParams& p, cudaStream_t stream) {
  if (p.cols <= 0) return cudaSuccess;
  if (p.rows <= 0) {  // empty sums
    if (p.dbias != nullptr)
      return cudaMemsetAsync(p.dbias, 0, static_cast<size_t>(2 * p.cols * dtype_size(p.dtype)), stream);
    return cudaSuccess;
  }
  const ColumnChunks chunks = column_chunks(p.rows);
  FLOAT_SWITCH(p.dtype, [&] {
    ACT_SWITCH(p.act, kAct, [&] {
      constexpr int kN = Vec<elem_t>::kN;
      const bool vectorized =
          p.cols % kN == 0 && aligned16(p.g) && aligned16(p.u) && aligned16(p.dgu) && aligned16(p.a);
      const dim3 grid(static_cast<unsigned>(ceil_div64(p.cols, kTileX * kN)), static_cast<unsigned>(chunks.count));
      float* partials = p.dbias != nullptr ? p.workspace : nullptr;
      gated_backward_kernel<elem_t, kAct><<<grid, dim3(kTileX, kTileY), 0, stream>>>(
          static_cast<const elem_t*>(p.g), static_cast<const elem_t*>(p.u), static_cast<elem_t*>(p.dgu),
          static_cast<elem_t*>(p.a), partials, p.rows, p.cols, chunks.rows_per_chunk, vectorized);
      if (partials != nullptr) launch_finalize<elem_t>(partials, p.dbias, chunks.count, 2 * p.cols, stream);
    });
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace gptfast
