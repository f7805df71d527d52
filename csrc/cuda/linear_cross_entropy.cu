// The logits epilogue of gptfast.linear_cross_entropy on NVIDIA GPUs (the chunk driver and its
// cuBLAS GEMMs are gptfast/ops/linear_cross_entropy.py's): one fp32 chunk of logits z (C, V),
// turned in place into the gradient of sum(row_scale * loss) and the per-row losses
//
//   z' = softcap * tanh(z / softcap) (or z),  lse = log sum_j exp(z'_j),
//   loss = lse - (1 - eps) z'_y - eps / V sum_j z'_j,
//   dz_j = scale * (exp(z'_j - lse) - eps / V - (1 - eps) [j == y]) * (1 - (z'_j / softcap)^2).
//
// One block per row, two sweeps: (1) each thread keeps an online max m and sum-exp s (s rescaled
// by exp(m_old - m_new) when the max grows) and the sum of z' over its columns, softcapping z in
// place when the gradient follows (so that the second sweep reads z' instead of recomputing tanh);
// the block combines the (m, s, sum) triples; (2) with row_scale, each thread rewrites its own
// columns with dz. One read of z without gradients, two reads and up to two writes with them:
// the buffer is 4 V bytes a row, far more than a block can hold on chip, so the second sweep
// re-reads it (from L2 for rows that fit there). Rows whose target is ignore_index take a scalar
// path: loss 0 and, with gradients, a zeroed row.
//
// Design choices:
// - 16-byte accesses (4 floats) when V % 4 == 0 and z is 16-byte aligned, else a scalar
//   instantiation; with/without gradient is the other template parameter (4 kernels).
// - The max starts at -FLT_MAX, not -inf, so that exp(z - m) of a -inf logit is 0, never
//   exp(-inf + inf) = NaN; a NaN logit fails every comparison, enters s as exp(NaN) and makes the
//   row's loss and gradient NaN (as torch's). The combine of two triples is symmetric to the bit,
//   so every thread of the block gets the same statistics.
// - expf/logf/tanhf are CUDA's precise functions (no fast-math): the sweeps are memory-bound.
#include "linear_cross_entropy.h"

#include <cfloat>
#include <climits>
#include <cstdint>

#include "common.cuh"
#include "static_switch.h"

