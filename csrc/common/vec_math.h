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

// c ? a : b through integer masks. A float select whose operands are computed only for it gets
// turned into a branch by GCC, and, under the default -ftrapping-math, cannot be if-converted back
// without AVX-512's masked instructions: the AVX2 and baseline clones of a loop with such selects
// were left scalar. Integer AND/OR never trap.
GPTFAST_INLINE float select_f32(bool c, float a, float b) {
  uint32_t ua, ub;
  std::memcpy(&ua, &a, sizeof(ua));
  std::memcpy(&ub, &b, sizeof(ub));
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  const uint32_t r = (ua & m) | (ub & ~m);
  float f;
  std::memcpy(&f, &r, sizeof(f));
  return f;
}

// exp(x) in float, Cephes' polynomial (max rel. error ~2 ulp). NaN -> NaN, -inf -> 0, large -> inf.
// The clamps and special cases are select_f32s, not float ?:, so that a loop calling it vectorises
// in the AVX2 and baseline clones too (the float ?: became branches there: "control flow in loop").
GPTFAST_INLINE float exp_f32(float x) {
  const float hi = 88.3762626647949f, lo = -87.3365447504f;
  float xc = select_f32(x > hi, hi, select_f32(x < lo, lo, x));
  xc = select_f32(xc == xc, xc, 0.f);  // keep the integer conversion below defined; NaN restored at the end
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
  res = select_f32(x < lo, 0.f, res);
  res = select_f32(x > hi, std::numeric_limits<float>::infinity(), res);
  return select_f32(x == x, res, x);  // NaN in, NaN out
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

// erf(x) in float, for the exact GELU. libm's erff is a scalar call, which kept the exact-GELU
// loops of gelu_ffn from vectorising (2.2x slower than eager PyTorch). Three polynomials in
// a = |x|, all evaluated and one selected, so that the loops vectorise. The first two intervals
// follow fdlibm's s_erf.c (x + x q(x^2) near 0, then an expansion about a point near 1); its
// exp(-x^2) R(x) tail is a third polynomial here, without the exp, which made the forward GELU
// pass 2.5x as slow (1.9 against 0.77 ns per element, AVX-512):
//   a < 0.8125:           a + a q(a^2), q of degree 5: the sum's leading 1 is exact, so the
//                         rounding of 2/sqrt(pi) (5e-8 relative) never reaches the result;
//   0.8125 <= a < 1.3125: erf(c) + s M(s), s = a - c, c = 1.05334687, M of degree 7;
//   1.3125 <= a < 3.925:  erf(d) + s H(s), s = a - d, d = 2.61675, H of degree 13;
//   a >= 3.925:           1 (erfc(3.92) < 2^-25: float's erf is 1 from about there on).
// c and d are floats whose erf is within 1e-12 of a float, so that the constant terms are exact
// too; s is exact (Sterbenz: a within a factor 2 of c, of d), and the terms s^k M_k (k >= 1)
// sum to at most 0.13 (0.07 for H), so that the result is about one rounding from the polynomial.
// q, M and H are near-minimax fits made for this file (Lawson's iteratively reweighted least
// squares on 3000 Chebyshev points, truth from mpmath at 30 digits), rounded to float one
// coefficient at a time, lowest order first, refitting the higher ones after each rounding;
// error with the rounded coefficients: q 3.9e-9 relative (of erf), M 1.0e-9 and H 1.8e-9
// absolute. Measured against libm's double erf over every float: max error 0.80 ulp (4.8e-8
// absolute) in the FMA clones (AVX2, AVX-512), 0.90 ulp (5.4e-8) in the baseline clone (no FMA).
// NaN -> NaN, +-inf -> +-1, -0 -> -0; odd by construction.
GPTFAST_INLINE float erf_f32(float x) {
  const float a = std::fabs(x);
  const float t = a * a;
  float q = -0.00065049628f;
  q = q * t + 0.00508148922f;
  q = q * t + -0.0268195979f;
  q = q * t + 0.112831116f;
  q = q * t + -0.376126051f;
  q = q * t + 0.128379166f;
  const float e_lo = a + a * q;
  const float s = a - 1.05334687f;
  float m = 0.0125153642f;
  m = m * s + 0.00926403701f;
  m = m * s + -0.066823259f;
  m = m * s + 0.0510248654f;
  m = m * s + 0.151181579f;
  m = m * s + -0.391885966f;
  m = m * s + 0.372038692f;
  const float e_mid = m * s + 0.863685668f;
  const float u = a - 2.61675f;
  float r = 2.05295237e-06f;
  r = r * u + -8.00986527e-06f;
  r = r * u + -3.79260678e-06f;
  r = r * u + 7.4980926e-05f;
  r = r * u + -0.000166685888f;
  r = r * u + 4.69885999e-05f;
  r = r * u + 0.000683990016f;
  r = r * u + -0.00228679553f;
  r = r * u + 0.00432790676f;
  r = r * u + -0.00559036387f;
  r = r * u + 0.00507234875f;
  r = r * u + -0.00313646649f;
  r = r * u + 0.00119858701f;
  const float e_hi = r * u + 0.999784946f;
  float res = select_f32(a < 0.8125f, e_lo, select_f32(a < 1.3125f, e_mid, e_hi));
  res = select_f32(a < 3.925f, res, 1.f);
  res = std::copysign(res, x);
  return select_f32(x == x, res, x);  // NaN in, NaN out
}

// exp(-h^2 / 2) for GELU': exp by Cody-Waite reduction, exp(z) = 2^n exp(r), |r| <= ln2 / 2,
// exp(r) = 1 + r + r^2 P(r), P of degree 4 (a fit made like erf_f32's: 3.1e-9 relative), the
// 2^n added to the exponent bits. Specialised to its argument z = -h^2/2 <= 0: exp(z) is flushed
// to 0 below z = -86 (h^2 > 172; h exp(z) / sqrt(2 pi) < 1e-36 there), which also takes NaN and
// +-inf (both give 0: GELU' is then NaN through h * 0, as for the fp64 reference). Error: that
// of z (the rounding of h^2, 2^-24 |z| relative) plus 8.4e-8 relative (measured over every float).
GPTFAST_INLINE float gauss_f32(float h) {
  const float z = -0.5f * h * h;
  const float zc = select_f32(z > -86.f, z, -86.f);
  float n = zc * 1.44269504f + 12582912.f;  // round(z / ln 2) with the 1.5 * 2^23 trick
  n = n - 12582912.f;
  float r = zc - n * 0.693359375f;  // ln 2 to 9 bits: n times it is exact
  r = r - n * -2.12194440e-4f;
  float p = 0.00138206338f;
  p = p * r + 0.00836867373f;
  p = p * r + 0.0416682661f;
  p = p * r + 0.166665211f;
  p = p * r + 0.49999994f;
  p = p * r * r + r + 1.f;
  uint32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += static_cast<uint32_t>(static_cast<int32_t>(n)) << 23;  // p * 2^n, n >= -124: stays normal
  float res;
  std::memcpy(&res, &bits, sizeof(res));
  return select_f32(z > -86.f, res, 0.f);
}

constexpr double kSqrt2OverPi = 0.79788456080286535588;
constexpr double kTanhCubic = 0.044715;
constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;

// GELU and its derivative. tanh form: GPT-2's gelu_new; exact form: erf (erf_f32 in float, libm in
// double).
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
    float e = erf_f32(h * static_cast<float>(kInvSqrt2));
    if (act) *act = 0.5f * h * (1.f + e);
    if (grad) *grad = 0.5f * (1.f + e) + h * gauss_f32(h) * static_cast<float>(kInvSqrt2Pi);
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

// SiLU(g) = g * s and its derivative s * (1 + g * (1 - s)), s = sigmoid(g) = 1 / (1 + exp(-g)),
// for gated_ffn's SwiGLU, without libm calls in float (vectorisable); exp(-g) overflows to inf
// for g < -88, giving s = 0 (SiLU = -0, SiLU' = 0), and NaN propagates.
template <typename T>
GPTFAST_INLINE void silu_and_grad(T g, T* act, T* grad) {
  const T s = T(1) / (T(1) + exp_f(-g));
  if (act) *act = g * s;
  if (grad) *grad = s * (T(1) + g * (T(1) - s));
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
