// What the two row-normalisation kernels (layer_norm.cu, rms_norm.cu) share: the block shapes
// and register slots of their one-block-per-row forward and row-strided backward, the vector/scalar
// path choice, the backward's grid size, and the deterministic second kernel that sums the
// backward's per-block fp32 partial rows of dweight (and dbias) over blocks, and the host-side
// dispatch of their launch functions to the kernel instantiations. The algorithms are in each .cu
// file's header.
//
// Everything here has internal linkage (an anonymous namespace): each .cu file compiles its own
// copies, as when they were written in it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "common.cuh"
#include "static_switch.h"

namespace gptfast {
namespace cuda {
namespace {

constexpr int kFwdMaxThreads = 1024;
// 512, not 1024: the backward keeps ~16 elements' x, dy, w, dW and dB per thread in registers,
// more than the 64 registers a 1024-thread block allows.
constexpr int kBwdMaxThreads = 512;
// Forward block size target: enough 16-byte loads in flight per thread to cover DRAM latency
// without making small rows use few, long-running threads (a guess to tune with bench/).
constexpr int kFwdVecsPerThread = 4;
// Each backward block writes and the reduce kernel reads a (cols,) fp32 row per output: with at
// least this many rows per block that costs <= 1/6 of the row traffic of fp16 inputs.
constexpr int kBwdMinRowsPerBlock = 16;
// Reduce kernel tile: 32 columns x 32 partial rows per block.
constexpr int kReduceTile = 32;

// Register budgets, set from ptxas -v (CUDA 13.0, no spills on sm_80 or sm_90; tune with bench/):
// forward <= 64 registers per thread (1024-thread blocks), backward <= 128 (512 threads). The
// kernels declare __launch_bounds__(max threads, 1): without the explicit minimum of one block
// per SM, ptxas spilled a few bytes in the scalar fp32 forward on sm_90 to raise occupancy.
template <typename T, bool kVec>
struct NormConfig {
  // Elements per access.
  static constexpr int kVecElems = kVec ? 16 / static_cast<int>(sizeof(T)) : 1;
  // Forward accesses per thread kept in registers between the passes (about 40 registers in
  // all): 1024 threads x 4 vectors = rows of up to 32768 halves / 16384 floats; scalar path 8192.
  static constexpr int kFwdSlots = kVec ? kFwdVecsPerThread : 8;
  // Backward accesses per thread kept in registers (x, dy, w packed; dW and dB sums in fp32):
  // 16 elements for vectors (113-128 registers), 8 on the scalar path (70-80). With 512 threads,
  // rows of up to 8192 (4096) elements never touch the partial buffer until the end.
  static constexpr int kBwdSlots = kVec ? 16 / kVecElems : 8;
};

// fp32 partial sums of V columns. Aligned to at most 16 bytes (the widest access), so the
// partial buffers need only 16-byte alignment: V = 8 is accessed as two float4.
template <int V>
struct alignas(V * 4 > 16 ? 16 : V * 4) FloatPack {
  float v[V];
};

// The fused residual add: s = a + b for V columns, summed in fp32 and rounded once.
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> add_packs(const Pack<T, V> a, const Pack<T, V> b) {
  Pack<T, V> out;
#pragma unroll
  for (int e = 0; e < V; ++e) out.v[e] = from_float<T>(to_float(a.v[e]) + to_float(b.v[e]));
  return out;
}

// Pass 1 of both forwards (one block per row; thread t owns vectors t, t + blockDim.x, ...): the
// thread's first kSlots vectors of the row into `cache` (registers), with kResidual s = x + r
// computed and stored to s first; returns the thread's sum of stat(vector) over all its vectors
// (those beyond the slots are read and, with kResidual, stored, but not kept).
template <bool kResidual, int kSlots, typename P, typename Stat>
__device__ __forceinline__ float load_row(const P* x, const P* r, P* s, int nvec, P (&cache)[kSlots], Stat stat) {
  const int tid = threadIdx.x, nthr = blockDim.x;
  float acc = 0.f;
#pragma unroll
  for (int k = 0; k < kSlots; ++k) {
    const int i = tid + k * nthr;
    if (i < nvec) {
      if constexpr (kResidual) {
        cache[k] = add_packs(x[i], r[i]);
        s[i] = cache[k];
      } else {
        cache[k] = x[i];
      }
      acc += stat(cache[k]);
    }
  }
#pragma unroll 1
  for (int i = tid + kSlots * nthr; i < nvec; i += nthr) {
    if constexpr (kResidual) {
      const P v = add_packs(x[i], r[i]);
      s[i] = v;
      acc += stat(v);
    } else {
      acc += stat(x[i]);
    }
  }
  return acc;
}

// A later pass of the forwards over the row load_row read: f(vector, i) for each of the thread's
// vectors i, from `cache` for the slots, else re-read from src (x, or s as this thread stored it).
template <int kSlots, typename P, typename F>
__device__ __forceinline__ void for_row(const P (&cache)[kSlots], const P* src, int nvec, F f) {
  const int tid = threadIdx.x, nthr = blockDim.x;
#pragma unroll
  for (int k = 0; k < kSlots; ++k) {
    const int i = tid + k * nthr;
    if (i < nvec) f(cache[k], i);
  }
#pragma unroll 1
  for (int i = tid + kSlots * nthr; i < nvec; i += nthr) f(src[i], i);
}

// The backward's per-block partial rows: out[k][c] = sum_b partial[k][b * cols + c] for the
// outputs k < gridDim.y (dweight, then dbias for LayerNorm), rounded once to the dtype.
struct PartialSums {
  const float* partial[2];
  void* out[2];
  int cols;
  int num_blocks;
};

// Block (32, 32): thread (x, y) sums partial rows y, y + 32, ... of column 32 * blockIdx.x + x;
// then warp y sums the 32 per-thread results of column 32 * blockIdx.x + y through a padded
// shared tile. Fixed order: deterministic.
template <typename T>
__global__ void __launch_bounds__(kReduceTile * kReduceTile)
    reduce_partials_kernel(const PartialSums p) {
  __shared__ float tile[kReduceTile][kReduceTile + 1];
  // Selected, not indexed: p.partial[blockIdx.y] copied the parameter arrays to the stack.
  const bool second = blockIdx.y == 1;
  const float* src = second ? p.partial[1] : p.partial[0];
  T* dst = static_cast<T*>(second ? p.out[1] : p.out[0]);

  const int col0 = blockIdx.x * kReduceTile;
  const int col = col0 + threadIdx.x;
  float s = 0.f;
  if (col < p.cols) {
#pragma unroll 4
    for (int b = threadIdx.y; b < p.num_blocks; b += kReduceTile)
      s += src[static_cast<int64_t>(b) * p.cols + col];
  }
  tile[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  s = warp_sum(tile[threadIdx.x][threadIdx.y]);
  const int out_col = col0 + threadIdx.y;
  if (threadIdx.x == 0 && out_col < p.cols) dst[out_col] = from_float<T>(s);
}

// ---------------------------------------------------------------------------------------------
// Host side.

// Sums `outputs` (0..2) partial buffers of p into their outputs.
template <typename T>
cudaError_t reduce_partials(const PartialSums& p, int outputs, cudaStream_t stream) {
  if (outputs == 0) return cudaSuccess;
  const dim3 grid(ceil_div(p.cols, kReduceTile), outputs);
  reduce_partials_kernel<T><<<grid, dim3(kReduceTile, kReduceTile), 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
bool use_vec(int cols, std::initializer_list<const void*> ptrs) {
  if (cols % (16 / static_cast<int>(sizeof(T))) != 0) return false;
  for (const void* ptr : ptrs)
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;  // nullptr passes
  return true;
}

// The 16-byte path for a row of `cols` elements of `dtype` and these pointers.
inline bool use_vec(DType dtype, int cols, std::initializer_list<const void*> ptrs) {
  return FLOAT_SWITCH(dtype, [&] { return use_vec<elem_t>(cols, ptrs); });
}

// Warp multiple in [32, max_threads] nearest above want.
inline int round_threads(int want, int max_threads) {
  const int t = (want + kWarpSize - 1) / kWarpSize * kWarpSize;
  return std::min(std::max(t, kWarpSize), max_threads);
}

template <typename T, bool kVec>
int fwd_threads(int cols) {
  return round_threads(ceil_div(cols / NormConfig<T, kVec>::kVecElems, kFwdVecsPerThread),
                       kFwdMaxThreads);
}

// As many threads as fill the register slots, so that rows up to 8192 never take the slow path.
template <typename T, bool kVec>
int bwd_threads(int cols) {
  using C = NormConfig<T, kVec>;
  return round_threads(ceil_div(cols / C::kVecElems, C::kBwdSlots), kBwdMaxThreads);
}

// Grid of a row-strided backward `kernel` launched with `threads` threads over `rows` rows.
// Every resident block slot busy, unless that leaves fewer than kBwdMinRowsPerBlock rows per
// block (the partial rows would then cost more than the extra parallelism gains); even then at
// least two blocks per SM where they fit, and never a block without a row.
template <typename Kernel>
cudaError_t backward_grid(Kernel kernel, int threads, int64_t rows, int* num_blocks) {
  *num_blocks = 1;
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0);
  if (err != cudaSuccess) return err;
  const int64_t resident = static_cast<int64_t>(sms) * std::max(per_sm, 1);
  const int64_t amortised =
      std::max<int64_t>(2 * static_cast<int64_t>(sms), (rows + kBwdMinRowsPerBlock - 1) / kBwdMinRowsPerBlock);
  *num_blocks = static_cast<int>(std::max<int64_t>(1, std::min({resident, amortised, rows})));
  return cudaSuccess;
}

// The launch functions of both norms, after their own argument checks: the dispatch over dtype,
// the vector path (`vec`, use_vec of the op's pointers) and the fused residual add (forward) /
// its gradient (backward) to one of the 12 instantiations of the op's kernel. Kernels names the
// op's kernel templates: Kernels::fwd<T, kVec, kResidual>() and Kernels::bwd<T, kVec, kDResidual>()
// return them.
template <typename Kernels, typename Params>
cudaError_t norm_forward_launch(const Params& p, bool vec, cudaStream_t stream) {
  FLOAT_SWITCH(p.dtype, [&] {
    BOOL_SWITCH(vec, kVec, [&] {
      BOOL_SWITCH(p.residual != nullptr, kResidual, [&] {
        const auto fwd_kernel = Kernels::template fwd<elem_t, kVec, kResidual>();
        fwd_kernel<<<static_cast<unsigned>(p.rows), fwd_threads<elem_t, kVec>(p.cols), 0, stream>>>(p);
      });
    });
  });
  return cudaGetLastError();
}

template <typename Kernels, typename Params>
cudaError_t norm_backward_num_blocks(const Params& p, bool vec, int* num_blocks) {
  return FLOAT_SWITCH(p.dtype, [&] {
    return BOOL_SWITCH(vec, kVec, [&] {
      return BOOL_SWITCH(p.dresidual != nullptr, kDResidual, [&] {
        return backward_grid(Kernels::template bwd<elem_t, kVec, kDResidual>(),
                             bwd_threads<elem_t, kVec>(p.cols), p.rows, num_blocks);
      });
    });
  });
}

// The backward kernel on p.num_blocks blocks, then the sums of the first `outputs` partial buffers.
template <typename Kernels, typename Params>
cudaError_t norm_backward_launch(const Params& p, bool vec, const PartialSums& sums, int outputs,
                                 cudaStream_t stream) {
  return FLOAT_SWITCH(p.dtype, [&] {
    BOOL_SWITCH(vec, kVec, [&] {
      BOOL_SWITCH(p.dresidual != nullptr, kDResidual, [&] {
        const auto bwd_kernel = Kernels::template bwd<elem_t, kVec, kDResidual>();
        bwd_kernel<<<p.num_blocks, bwd_threads<elem_t, kVec>(p.cols), 0, stream>>>(p);
      });
    });
    const cudaError_t err = cudaGetLastError();
    return err != cudaSuccess ? err : reduce_partials<elem_t>(sums, outputs, stream);
  });
}

}  // namespace
}  // namespace cuda
}  // namespace gptfast
