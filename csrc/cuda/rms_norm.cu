// RMSNorm over the last dimension on NVIDIA GPUs (sm_80+): the kernels and their launchers.
//
// Forward, one block per row: pass 1 sums x^2, pass 2 writes
//   y = x * rstd * w',   rstd = 1 / sqrt(mean(x^2) + eps),   w' = offset + weight (in fp32),
// or y = x * rstd without a weight (offset unused), rounded once (gptfast/ops/rms_norm.py's order).
// Each thread keeps its share of the row in registers between the passes (the slots of
// norm.cuh's NormConfig); only longer rows re-read the remainder. Saved for backward: rstd per
// row, fp32.
//
// Fused residual add (FlashAttention's rms_norm_fn(residual=, prenorm=True)), as LayerNorm's:
// pass 1 reads x and r, writes s = x + r (summed in fp32, rounded once) and normalises s as
// stored. The backward, given the saved s, adds the residual stream's gradient to dx in fp32
// before dx's one rounding.
//
// Backward, one kernel over a grid of ~#SM x occupancy blocks, each taking rows blockIdx.x,
// blockIdx.x + gridDim.x, ...: per row, one pass for mean(g * xhat) (g = dy * w', xhat = x * rstd),
// then dx = rstd * (g - xhat * mean(g * xhat)) from the same registers. A thread always owns the
// same columns: it keeps w' for them in fp32 registers and sums dW += dy * xhat across its block's
// rows, written once into its block's row of a (num_blocks, N) fp32 partial buffer (columns
// beyond the register slots accumulate in that partial row directly). norm.cuh's second kernel
// sums the partials over blocks in a fixed order: dW is deterministic, with no atomics.
//
// Design choices are LayerNorm's (layer_norm.cu's header): one block per row sized to the row,
// 16-byte accesses when N and every pointer allow them (else the scalar instantiation), fp32
// accumulation, rstd = 1 / sqrtf (IEEE), no fast-math (NaN/Inf propagate to their row's outputs).
// Template parameters: dtype, kVec and the residual add (forward) / its gradient (backward): 12
// instantiations per kernel. Weight presence is a uniform runtime branch.
#include "rms_norm.h"

#include <cstdint>

#include "norm.cuh"

namespace gptfast {
namespace cuda {
namespace {

template <typename T, int V>
__device__ __forceinline__ float pack_sq(const Pack<T, V> a) {
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const float x = to_float(a.v[e]);
    s += x * x;
  }
  return s;
}

// y for the V columns of vector i; w may be null (a uniform branch).
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> scale_row(const Pack<T, V> xv, int i, float rstd,
                                                const Pack<T, V>* w, float offset) {
  float y[V];
#pragma unroll
  for (int e = 0; e < V; ++e) y[e] = to_float(xv.v[e]) * rstd;
  if (w != nullptr) {
    const Pack<T, V> wv = w[i];
#pragma unroll
    for (int e = 0; e < V; ++e) y[e] *= offset + to_float(wv.v[e]);
  }
  Pack<T, V> out;
#pragma unroll
  for (int e = 0; e < V; ++e) out.v[e] = from_float<T>(y[e]);
  return out;
}

// w' = offset + w for V columns in fp32, or 1 without a weight.
template <typename T, int V>
__device__ __forceinline__ void load_scale(const Pack<T, V>* w, int i, float offset, float (&out)[V]) {
  if (w != nullptr) {
    const Pack<T, V> wv = w[i];
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] = offset + to_float(wv.v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] = 1.f;
  }
}

// dx for V columns; with kAdd, + dr (the residual's gradient) before the rounding.
template <bool kAdd, typename T, int V>
__device__ __forceinline__ Pack<T, V> input_grad(const Pack<T, V> xv, const Pack<T, V> dyv,
                                                 const float (&wv)[V], float rstd, float mean_gx,
                                                 const Pack<T, V> dr) {
  Pack<T, V> out;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const float xhat = to_float(xv.v[e]) * rstd;
    float d = rstd * (to_float(dyv.v[e]) * wv[e] - xhat * mean_gx);
    if constexpr (kAdd) d += to_float(dr.v[e]);
    out.v[e] = from_float<T>(d);
  }
  return out;
}

