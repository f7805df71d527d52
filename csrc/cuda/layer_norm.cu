// LayerNorm over the last dimension on NVIDIA GPUs (sm_80+): the kernels and their launchers.
//
// Forward, one block per row: pass 1 sums the row, pass 2 sums (x - mean)^2, pass 3 writes
//   y = (x - mean) * rstd * w + b,   rstd = 1 / sqrt(biased var + eps).
// Two passes for the statistics (not E[x^2] - E[x]^2) keep the variance accurate for rows with a
// large offset. They cost no memory traffic because each thread keeps its share of the row in
// registers between the passes (kFwdSlots accesses: rows of up to 32768 halves or 16384 floats,
// 8192 on the scalar path); only longer rows re-read the remainder (from L1/L2). Saved for
// backward: mean and rstd per row, fp32.
//
// Fused residual add (FlashAttention's layer_norm_fn(residual=, prenorm=True)): pass 1 reads x and
// r, writes s = x + r (summed in fp32, rounded once to the dtype) and keeps s as rounded in the
// registers, so the row normalised is the stored s and the result is the unfused layer_norm(x + r).
// One read of x and r and one write of s and y, against an add kernel's extra write and re-read of
// s. Accesses beyond the register slots re-read s (written by the same thread). The backward, given
// the saved s, adds the residual stream's gradient to dx in fp32 before dx's one rounding.
//
// Backward, one kernel over a grid of ~#SM x occupancy blocks, each taking rows blockIdx.x,
// blockIdx.x + gridDim.x, ...: per row, one pass for mean(g) and mean(g * xhat) (g = dy * w,
// xhat = (x - mean) * rstd), then dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) from the
// same registers. A thread always owns the same columns, so it sums dW += dy * xhat and
// dB += dy for them across its block's rows in fp32 registers and writes them once into its
// block's row of a (num_blocks, N) fp32 partial buffer; columns beyond the register slots (rows
// longer than 8192, 4096 on the scalar path) are accumulated in that partial row directly
// (read-modify-write by the one thread that owns them). A second kernel sums the partials over
// blocks in a fixed order: dW and dB are deterministic for a given device, with no atomics.
//
// The block shapes, register slots, backward grid and partial-sum reduction are shared with
// rms_norm.cu (norm.cuh).
//
// Design choices:
// - One block per row, sized to the row (32..1024 threads, ~4 vectors per thread), rather than a
//   warp per row for small N: a GPT row of 768..12288 halves is 96..1536 vectors, which a warp
//   could not hold in registers, and a 32-thread block already is the one-warp case for rows of
//   up to 128 vectors (its block reduction then costs one shared-memory round trip). One kernel
//   covers 1..65536.
// - 16-byte accesses (8 halves or 4 floats) when N is a multiple of the vector width and every
//   pointer is 16-byte aligned, else a scalar instantiation of the same kernel (kVec = false).
// - fp32 accumulation everywhere; rstd is 1 / sqrtf (IEEE), not rsqrtf (approximate), since it is
//   computed once per row. No fast-math: NaN/Inf in a row propagate to that row's outputs.
// - dtype (fp32/fp16/bf16), kVec and the residual add (forward) / the residual gradient (backward)
//   are the template parameters (12 instantiations per kernel; the residual's is a template
//   parameter so that the plain kernels keep their code and registers); weight/bias presence are
//   uniform runtime branches.
#include "layer_norm.h"

#include <cstdint>

#include "norm.cuh"

