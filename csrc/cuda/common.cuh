// Device helpers shared by the CUDA kernels (csrc/cuda/*.cu). Plain CUDA: no torch headers here,
// so that nvcc's host pass over each .cu stays short (torch's headers cost ~40 s per file).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "types.h"

namespace gptfast {
namespace cuda {

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// V consecutive elements moved as one access (16 bytes when V * sizeof(T) == 16: the vectorised
// paths of the row kernels, layer_norm.cu, rms_norm.cu, linear_cross_entropy.cu).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

constexpr int kWarpSize = 32;

// Sum over the block (blockDim.x a multiple of 32, <= 1024) of one value per thread. `red` is a
// __shared__ float[32] (a template parameter so that the CPU emulator's checked arrays pass too).
// Every warp reduces the per-warp sums itself, so every thread gets the result, bitwise the same
// in all (the xor butterfly adds the same pairs in every lane). The leading barrier makes
// back-to-back calls on the same `red` safe.
template <typename Red>
__device__ __forceinline__ float block_sum(float v, Red& red) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / kWarpSize) ? static_cast<float>(red[lane]) : 0.f;
  return warp_sum(v);
}

// 2^x with the hardware approximation (ex2.approx, ~2 ulp); -inf gives 0 and NaN stays NaN.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace cuda
}  // namespace gptfast
