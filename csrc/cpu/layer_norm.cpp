// LayerNorm and RMSNorm over the last dimension on the CPU, rows in parallel (RMSNorm: the
// section near the end, on the LayerNorm's row helpers).
//
// Forward: one pass over each row for the statistics -- shifted sums sum(x - x0), sum((x - x0)^2)
// over explicit lanes (x0 = the row's first element removes the offset that ruins a plain
// one-pass variance) -- then one pass writing y. Saved: mean and rstd per row (fp32; fp64 for fp64 inputs).
// Backward: per row, one pass for mean(g) and mean(g * xhat) (g = dy * w), one pass writing
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
// while accumulating dW += dy * xhat and dB += dy into per-thread partial rows, summed at the end
// (deterministic for a fixed thread count). bf16/fp16 rows are widened into an fp32 row buffer.
//
// Fused residual add (optional, both directions): the forward first writes each row of
// s = x + r (summed in fp32, rounded once to x's dtype) and normalises that row as rounded while
// it is still in cache, so the result is the unfused layer_norm(x + r)'s and memory sees one read
// of x and r and one write of s and y, not an add pass's extra write and re-read of s. The
// backward, given the saved s, adds the residual stream's gradient to dx in fp32 before dx's one
// rounding. Both are their own functions picked once per row, so the plain paths run the loops
// they ran before.
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../common/backend.h"
#include "../common/vec_math.h"

