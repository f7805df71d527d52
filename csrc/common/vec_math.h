// Element-wise math for the CPU kernels, written so that GCC/Clang auto-vectorise it at -O3
// without -ffast-math (which would break NaN propagation): no libm calls in the float paths,
// reductions over explicit lanes, selects instead of branches.
//
// GPTFAST_VEC_CLONES compiles a function for AVX-512, AVX2+FMA and baseline x86-64 and picks
// one at load time (ifunc); the build itself stays portable (no -march=native).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(GPTFAST_NO_CLONES)
#define GPTFAST_VEC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GPTFAST_VEC_CLONES
#endif

// Helpers called from a GPTFAST_VEC_CLONES function must be inlined into it to be compiled for the
// clone's ISA: a plain `inline` helper is compiled once, for the baseline.
#if defined(__GNUC__) || defined(__clang__)
#define GPTFAST_INLINE inline __attribute__((always_inline))
#else
#define GPTFAST_INLINE inline
#endif

namespace gptfast {
namespace vec {

constexpr int kLanes = 16;  // explicit partial sums: vectorisable without reassociation

// 64-byte GCC/Clang vectors for the reductions: one zmm register in the AVX-512 clone, two ymm or
// four xmm in the others. (Plain lane arrays get vectorised across rows and transposed by GCC.)
typedef float vfloat __attribute__((vector_size(64)));
typedef double vdouble __attribute__((vector_size(64)));
template <typename T> struct Vec;
template <> struct Vec<float> { using type = vfloat; static constexpr int n = 16; };
template <> struct Vec<double> { using type = vdouble; static constexpr int n = 8; };

template <typename T>
GPTFAST_INLINE typename Vec<T>::type vload(const T* p) {
  typename Vec<T>::type v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
GPTFAST_INLINE void vstore(T* p, typename Vec<T>::type v) {
  __builtin_memcpy(p, &v, sizeof(v));
}
template <typename T>
GPTFAST_INLINE typename Vec<T>::type vsplat(T x) {
  typename Vec<T>::type v;
  for (int i = 0; i < Vec<T>::n; ++i) v[i] = x;
  return v;
}
template <typename T>
GPTFAST_INLINE T vsum(typename Vec<T>::type v) {
  T s = 0;
  for (int i = 0; i < Vec<T>::n; ++i) s += v[i];
  return s;
}
template <typename T>
GPTFAST_INLINE T vmax(typename Vec<T>::type v) {
  T m = v[0];
  for (int i = 1; i < Vec<T>::n; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// exp(x) in float, Cephes' polynomial (max rel. error ~2 ulp). NaN -> NaN, -inf -> 0, large -> inf.
GPTFAST_INLINE float exp_f32(float x) {
  const float hi = 88.3762626647949f, lo = -87.3365447504f;
  float xc = x > hi ? hi : (x < lo ? lo : x);
  xc = xc == xc ? xc : 0.f;  // keep the integer conversion below defined; NaN restored at the end
  // round(xc * log2(e)) with the 1.5 * 2^23 trick (no SSE4.1 needed in the baseline clone)
  float n = xc * 1.44269504088896341f + 12582912.f;
  n = n - 12582912.f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t e = static_cast<int32_t>(n) + 127;
  uint32_t bits = static_cast<uint32_t>(e) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  float res = p * two_n;
  res = x < lo ? 0.f : res;
  res = x > hi ? std::numeric_limits<float>::infinity() : res;
  res = x == x ? res : x;  // NaN in, NaN out
  return res;
}

GPTFAST_INLINE double exp_f(double x) { return std::exp(x); }
GPTFAST_INLINE float exp_f(float x) { return exp_f32(x); }

// tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2|u|): no cancellation for large |u|, abs error
// ~1 ulp(1) near 0 (GELU multiplies it by h/2, so the GELU error stays ~1 ulp).
GPTFAST_INLINE float tanh_f32(float u) {
  float a = std::fabs(u);
  float e = exp_f32(-2.f * a);
  float t = (1.f - e) / (1.f + e);
  return std::copysign(t, u);
}

constexpr double kSqrt2OverPi = 0.79788456080286535588;
constexpr double kTanhCubic = 0.044715;
constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;

// GELU and its derivative. tanh form: GPT-2's gelu_new; exact form: erf (libm, scalar).
template <typename T>
GPTFAST_INLINE void gelu_and_grad(T h, bool tanh_approx, T* act, T* grad);

template <>
GPTFAST_INLINE void gelu_and_grad<float>(float h, bool tanh_approx, float* act, float* grad) {
  if (tanh_approx) {
    const float c = static_cast<float>(kSqrt2OverPi), a = static_cast<float>(kTanhCubic);
    float t = tanh_f32(c * (h + a * h * h * h));
    if (act) *act = 0.5f * h * (1.f + t);
    if (grad) *grad = 0.5f * (1.f + t) + 0.5f * h * (1.f - t * t) * c * (1.f + 3.f * a * h * h);
  } else {
    float e = std::erf(h * static_cast<float>(kInvSqrt2));
    if (act) *act = 0.5f * h * (1.f + e);
    if (grad) *grad = 0.5f * (1.f + e) + h * std::exp(-0.5f * h * h) * static_cast<float>(kInvSqrt2Pi);
  }
}

template <>
GPTFAST_INLINE void gelu_and_grad<double>(double h, bool tanh_approx, double* act, double* grad) {
  if (tanh_approx) {
    double t = std::tanh(kSqrt2OverPi * (h + kTanhCubic * h * h * h));
    if (act) *act = 0.5 * h * (1.0 + t);
    if (grad) *grad = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * kSqrt2OverPi * (1.0 + 3.0 * kTanhCubic * h * h);
  } else {
    double e = std::erf(h * kInvSqrt2);
    if (act) *act = 0.5 * h * (1.0 + e);
    if (grad) *grad = 0.5 * (1.0 + e) + h * std::exp(-0.5 * h * h) * kInvSqrt2Pi;
  }
}

// tanh for attention's softcap (csrc/cpu/attention.cpp, kvcache.cpp), relative error ~1e-7: libm's tanhf made a softcapped fp32 forward 2.5x
// slower at T = 1024, D = 64. vec::tanh_f32 (exp-based) has an absolute error of ~1 ulp of 1,
// which softcap * tanh would turn into ~softcap * 6e-8 on small scores, so |x| < 1/4 takes
// tanh's Taylor series to x^9 instead (next term < 1e-8 relative); libm in double.
GPTFAST_INLINE float softcap_tanh(float x) {
  if (std::fabs(x) < 0.25f) {
    const float x2 = x * x;
    return x * (1.f + x2 * (-1.f / 3 + x2 * (2.f / 15 + x2 * (-17.f / 315 + x2 * (62.f / 2835)))));
  }
  return vec::tanh_f32(x);
}
GPTFAST_INLINE double softcap_tanh(double x) { return std::tanh(x); }

}  // namespace vec
}  // namespace gptfast
