// Turn runtime values (dtype, head dim, flags) into compile-time template parameters, so that each
// kernel is instantiated once per combination that exists and the dispatch stays one line:
//
//   FP16_SWITCH(is_bf16, [&] { launch<elem_t>(params, stream); });
//
// The lambda sees the chosen value as a constexpr name. Only the combinations listed here are
// compiled: keeping this list short is what keeps the CUDA build within minutes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define BOOL_SWITCH(COND, CONST_NAME, ...)   \
  [&] {                                      \
    if (COND) {                              \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                  \
    } else {                                 \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                  \
    }                                        \
  }()

// 16-bit element type: __half or __nv_bfloat16.
#define FP16_SWITCH(IS_BF16, ...)            \
  [&] {                                      \
    if (IS_BF16) {                           \
      using elem_t = __nv_bfloat16;          \
      return __VA_ARGS__();                  \
    } else {                                 \
      using elem_t = __half;                 \
      return __VA_ARGS__();                  \
    }                                        \
  }()

// 16-bit and 32-bit float element types: float, __half or __nv_bfloat16 (elementwise kernels).
#define FLOAT_SWITCH(DTYPE_CODE, ...)                                   \
  [&] {                                                                 \
    if ((DTYPE_CODE) == ::gptfast::cuda::DType::kFloat32) {             \
      using elem_t = float;                                             \
      return __VA_ARGS__();                                             \
    } else if ((DTYPE_CODE) == ::gptfast::cuda::DType::kBFloat16) {     \
      using elem_t = __nv_bfloat16;                                     \
      return __VA_ARGS__();                                             \
    } else {                                                            \
      using elem_t = __half;                                            \
      return __VA_ARGS__();                                             \
    }                                                                   \
  }()

// Padded head dims: every head dim up to 256 runs in the smallest instantiation that holds it;
// the kernels zero-fill the padding columns on load and never store them.
#define HEADDIM_SWITCH(HEADDIM, ...)         \
  [&] {                                      \
    if ((HEADDIM) <= 64) {                   \
      constexpr static int kHeadDim = 64;    \
      return __VA_ARGS__();                  \
    } else if ((HEADDIM) <= 128) {           \
      constexpr static int kHeadDim = 128;   \
      return __VA_ARGS__();                  \
    } else {                                 \
      constexpr static int kHeadDim = 256;   \
      return __VA_ARGS__();                  \
    }                                        \
  }()