namespace gptfast {
namespace cuda {
namespace {

constexpr int kMaxThreads = 512;

// A row's running statistics: max, sum of exp(z' - max), sum of z'. 16-byte aligned: one
// shared-memory access per warp's entry.
struct alignas(16) RowStats {
  float m, s, sum;
};

__device__ __forceinline__ float rescaled(float s, float m_from, float m_to) {
  return m_from == m_to ? s : s * expf(m_from - m_to);
}

__device__ __forceinline__ RowStats combine(const RowStats a, const RowStats b) {
  const float m = fmaxf(a.m, b.m);
  return {m, rescaled(a.s, a.m, m) + rescaled(b.s, b.m, m), a.sum + b.sum};
}

__device__ __forceinline__ void add_logit(RowStats& st, float z) {
  if (z > st.m) {
    st.s = st.s * expf(st.m - z) + 1.f;
    st.m = z;
  } else {
    st.s += expf(z - st.m);  // NaN: exp(NaN) makes s NaN
  }
  st.sum += z;
}

__device__ __forceinline__ RowStats warp_combine(RowStats st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const RowStats o = {__shfl_xor_sync(0xffffffffu, st.m, offset),
                        __shfl_xor_sync(0xffffffffu, st.s, offset),
                        __shfl_xor_sync(0xffffffffu, st.sum, offset)};
    st = combine(st, o);
  }
  return st;
}

// The combined statistics of the block (blockDim.x a multiple of 32), the same in every thread.
// Called once per block, so `red` needs no leading barrier.
template <typename Red>
__device__ __forceinline__ RowStats block_combine(RowStats st, Red& red) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  st = warp_combine(st);
  if (lane == 0) red[warp] = st;
  __syncthreads();
  RowStats v = {-FLT_MAX, 0.f, 0.f};
  if (lane < static_cast<int>(blockDim.x / kWarpSize)) v = red[lane];
  return warp_combine(v);
}

// Grid: one block per row. Block: a warp multiple <= kMaxThreads; thread t owns vectors
// t, t + blockDim.x, ... of its row in both sweeps. kGrad: row_scale given, z becomes dz.
template <bool kVec, bool kGrad>
__global__ void __launch_bounds__(kMaxThreads) cross_entropy_logits_kernel(const CrossEntropyParams p) {
  constexpr int V = kVec ? 4 : 1;
  using P = Pack<float, V>;
  __shared__ RowStats red[kWarpSize];

  const int64_t row = blockIdx.x;
  const int vocab = static_cast<int>(p.vocab);
  const int nvec = vocab / V;
  const int tid = threadIdx.x, nthr = blockDim.x;
  P* z = reinterpret_cast<P*>(p.z + row * p.vocab);
  const int64_t y = p.targets[row];

  if (y == p.ignore_index) {  // uniform over the block
    if (tid == 0) p.losses[row] = 0.f;
    if constexpr (kGrad) {
      const P zero = {};
      for (int i = tid; i < nvec; i += nthr) z[i] = zero;
    }
    return;
  }

  const bool capped = p.softcap > 0.f;
  const float inv_cap = capped ? 1.f / p.softcap : 0.f;
  RowStats st = {-FLT_MAX, 0.f, 0.f};
  for (int i = tid; i < nvec; i += nthr) {
    P v = z[i];
    if (capped) {
#pragma unroll
      for (int e = 0; e < V; ++e) v.v[e] = p.softcap * tanhf(v.v[e] * inv_cap);
      if constexpr (kGrad) z[i] = v;
    }
#pragma unroll
    for (int e = 0; e < V; ++e) add_logit(st, v.v[e]);
  }
  st = block_combine(st, red);  // its barrier also publishes the softcapped row to the block
  const float lse = st.m + logf(st.s);
  const float eps = p.label_smoothing;

  // The loss, by the thread that owns column y: it reads z_y (z'_y when the sweep wrote it back)
  // before its own second sweep overwrites it, so no other thread's write can race with the read.
  const bool valid = y >= 0 && y < p.vocab;
  if (tid == (valid ? static_cast<int>(y / V % nthr) : 0)) {
    float loss = nanf("");  // a target outside [0, V)
    if (valid) {
      float zy = p.z[row * p.vocab + y];
      if (capped && !kGrad) zy = p.softcap * tanhf(zy * inv_cap);
      loss = lse - (1.f - eps) * zy;
      if (eps > 0.f) loss -= eps / static_cast<float>(vocab) * st.sum;
    }
    p.losses[row] = loss;
  }
  if constexpr (!kGrad) return;

  const float scale = p.row_scale[row];
  const float a = scale / st.s, b = scale * eps / static_cast<float>(vocab), c = scale * (1.f - eps);
  for (int i = tid; i < nvec; i += nthr) {
    P v = z[i];
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float zc = v.v[e];
      float g = expf(zc - st.m) * a - b;
      if (static_cast<int64_t>(i) * V + e == y) g -= c;
      if (capped) {
        const float t = zc * inv_cap;
        g *= 1.f - t * t;
      }
      v.v[e] = g;
    }
    z[i] = v;
  }
}

}  // namespace

cudaError_t cross_entropy_logits_launch(const CrossEntropyParams& p, cudaStream_t stream) {
  if (p.rows < 1 || p.rows > INT_MAX || p.vocab < 1 || p.vocab > INT_MAX) return cudaErrorInvalidValue;
  const bool vec = p.vocab % 4 == 0 && reinterpret_cast<uintptr_t>(p.z) % 16 == 0;
  const int64_t per_thread = vec ? p.vocab / 4 : p.vocab;
  // One access per thread and sweep at least (small V), else kMaxThreads.
  const int threads = static_cast<int>(
      per_thread >= kMaxThreads ? kMaxThreads : (per_thread + kWarpSize - 1) / kWarpSize * kWarpSize);
  BOOL_SWITCH(vec, kVec, [&] {
    BOOL_SWITCH(p.row_scale != nullptr, kGrad, [&] {
      cross_entropy_logits_kernel<kVec, kGrad><<<static_cast<unsigned>(p.rows), threads, 0, stream>>>(p);
    });
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace gptfast