namespace gptfast {
namespace cuda {
namespace {

template <typename T, int V>
__device__ __forceinline__ float pack_sum(const Pack<T, V> a) {
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < V; ++e) s += to_float(a.v[e]);
  return s;
}

template <typename T, int V>
__device__ __forceinline__ float pack_sq_dev(const Pack<T, V> a, float mean) {
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const float d = to_float(a.v[e]) - mean;
    s += d * d;
  }
  return s;
}

// y for the V columns of vector i; w, b may be null (uniform branches).
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> normalize(const Pack<T, V> xv, int i, float mean, float rstd,
                                                const Pack<T, V>* w, const Pack<T, V>* b) {
  float y[V];
#pragma unroll
  for (int e = 0; e < V; ++e) y[e] = (to_float(xv.v[e]) - mean) * rstd;
  if (w != nullptr) {
    const Pack<T, V> wv = w[i];
#pragma unroll
    for (int e = 0; e < V; ++e) y[e] *= to_float(wv.v[e]);
  }
  if (b != nullptr) {
    const Pack<T, V> bv = b[i];
#pragma unroll
    for (int e = 0; e < V; ++e) y[e] += to_float(bv.v[e]);
  }
  Pack<T, V> out;
#pragma unroll
  for (int e = 0; e < V; ++e) out.v[e] = from_float<T>(y[e]);
  return out;
}

// dx for V columns; with kAdd, + dr (the residual's gradient) before the rounding.
template <bool kAdd, typename T, int V>
__device__ __forceinline__ Pack<T, V> input_grad(const Pack<T, V> xv, const Pack<T, V> dyv,
                                                 const Pack<T, V> wv, float mean, float rstd,
                                                 float mean_g, float mean_gx, const Pack<T, V> dr) {
  Pack<T, V> out;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const float xhat = (to_float(xv.v[e]) - mean) * rstd;
    const float g = to_float(dyv.v[e]) * to_float(wv.v[e]);
    float d = rstd * (g - mean_g - xhat * mean_gx);
    if constexpr (kAdd) d += to_float(dr.v[e]);
    out.v[e] = from_float<T>(d);
  }
  return out;
}

__device__ __forceinline__ float2 block_sum2(float a, float b, float2* red) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  a = warp_sum(a);
  b = warp_sum(b);
  __syncthreads();
  if (lane == 0) red[warp] = make_float2(a, b);
  __syncthreads();
  const float2 v =
      lane < static_cast<int>(blockDim.x / kWarpSize) ? red[lane] : make_float2(0.f, 0.f);
  return make_float2(warp_sum(v.x), warp_sum(v.y));
}