namespace gptfast {
namespace cpu {
namespace {

template <typename T>
GPTFAST_INLINE void row_stats_impl(const T* x, int64_t n, T eps, T* mean_out, T* rstd_out) {
  using V = typename vec::Vec<T>::type;
  constexpr int L = vec::Vec<T>::n;
  const T shift = x[0];
  const V vs = vec::vsplat<T>(shift);
  V s1a = vec::vsplat<T>(0), s1b = s1a, s2a = s1a, s2b = s1a;  // two chains each: FMA latency
  int64_t j = 0;
  for (; j + 2 * L <= n; j += 2 * L) {
    const V d0 = vec::vload(x + j) - vs, d1 = vec::vload(x + j + L) - vs;
    s1a += d0, s1b += d1;
    s2a += d0 * d0, s2b += d1 * d1;
  }
  for (; j + L <= n; j += L) {
    const V d0 = vec::vload(x + j) - vs;
    s1a += d0, s2a += d0 * d0;
  }
  T a = vec::vsum<T>(s1a + s1b), b = vec::vsum<T>(s2a + s2b);
  for (; j < n; ++j) {
    T d = x[j] - shift;
    a += d, b += d * d;
  }
  const T md = a / static_cast<T>(n);
  T var = b / static_cast<T>(n) - md * md;
  var = var < T(0) ? T(0) : var;  // keeps NaN
  *mean_out = shift + md;
  *rstd_out = T(1) / std::sqrt(var + eps);
}

// y = (x - mean) * rstd * w + b; w/b may be null.
template <typename T>
GPTFAST_INLINE void normalize_row_impl(const T* x, int64_t n, T mean, T rstd, const T* w, const T* b, T* y) {
  if (w && b) {
    for (int64_t j = 0; j < n; ++j) y[j] = (x[j] - mean) * rstd * w[j] + b[j];
  } else if (w) {
    for (int64_t j = 0; j < n; ++j) y[j] = (x[j] - mean) * rstd * w[j];
  } else if (b) {
    for (int64_t j = 0; j < n; ++j) y[j] = (x[j] - mean) * rstd + b[j];
  } else {
    for (int64_t j = 0; j < n; ++j) y[j] = (x[j] - mean) * rstd;
  }
}

// dx for one row (written to dx, which may alias dy or dres), and dW/dB partials; with kRes,
// dx += dres before the store.
template <typename T, bool kRes>
GPTFAST_INLINE void backward_row_impl(const T* x, const T* dy, const T* dres, int64_t n, T mean, T rstd,
                                      const T* w, T* dx, T* dw_part, T* db_part) {
  using V = typename vec::Vec<T>::type;
  constexpr int L = vec::Vec<T>::n;
  const V vm = vec::vsplat<T>(mean), vr = vec::vsplat<T>(rstd);
  V sg = vec::vsplat<T>(0), sgx = sg;
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    const V xh = (vec::vload(x + j) - vm) * vr;
    const V g = w ? vec::vload(dy + j) * vec::vload(w + j) : vec::vload(dy + j);
    sg += g;
    sgx += g * xh;
  }
  T a = vec::vsum<T>(sg), c = vec::vsum<T>(sgx);
  for (; j < n; ++j) {
    const T xh = (x[j] - mean) * rstd;
    const T g = w ? dy[j] * w[j] : dy[j];
    a += g, c += g * xh;
  }
  const T inv_n = T(1) / static_cast<T>(n);
  const T mg = a * inv_n, mgx = c * inv_n;
  const V vmg = vec::vsplat<T>(mg), vmgx = vec::vsplat<T>(mgx);
  for (j = 0; j + L <= n; j += L) {
    const V xh = (vec::vload(x + j) - vm) * vr;
    const V d = vec::vload(dy + j);
    const V g = w ? d * vec::vload(w + j) : d;
    if (dw_part) vec::vstore(dw_part + j, vec::vload(dw_part + j) + d * xh);
    if (db_part) vec::vstore(db_part + j, vec::vload(db_part + j) + d);
    V v = vr * (g - vmg - xh * vmgx);
    if constexpr (kRes) v += vec::vload(dres + j);
    vec::vstore(dx + j, v);
  }
  for (; j < n; ++j) {
    const T xh = (x[j] - mean) * rstd;
    const T d = dy[j];
    const T g = w ? d * w[j] : d;
    if (dw_part) dw_part[j] += d * xh;
    if (db_part) db_part[j] += d;
    T v = rstd * (g - mg - xh * mgx);
    if constexpr (kRes) v += dres[j];
    dx[j] = v;
  }
}

GPTFAST_VEC_CLONES void row_stats(const float* x, int64_t n, float eps, float* m, float* r) {
  row_stats_impl<float>(x, n, eps, m, r);
}
void row_stats(const double* x, int64_t n, double eps, double* m, double* r) {
  row_stats_impl<double>(x, n, eps, m, r);
}
GPTFAST_VEC_CLONES void normalize_row(const float* x, int64_t n, float mean, float rstd,
                                      const float* w, const float* b, float* y) {
  normalize_row_impl<float>(x, n, mean, rstd, w, b, y);
}
void normalize_row(const double* x, int64_t n, double mean, double rstd, const double* w,
                   const double* b, double* y) {
  normalize_row_impl<double>(x, n, mean, rstd, w, b, y);
}
GPTFAST_VEC_CLONES void backward_row(const float* x, const float* dy, int64_t n, float mean,
                                     float rstd, const float* w, float* dx, float* dw, float* db) {
  backward_row_impl<float, false>(x, dy, nullptr, n, mean, rstd, w, dx, dw, db);
}
void backward_row(const double* x, const double* dy, int64_t n, double mean, double rstd,
                  const double* w, double* dx, double* dw, double* db) {
  backward_row_impl<double, false>(x, dy, nullptr, n, mean, rstd, w, dx, dw, db);
}
GPTFAST_VEC_CLONES void backward_row_residual(const float* x, const float* dy, const float* dres,
                                              int64_t n, float mean, float rstd, const float* w,
                                              float* dx, float* dw, float* db) {
  backward_row_impl<float, true>(x, dy, dres, n, mean, rstd, w, dx, dw, db);
}
void backward_row_residual(const double* x, const double* dy, const double* dres, int64_t n,
                           double mean, double rstd, const double* w, double* dx, double* dw,
                           double* db) {
  backward_row_impl<double, true>(x, dy, dres, n, mean, rstd, w, dx, dw, db);
}
// s = a + b for fp32/fp64 rows: the sum in their own precision is the one rounding.
GPTFAST_VEC_CLONES void add_row(const float* a, const float* b, int64_t n, float* s) {
  for (int64_t j = 0; j < n; ++j) s[j] = a[j] + b[j];
}
void add_row(const double* a, const double* b, int64_t n, double* s) {
  for (int64_t j = 0; j < n; ++j) s[j] = a[j] + b[j];
}

GPTFAST_INLINE float bf16_bits_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// bf16 rows as bits: s = a + b summed in fp32, rounded to nearest even (NaN -> 0x7FC0, as
// c10::BFloat16), and s widened back into buf, in one loop. On the bits, in a vector clone: GCC 12
// does not vectorise this loop written with c10::BFloat16 (the copy of the rounded value is a
// memory-to-memory statement), and split in two (round, then widen) it runs on baseline 16-byte
// vectors, 4.7 ms against this one's 1.9 ms for 4096 x 768 (one thread, AVX-512 machine; the
// fused bf16 forward was 0.8x the unfused add + LayerNorm with the split loops).
GPTFAST_VEC_CLONES void add_row_bf16(const uint16_t* a, const uint16_t* b, int64_t n, uint16_t* s,
                                     float* buf) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = bf16_bits_to_float(a[j]) + bf16_bits_to_float(b[j]);
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    const uint16_t h = v != v ? uint16_t{0x7FC0}
                              : static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    s[j] = h;
    buf[j] = bf16_bits_to_float(h);
  }
}