// Grid: one block per row. Block: fwd_threads(). Thread t handles vectors t, t + blockDim.x, ...
// kResidual: normalise s = x + residual, written to p.residual_out.
template <typename T, bool kVec, bool kResidual>
__global__ void __launch_bounds__(kFwdMaxThreads, 1)
    rms_norm_fwd_kernel(const RmsNormFwdParams p) {
  using C = NormConfig<T, kVec>;
  constexpr int V = C::kVecElems;
  constexpr int kSlots = C::kFwdSlots;
  using P = Pack<T, V>;
  __shared__ float red[kWarpSize];

  const int64_t row = blockIdx.x;
  const int nvec = p.cols / V;
  const int tid = threadIdx.x;
  const P* x = static_cast<const P*>(p.x) + row * nvec;
  const P* w = static_cast<const P*>(p.weight);
  P* y = static_cast<P*>(p.y) + row * nvec;
  const P* r = kResidual ? static_cast<const P*>(p.residual) + row * nvec : nullptr;
  P* s = kResidual ? static_cast<P*>(p.residual_out) + row * nvec : nullptr;
  // The row normalised: s as stored (the pass beyond the slots re-reads what this thread wrote).
  const P* src = kResidual ? s : x;

  P cache[kSlots] = {};  // zero-initialised: see layer_norm_fwd_kernel
  const float sq = load_row<kResidual>(x, r, s, nvec, cache, [](const P v) { return pack_sq(v); });
  const float rstd = 1.f / sqrtf(block_sum(sq, red) / static_cast<float>(p.cols) + p.eps);
  if (tid == 0) p.rstd[row] = rstd;
  for_row(cache, src, nvec, [&](const P v, int i) { y[i] = scale_row(v, i, rstd, w, p.offset); });
}

// Grid: num_blocks (<= rows) blocks, block b taking rows b, b + gridDim.x, ... Block:
// bwd_threads(). Thread t owns vectors t + k * blockDim.x (columns V times that) in every row:
// slots k < kSlots in registers, the rest through the partial row. kDResidual: dx += p.dresidual.
template <typename T, bool kVec, bool kDResidual>
__global__ void __launch_bounds__(kBwdMaxThreads, 1)
    rms_norm_bwd_kernel(const RmsNormBwdParams p) {
  using C = NormConfig<T, kVec>;
  constexpr int V = C::kVecElems;
  constexpr int kSlots = C::kBwdSlots;
  using P = Pack<T, V>;
  using F = FloatPack<V>;
  __shared__ float red[kWarpSize];

  const int nvec = p.cols / V;
  const int tid = threadIdx.x, nthr = blockDim.x;
  const P* w = static_cast<const P*>(p.weight);
  F* dw_part = p.dweight_partial != nullptr
                   ? reinterpret_cast<F*>(p.dweight_partial) + static_cast<int64_t>(blockIdx.x) * nvec
                   : nullptr;
  const float inv_n = 1.f / static_cast<float>(p.cols);

  float wc[kSlots][V], dw_acc[kSlots][V];
#pragma unroll
  for (int k = 0; k < kSlots; ++k) {
    const int i = tid + k * nthr;
    load_scale(i < nvec ? w : nullptr, i, p.offset, wc[k]);
#pragma unroll
    for (int e = 0; e < V; ++e) dw_acc[k][e] = 0.f;
  }

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const bool first_row = row == blockIdx.x;
    const P* x = static_cast<const P*>(p.x) + row * nvec;
    const P* dy = static_cast<const P*>(p.dy) + row * nvec;
    P* dx = static_cast<P*>(p.dx) + row * nvec;
    const P* dres = kDResidual ? static_cast<const P*>(p.dresidual) + row * nvec : nullptr;
    const float rstd = p.rstd[row];

    P xc[kSlots] = {}, dyc[kSlots] = {};  // zero-initialised: see layer_norm_fwd_kernel
    float sgx = 0.f;
#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      const int i = tid + k * nthr;
      if (i < nvec) {
        xc[k] = x[i];
        dyc[k] = dy[i];
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float xhat = to_float(xc[k].v[e]) * rstd;
          const float d = to_float(dyc[k].v[e]);
          sgx += d * wc[k][e] * xhat;
          dw_acc[k][e] += d * xhat;
        }
      }
    }