// Grid: one block per row. Block: fwd_threads(). Thread t handles vectors t, t + blockDim.x, ...
// kResidual: normalise s = x + residual, written to p.residual_out.
template <typename T, bool kVec, bool kResidual>
__global__ void __launch_bounds__(kFwdMaxThreads, 1)
    layer_norm_fwd_kernel(const LayerNormFwdParams p) {
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
  const P* b = static_cast<const P*>(p.bias);
  P* y = static_cast<P*>(p.y) + row * nvec;
  const P* r = kResidual ? static_cast<const P*>(p.residual) + row * nvec : nullptr;
  P* s = kResidual ? static_cast<P*>(p.residual_out) + row * nvec : nullptr;
  // The row normalised: s as stored (the passes beyond the slots re-read what this thread wrote).
  const P* src = kResidual ? s : x;

  // Zero-initialised: left undefined where i >= nvec, ptxas moved the array to local memory.
  P cache[kSlots] = {};
  const float sum = load_row<kResidual>(x, r, s, nvec, cache, [](const P v) { return pack_sum(v); });
  const float mean = block_sum(sum, red) / static_cast<float>(p.cols);

  float sq = 0.f;
  for_row(cache, src, nvec, [&](const P v, int) { sq += pack_sq_dev(v, mean); });
  const float var = block_sum(sq, red) / static_cast<float>(p.cols);
  const float rstd = 1.f / sqrtf(var + p.eps);
  if (tid == 0) {
    p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
  for_row(cache, src, nvec, [&](const P v, int i) { y[i] = normalize(v, i, mean, rstd, w, b); });
}

// Grid: num_blocks (<= rows) blocks, block b taking rows b, b + gridDim.x, ... Block:
// bwd_threads(). Thread t owns vectors t + k * blockDim.x (columns V times that) in every row:
// slots k < kSlots in registers, the rest through the partial row. kDResidual: dx += p.dresidual.
template <typename T, bool kVec, bool kDResidual>
__global__ void __launch_bounds__(kBwdMaxThreads, 1)
    layer_norm_bwd_kernel(const LayerNormBwdParams p) {
  using C = NormConfig<T, kVec>;
  constexpr int V = C::kVecElems;
  constexpr int kSlots = C::kBwdSlots;
  using P = Pack<T, V>;
  using F = FloatPack<V>;
  __shared__ float2 red[kWarpSize];

  const int nvec = p.cols / V;
  const int tid = threadIdx.x, nthr = blockDim.x;
  const P* w = static_cast<const P*>(p.weight);
  const int64_t part_offset = static_cast<int64_t>(blockIdx.x) * nvec;
  F* dw_part = p.dweight_partial != nullptr ? reinterpret_cast<F*>(p.dweight_partial) + part_offset
                                            : nullptr;
  F* db_part = p.dbias_partial != nullptr ? reinterpret_cast<F*>(p.dbias_partial) + part_offset
                                          : nullptr;
  const float inv_n = 1.f / static_cast<float>(p.cols);

  // Without a weight, g = dy * 1 (exact, NaN-preserving) keeps a single code path.
  P ones;
#pragma unroll
  for (int e = 0; e < V; ++e) ones.v[e] = from_float<T>(1.f);

  P wc[kSlots];
  float dw_acc[kSlots][V], db_acc[kSlots][V];
#pragma unroll
  for (int k = 0; k < kSlots; ++k) {
    const int i = tid + k * nthr;
    wc[k] = (w != nullptr && i < nvec) ? w[i] : ones;
#pragma unroll
    for (int e = 0; e < V; ++e) dw_acc[k][e] = db_acc[k][e] = 0.f;
  }

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const bool first_row = row == blockIdx.x;
    const P* x = static_cast<const P*>(p.x) + row * nvec;
    const P* dy = static_cast<const P*>(p.dy) + row * nvec;
    P* dx = static_cast<P*>(p.dx) + row * nvec;
    const P* dres = kDResidual ? static_cast<const P*>(p.dresidual) + row * nvec : nullptr;
    const float mean = p.mean[row], rstd = p.rstd[row];

    P xc[kSlots] = {}, dyc[kSlots] = {};  // zero-initialised: see layer_norm_fwd_kernel
    float sg = 0.f, sgx = 0.f;
#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      const int i = tid + k * nthr;
      if (i < nvec) {
        xc[k] = x[i];
        dyc[k] = dy[i];
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float xhat = (to_float(xc[k].v[e]) - mean) * rstd;
          const float d = to_float(dyc[k].v[e]);
          const float g = d * to_float(wc[k].v[e]);
          sg += g;
          sgx += g * xhat;
          dw_acc[k][e] += d * xhat;
          db_acc[k][e] += d;
        }
      }
    }
#pragma unroll 1
    for (int i = tid + kSlots * nthr; i < nvec; i += nthr) {
      const P xv = x[i], dyv = dy[i];
      const P wv = w != nullptr ? w[i] : ones;
      F dwv = {}, dbv = {};  // the block's first row initialises the partial row
      if (dw_part != nullptr && !first_row) dwv = dw_part[i];
      if (db_part != nullptr && !first_row) dbv = db_part[i];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float xhat = (to_float(xv.v[e]) - mean) * rstd;
        const float d = to_float(dyv.v[e]);
        const float g = d * to_float(wv.v[e]);
        sg += g;
        sgx += g * xhat;
        dwv.v[e] += d * xhat;
        dbv.v[e] += d;
      }
      if (dw_part != nullptr) dw_part[i] = dwv;
      if (db_part != nullptr) db_part[i] = dbv;
    }
    const float2 sums = block_sum2(sg, sgx, red);
    const float mean_g = sums.x * inv_n, mean_gx = sums.y * inv_n;