template <typename scalar_t, typename acc_t>
inline const acc_t* widen(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<acc_t>(src[j]);
    return buf;
  }
}

// Row of s = x + r: summed in acc_t and rounded once into s, and returned as the acc_t row that
// is normalised (s itself, or the rounded values widened into buf).
template <typename scalar_t, typename acc_t>
inline const acc_t* add_residual(const scalar_t* x, const scalar_t* r, int64_t n, scalar_t* s,
                                 acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    add_row(x, r, n, s);
    return s;
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    static_assert(sizeof(c10::BFloat16) == sizeof(uint16_t));
    add_row_bf16(reinterpret_cast<const uint16_t*>(x), reinterpret_cast<const uint16_t*>(r), n,
                 reinterpret_cast<uint16_t*>(s), buf);
    return buf;
  } else {  // fp16: c10::Half's conversions, as the plain path's widen and narrow use
    for (int64_t j = 0; j < n; ++j)
      s[j] = static_cast<scalar_t>(static_cast<acc_t>(x[j]) + static_cast<acc_t>(r[j]));
    return widen<scalar_t, acc_t>(s, n, buf);
  }
}

// Rows per task: enough work (~32k elements) to amortise the scheduling.
inline int64_t grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

// res/s: the residual and the output s = x + res, both null without the fused add.
template <typename scalar_t>
void forward_impl(const at::Tensor& x, const at::Tensor* res, const at::Tensor* w, const at::Tensor* b,
                  double eps, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd, at::Tensor* s) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;
  const int64_t M = x.size(0), N = x.size(1);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  const scalar_t* resp = res ? res->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* sp = s ? s->data_ptr<scalar_t>() : nullptr;
  acc_t* mp = mean.data_ptr<acc_t>();
  acc_t* rp = rstd.data_ptr<acc_t>();
  // Affine parameters widened once (contiguous acc_t copies).
  std::vector<acc_t> wbuf(w ? N : 0), bbuf(b ? N : 0);
  if (w) {
    auto wc = w->contiguous();
    const scalar_t* p = wc.const_data_ptr<scalar_t>();
    for (int64_t j = 0; j < N; ++j) wbuf[j] = static_cast<acc_t>(p[j]);
  }
  if (b) {
    auto bc = b->contiguous();
    const scalar_t* p = bc.const_data_ptr<scalar_t>();
    for (int64_t j = 0; j < N; ++j) bbuf[j] = static_cast<acc_t>(p[j]);
  }
  const acc_t* wa = w ? wbuf.data() : nullptr;
  const acc_t* ba = b ? bbuf.data() : nullptr;
  const acc_t e = static_cast<acc_t>(eps);
  at::parallel_for(0, M, grain(N), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf(kDirect ? 0 : N), ybuf(kDirect ? 0 : N);
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* xr = resp ? add_residual<scalar_t, acc_t>(xp + r * N, resp + r * N, N, sp + r * N, xbuf.data())
                           : widen<scalar_t, acc_t>(xp + r * N, N, xbuf.data());
      acc_t mu, rs;
      row_stats(xr, N, e, &mu, &rs);
      acc_t* yr;
      if constexpr (kDirect) yr = yp + r * N; else yr = ybuf.data();
      normalize_row(xr, N, mu, rs, wa, ba, yr);
      if constexpr (!kDirect)
        for (int64_t j = 0; j < N; ++j) yp[r * N + j] = static_cast<scalar_t>(yr[j]);
      mp[r] = mu;
      rp[r] = rs;
    }
  });
}