#pragma unroll 1
    for (int i = tid + kSlots * nthr; i < nvec; i += nthr) {
      const P xv = x[i], dyv = dy[i];
      float wv[V];
      load_scale(w, i, p.offset, wv);
      F dwv = {};  // the block's first row initialises the partial row
      if (dw_part != nullptr && !first_row) dwv = dw_part[i];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float xhat = to_float(xv.v[e]) * rstd;
        const float d = to_float(dyv.v[e]);
        sgx += d * wv[e] * xhat;
        dwv.v[e] += d * xhat;
      }
      if (dw_part != nullptr) dw_part[i] = dwv;
    }
    const float mean_gx = block_sum(sgx, red) * inv_n;

#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      const int i = tid + k * nthr;
      if (i < nvec) {
        P dr = {};
        if constexpr (kDResidual) dr = dres[i];
        dx[i] = input_grad<kDResidual>(xc[k], dyc[k], wc[k], rstd, mean_gx, dr);
      }
    }
#pragma unroll 1
    for (int i = tid + kSlots * nthr; i < nvec; i += nthr) {
      float wv[V];
      load_scale(w, i, p.offset, wv);
      P dr = {};
      if constexpr (kDResidual) dr = dres[i];
      dx[i] = input_grad<kDResidual>(x[i], dy[i], wv, rstd, mean_gx, dr);
    }
  }

  if (dw_part == nullptr) return;
#pragma unroll
  for (int k = 0; k < kSlots; ++k) {
    const int i = tid + k * nthr;
    if (i < nvec) {
      F dwv;
#pragma unroll
      for (int e = 0; e < V; ++e) dwv.v[e] = dw_acc[k][e];
      dw_part[i] = dwv;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

// The kernels for norm.cuh's launchers.
struct RmsNormKernels {
  template <typename T, bool kVec, bool kResidual>
  static auto fwd() { return rms_norm_fwd_kernel<T, kVec, kResidual>; }
  template <typename T, bool kVec, bool kDResidual>
  static auto bwd() { return rms_norm_bwd_kernel<T, kVec, kDResidual>; }
};

bool bwd_use_vec(const RmsNormBwdParams& p) {
  return use_vec(p.dtype, p.cols, {p.dy, p.x, p.dx, p.weight, p.dresidual, p.dweight_partial});
}

}  // namespace

cudaError_t rms_norm_forward_launch(const RmsNormFwdParams& p, cudaStream_t stream) {
  if (p.rows < 1 || p.rows > INT32_MAX || p.cols < 1 || p.cols > kRmsNormMaxCols ||
      (p.residual != nullptr) != (p.residual_out != nullptr))
    return cudaErrorInvalidValue;
  const bool vec = use_vec(p.dtype, p.cols, {p.x, p.weight, p.y, p.residual, p.residual_out});
  return norm_forward_launch<RmsNormKernels>(p, vec, stream);
}

cudaError_t rms_norm_backward_num_blocks(const RmsNormBwdParams& p, int* num_blocks) {
  *num_blocks = 1;
  if (p.rows < 1 || p.cols < 1 || p.cols > kRmsNormMaxCols) return cudaErrorInvalidValue;
  return norm_backward_num_blocks<RmsNormKernels>(p, bwd_use_vec(p), num_blocks);
}

cudaError_t rms_norm_backward_launch(const RmsNormBwdParams& p, cudaStream_t stream) {
  // Every block must own at least one row: its first row initialises the partial-row columns
  // that are accumulated in memory rather than in registers.
  if (p.rows < 1 || p.cols < 1 || p.cols > kRmsNormMaxCols || p.num_blocks < 1 ||
      p.num_blocks > p.rows || (p.dweight != nullptr) != (p.dweight_partial != nullptr))
    return cudaErrorInvalidValue;
  PartialSums sums{};
  sums.partial[0] = p.dweight_partial, sums.out[0] = p.dweight;
  sums.cols = p.cols, sums.num_blocks = p.num_blocks;
  return norm_backward_launch<RmsNormKernels>(p, bwd_use_vec(p), sums, p.dweight != nullptr, stream);
}

}  // namespace cuda
}  // namespace gptfast