#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      const int i = tid + k * nthr;
      if (i < nvec) {
        P dr = {};
        if constexpr (kDResidual) dr = dres[i];
        dx[i] = input_grad<kDResidual>(xc[k], dyc[k], wc[k], mean, rstd, mean_g, mean_gx, dr);
      }
    }
#pragma unroll 1
    for (int i = tid + kSlots * nthr; i < nvec; i += nthr) {
      const P wv = w != nullptr ? w[i] : ones;
      P dr = {};
      if constexpr (kDResidual) dr = dres[i];
      dx[i] = input_grad<kDResidual>(x[i], dy[i], wv, mean, rstd, mean_g, mean_gx, dr);
    }
  }

#pragma unroll
  for (int k = 0; k < kSlots; ++k) {
    const int i = tid + k * nthr;
    if (i < nvec) {
      F dwv, dbv;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        dwv.v[e] = dw_acc[k][e];
        dbv.v[e] = db_acc[k][e];
      }
      if (dw_part != nullptr) dw_part[i] = dwv;
      if (db_part != nullptr) db_part[i] = dbv;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

// The kernels for norm.cuh's launchers.
struct LayerNormKernels {
  template <typename T, bool kVec, bool kResidual>
  static auto fwd() { return layer_norm_fwd_kernel<T, kVec, kResidual>; }
  template <typename T, bool kVec, bool kDResidual>
  static auto bwd() { return layer_norm_bwd_kernel<T, kVec, kDResidual>; }
};

bool bwd_use_vec(const LayerNormBwdParams& p) {
  return use_vec(p.dtype, p.cols,
                 {p.dy, p.x, p.dx, p.weight, p.dresidual, p.dweight_partial, p.dbias_partial});
}

}  // namespace

cudaError_t layer_norm_forward_launch(const LayerNormFwdParams& p, cudaStream_t stream) {
  if (p.rows < 1 || p.rows > INT32_MAX || p.cols < 1 || p.cols > kLayerNormMaxCols)
    return cudaErrorInvalidValue;
  if ((p.residual != nullptr) != (p.residual_out != nullptr)) return cudaErrorInvalidValue;
  const bool vec = use_vec(p.dtype, p.cols, {p.x, p.weight, p.bias, p.y, p.residual, p.residual_out});
  return norm_forward_launch<LayerNormKernels>(p, vec, stream);
}

cudaError_t layer_norm_backward_num_blocks(const LayerNormBwdParams& p, int* num_blocks) {
  *num_blocks = 1;
  if (p.rows < 1 || p.cols < 1 || p.cols > kLayerNormMaxCols) return cudaErrorInvalidValue;
  return norm_backward_num_blocks<LayerNormKernels>(p, bwd_use_vec(p), num_blocks);
}

cudaError_t layer_norm_backward_launch(const LayerNormBwdParams& p, cudaStream_t stream) {
  // Every block must own at least one row: its first row initialises the partial-row columns
  // that are accumulated in memory rather than in registers.
  if (p.rows < 1 || p.cols < 1 || p.cols > kLayerNormMaxCols || p.num_blocks < 1 ||
      p.num_blocks > p.rows || (p.dweight != nullptr) != (p.dweight_partial != nullptr) ||
      (p.dbias != nullptr) != (p.dbias_partial != nullptr))
    return cudaErrorInvalidValue;
  // dW (when wanted) first, then dB
  PartialSums sums{};
  int outputs = 0;
  if (p.dweight != nullptr) sums.partial[outputs] = p.dweight_partial, sums.out[outputs++] = p.dweight;
  if (p.dbias != nullptr) sums.partial[outputs] = p.dbias_partial, sums.out[outputs++] = p.dbias;
  sums.cols = p.cols, sums.num_blocks = p.num_blocks;
  return norm_backward_launch<LayerNormKernels>(p, bwd_use_vec(p), sums, outputs, stream);
}

}  // namespace cuda
}  // namespace gptfast