// dres: the gradient of the forward's s (added to dx), or null.
template <typename scalar_t>
void backward_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor* w,
                   const at::Tensor& mean, const at::Tensor& rstd, bool has_bias,
                   const at::Tensor* dres, at::Tensor& dx, at::Tensor* dw, at::Tensor* db) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;
  const int64_t M = x.size(0), N = x.size(1);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  scalar_t* dxp = dx.data_ptr<scalar_t>();
  const scalar_t* drp = dres ? dres->const_data_ptr<scalar_t>() : nullptr;
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  at::Tensor mean_c = mean.to(acc_type).contiguous(), rstd_c = rstd.to(acc_type).contiguous();
  const acc_t* mp = mean_c.const_data_ptr<acc_t>();
  const acc_t* rp = rstd_c.const_data_ptr<acc_t>();
  std::vector<acc_t> wbuf(w ? N : 0);
  if (w) {
    auto wc = w->contiguous();
    const scalar_t* p = wc.const_data_ptr<scalar_t>();
    for (int64_t j = 0; j < N; ++j) wbuf[j] = static_cast<acc_t>(p[j]);
  }
  const acc_t* wa = w ? wbuf.data() : nullptr;
  const int nthreads = at::get_num_threads();
  // Per-thread partial sums of dW and dB: (nthreads, N) each, reduced after the loop.
  std::vector<acc_t> dw_part(w ? static_cast<size_t>(nthreads) * N : 0),
      db_part(has_bias ? static_cast<size_t>(nthreads) * N : 0);
  at::parallel_for(0, M, grain(N), [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    std::vector<acc_t> xbuf(kDirect ? 0 : N), dybuf(kDirect ? 0 : N), dxbuf(kDirect ? 0 : N);
    acc_t* dwp = w ? dw_part.data() + static_cast<size_t>(tid) * N : nullptr;
    acc_t* dbp = has_bias ? db_part.data() + static_cast<size_t>(tid) * N : nullptr;
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* xr = widen<scalar_t, acc_t>(xp + r * N, N, xbuf.data());
      const acc_t* dyr = widen<scalar_t, acc_t>(dyp + r * N, N, dybuf.data());
      if constexpr (kDirect) {
        if (drp)
          backward_row_residual(xr, dyr, drp + r * N, N, mp[r], rp[r], wa, dxp + r * N, dwp, dbp);
        else
          backward_row(xr, dyr, N, mp[r], rp[r], wa, dxp + r * N, dwp, dbp);
      } else {
        acc_t* dxr = dxbuf.data();
        backward_row(xr, dyr, N, mp[r], rp[r], wa, dxr, dwp, dbp);
        scalar_t* o = dxp + r * N;
        if (drp) {  // the residual's gradient joins dx before its one rounding
          const scalar_t* d = drp + r * N;
          for (int64_t j = 0; j < N; ++j) o[j] = static_cast<scalar_t>(dxr[j] + static_cast<acc_t>(d[j]));
        } else {
          for (int64_t j = 0; j < N; ++j) o[j] = static_cast<scalar_t>(dxr[j]);
        }
      }
    }
  });
  auto reduce = [&](const std::vector<acc_t>& part, at::Tensor* dst) {
    scalar_t* o = dst->data_ptr<scalar_t>();
    for (int64_t j = 0; j < N; ++j) {
      acc_t s = 0;
      for (int t = 0; t < nthreads; ++t) s += part[static_cast<size_t>(t) * N + j];
      o[j] = static_cast<scalar_t>(s);
    }
  };
  if (w) reduce(dw_part, dw);
  if (has_bias) reduce(db_part, db);
}

// ------------------------------------------------------------------ RMSNorm
// y = (x * rstd) * w', rstd = 1 / sqrt(mean(x^2) + eps), w' = offset + weight (widened once);
// backward with xhat = x * rstd, g = dy * w':
//   dx = rstd * (g - xhat * mean(g * xhat)),  dW += dy * xhat (per-thread partial rows).
// The same row loop, buffers and fused residual add as the LayerNorm above, without the mean.

template <typename T>
GPTFAST_INLINE T rms_rstd_impl(const T* x, int64_t n, T eps) {
  using V = typename vec::Vec<T>::type;
  constexpr int L = vec::Vec<T>::n;
  V a = vec::vsplat<T>(0), b = a;  // two chains: FMA latency
  int64_t j = 0;
  for (; j + 2 * L <= n; j += 2 * L) {
    const V d0 = vec::vload(x + j), d1 = vec::vload(x + j + L);
    a += d0 * d0, b += d1 * d1;
  }
  for (; j + L <= n; j += L) {
    const V d0 = vec::vload(x + j);
    a += d0 * d0;
  }
  T ss = vec::vsum<T>(a + b);
  for (; j < n; ++j) ss += x[j] * x[j];
  return T(1) / std::sqrt(ss / static_cast<T>(n) + eps);
}

template <typename T>
GPTFAST_INLINE void rms_scale_row_impl(const T* x, int64_t n, T rstd, const T* w, T* y) {
  if (w) {
    for (int64_t j = 0; j < n; ++j) y[j] = (x[j] * rstd) * w[j];
  } else {
    for (int64_t j = 0; j < n; ++j) y[j] = x[j] * rstd;
  }
}

// dx for one row (fp32/fp64, written to dx), dW partials; with kRes, dx += dres before the store.
template <typename T, bool kRes>
GPTFAST_INLINE void rms_backward_row_impl(const T* x, const T* dy, const T* dres, int64_t n, T rstd,
                                          const T* w, T* dx, T* dw_part) {
  using V = typename vec::Vec<T>::type;
  constexpr int L = vec::Vec<T>::n;
  const V vr = vec::vsplat<T>(rstd);
  V sgx = vec::vsplat<T>(0);
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    const V xh = vec::vload(x + j) * vr;
    const V g = w ? vec::vload(dy + j) * vec::vload(w + j) : vec::vload(dy + j);
    sgx += g * xh;
  }
  T c = vec::vsum<T>(sgx);
  for (; j < n; ++j) c += (w ? dy[j] * w[j] : dy[j]) * (x[j] * rstd);
  const T mgx = c / static_cast<T>(n);
  const V vmgx = vec::vsplat<T>(mgx);
  for (j = 0; j + L <= n; j += L) {
    const V xh = vec::vload(x + j) * vr;
    const V d = vec::vload(dy + j);
    const V g = w ? d * vec::vload(w + j) : d;
    if (dw_part) vec::vstore(dw_part + j, vec::vload(dw_part + j) + d * xh);
    V v = vr * (g - xh * vmgx);
    if constexpr (kRes) v += vec::vload(dres + j);
    vec::vstore(dx + j, v);
  }
  for (; j < n; ++j) {
    const T xh = x[j] * rstd;
    const T d = dy[j];
    const T g = w ? d * w[j] : d;
    if (dw_part) dw_part[j] += d * xh;
    T v = rstd * (g - xh * mgx);
    if constexpr (kRes) v += dres[j];
    dx[j] = v;
  }
}

GPTFAST_VEC_CLONES float rms_rstd(const float* x, int64_t n, float eps) { return rms_rstd_impl<float>(x, n, eps); }
double rms_rstd(const double* x, int64_t n, double eps) { return rms_rstd_impl<double>(x, n, eps); }
GPTFAST_VEC_CLONES void rms_scale_row(const float* x, int64_t n, float rstd, const float* w, float* y) {
  rms_scale_row_impl<float>(x, n, rstd, w, y);
}
void rms_scale_row(const double* x, int64_t n, double rstd, const double* w, double* y) {
  rms_scale_row_impl<double>(x, n, rstd, w, y);
}
GPTFAST_VEC_CLONES void rms_backward_row(const float* x, const float* dy, const float* dres, int64_t n,
                                         float rstd, const float* w, float* dx, float* dw) {
  if (dres) rms_backward_row_impl<float, true>(x, dy, dres, n, rstd, w, dx, dw);
  else rms_backward_row_impl<float, false>(x, dy, nullptr, n, rstd, w, dx, dw);
}
void rms_backward_row(const double* x, const double* dy, const double* dres, int64_t n, double rstd,
                      const double* w, double* dx, double* dw) {
  if (dres) rms_backward_row_impl<double, true>(x, dy, dres, n, rstd, w, dx, dw);
  else rms_backward_row_impl<double, false>(x, dy, nullptr, n, rstd, w, dx, dw);
}

// w' = offset + weight in acc_t, or empty without a weight.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> offset_weight(const at::Tensor* w, double offset, int64_t N) {
  std::vector<acc_t> buf(w ? N : 0);
  if (w) {
    auto wc = w->contiguous();
    const scalar_t* p = wc.const_data_ptr<scalar_t>();
    const acc_t o = static_cast<acc_t>(offset);
    for (int64_t j = 0; j < N; ++j) buf[j] = o + static_cast<acc_t>(p[j]);
  }
  return buf;
}

template <typename scalar_t>
void rms_forward_impl(const at::Tensor& x, const at::Tensor* res, const at::Tensor* w, double eps,
                      double offset, at::Tensor& y, at::Tensor& rstd, at::Tensor* s) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;
  const int64_t M = x.size(0), N = x.size(1);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  const scalar_t* resp = res ? res->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* sp = s ? s->data_ptr<scalar_t>() : nullptr;
  acc_t* rp = rstd.data_ptr<acc_t>();
  const std::vector<acc_t> wbuf = offset_weight<scalar_t, acc_t>(w, offset, N);
  const acc_t* wa = w ? wbuf.data() : nullptr;
  const acc_t e = static_cast<acc_t>(eps);
  at::parallel_for(0, M, grain(N), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf(kDirect ? 0 : N), ybuf(kDirect ? 0 : N);
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* xr = resp ? add_residual<scalar_t, acc_t>(xp + r * N, resp + r * N, N, sp + r * N, xbuf.data())
                             : widen<scalar_t, acc_t>(xp + r * N, N, xbuf.data());
      const acc_t rs = rms_rstd(xr, N, e);
      acc_t* yr;
      if constexpr (kDirect) yr = yp + r * N; else yr = ybuf.data();
      rms_scale_row(xr, N, rs, wa, yr);
      if constexpr (!kDirect)
        for (int64_t j = 0; j < N; ++j) yp[r * N + j] = static_cast<scalar_t>(yr[j]);
      rp[r] = rs;
    }
  });
}

template <typename scalar_t>
void rms_backward_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor* w, const at::Tensor& rstd,
                       double offset, const at::Tensor* dres, at::Tensor& dx, at::Tensor* dw) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;
  const int64_t M = x.size(0), N = x.size(1);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  scalar_t* dxp = dx.data_ptr<scalar_t>();
  const scalar_t* drp = dres ? dres->const_data_ptr<scalar_t>() : nullptr;
  at::Tensor rstd_c = rstd.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* rp = rstd_c.const_data_ptr<acc_t>();
  const std::vector<acc_t> wbuf = offset_weight<scalar_t, acc_t>(w, offset, N);
  const acc_t* wa = w ? wbuf.data() : nullptr;
  const int nthreads = at::get_num_threads();
  std::vector<acc_t> dw_part(w ? static_cast<size_t>(nthreads) * N : 0);  // (nthreads, N)
  at::parallel_for(0, M, grain(N), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf(kDirect ? 0 : N), dybuf(kDirect ? 0 : N), drbuf(kDirect || !drp ? 0 : N),
        dxbuf(kDirect ? 0 : N);
    acc_t* dwp = w ? dw_part.data() + static_cast<size_t>(at::get_thread_num()) * N : nullptr;
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* xr = widen<scalar_t, acc_t>(xp + r * N, N, xbuf.data());
      const acc_t* dyr = widen<scalar_t, acc_t>(dyp + r * N, N, dybuf.data());
      const acc_t* drr = drp ? widen<scalar_t, acc_t>(drp + r * N, N, drbuf.data()) : nullptr;
      if constexpr (kDirect) {
        rms_backward_row(xr, dyr, drr, N, rp[r], wa, dxp + r * N, dwp);
      } else {  // the residual's gradient joins dx in fp32, before dx's one rounding
        rms_backward_row(xr, dyr, drr, N, rp[r], wa, dxbuf.data(), dwp);
        for (int64_t j = 0; j < N; ++j) dxp[r * N + j] = static_cast<scalar_t>(dxbuf[j]);
      }
    }
  });
  if (w) {
    scalar_t* o = dw->data_ptr<scalar_t>();
    for (int64_t j = 0; j < N; ++j) {
      acc_t t = 0;
      for (int k = 0; k < nthreads; ++k) t += dw_part[static_cast<size_t>(k) * N + j];
      o[j] = static_cast<scalar_t>(t);
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> layer_norm_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, const std::optional<at::Tensor>& residual) {
  const int64_t M = x.size(0);
  at::Tensor y = at::empty(x.sizes(), x.options());
  std::optional<at::Tensor> s;
  if (residual.has_value()) s = at::empty(x.sizes(), x.options());
  // fp32 statistics (fp64 for fp64 inputs, as the reference launcher)
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({M}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({M}, x.options().dtype(acc));
  const at::Tensor* w = weight.has_value() ? &*weight : nullptr;
  const at::Tensor* b = bias.has_value() ? &*bias : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gptfast_layer_norm_fwd",
                                  [&] {
                                    forward_impl<scalar_t>(x, residual ? &*residual : nullptr, w, b,
                                                           eps, y, mean, rstd, s ? &*s : nullptr);
                                  });
  return {y, mean, rstd, s};
}

std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> layer_norm_backward(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, bool has_bias,
    const std::optional<at::Tensor>& dresidual) {
  const int64_t N = x.size(1);
  at::Tensor dx = at::empty(x.sizes(), x.options());
  const at::Tensor* w = weight.has_value() ? &*weight : nullptr;
  std::optional<at::Tensor> dw, db;
  if (w) dw = at::empty({N}, w->options());
  if (has_bias) db = at::empty({N}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "gptfast_layer_norm_bwd", [&] {
        backward_impl<scalar_t>(dy, x, w, mean, rstd, has_bias, dresidual ? &*dresidual : nullptr,
                                dx, dw ? &*dw : nullptr, db ? &*db : nullptr);
      });
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> rms_norm_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps, double offset,
    const std::optional<at::Tensor>& residual) {
  at::Tensor y = at::empty(x.sizes(), x.options());
  std::optional<at::Tensor> s;
  if (residual.has_value()) s = at::empty(x.sizes(), x.options());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor rstd = at::empty({x.size(0)}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gptfast_rms_norm_fwd", [&] {
    rms_forward_impl<scalar_t>(x, residual ? &*residual : nullptr, weight ? &*weight : nullptr, eps, offset, y,
                               rstd, s ? &*s : nullptr);
  });
  return {y, rstd, s};
}

std::tuple<at::Tensor, std::optional<at::Tensor>> rms_norm_backward(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight, const at::Tensor& rstd,
    double offset, const std::optional<at::Tensor>& dresidual) {
  at::Tensor dx = at::empty(x.sizes(), x.options());
  std::optional<at::Tensor> dw;
  if (weight.has_value()) dw = at::empty({x.size(1)}, weight->options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gptfast_rms_norm_bwd", [&] {
    rms_backward_impl<scalar_t>(dy, x, weight ? &*weight : nullptr, rstd, offset,
                                dresidual ? &*dresidual : nullptr, dx, dw ? &*dw : nullptr);
  });
  return {dx, dw};
}

}  // namespace cpu
}  // namespace gptfast
