// Small row-major GEMMs for the attention tiles, on the BLAS that libtorch already carries.
//
// ATen does not export raw-pointer GEMMs (at::native::cpublas::gemm is hidden), and at::mm
// costs several microseconds of dispatch per call -- as much as a 64x64x64 tile's math. So we look
// up the Fortran sgemm/dgemm symbol that libtorch_cpu (MKL) or a loaded BLAS exports, once, with
// dlsym; if none is found we use the blocked loops below (correct, slower) and say so in info().
// Inside at::parallel_for the BLAS runs single-threaded (it sees an active OpenMP region).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

#include "vec_math.h"

namespace gptfast {
namespace blas {

using sgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                         const float*, const int*, const float*, const int*, const float*, float*,
                         const int*, size_t, size_t);
using dgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                         const double*, const int*, const double*, const int*, const double*, double*,
                         const int*, size_t, size_t);

struct Blas {
  sgemm_t sgemm = nullptr;
  dgemm_t dgemm = nullptr;
  std::string source = "built-in loops (no BLAS symbol found)";
};

inline void* find_symbol(void* handle, const char* const* names) {
  for (const char* const* n = names; *n; ++n) {
    if (void* p = dlsym(handle, *n)) return p;
  }
  return nullptr;
}

inline const Blas& get() {
  static const Blas blas = [] {
    Blas b;
    static const char* const snames[] = {"sgemm_", "SGEMM", "sgemm", nullptr};
    static const char* const dnames[] = {"dgemm_", "DGEMM", "dgemm", nullptr};
    void* s = find_symbol(RTLD_DEFAULT, snames);
    void* d = find_symbol(RTLD_DEFAULT, dnames);
    std::string where = "process";
    if (!s || !d) {
      // libtorch_cpu is loaded RTLD_LOCAL by Python: open it by the path of one of its functions.
      Dl_info info;
      if (dladdr(reinterpret_cast<void*>(&at::get_num_threads), &info) && info.dli_fname) {
        if (void* h = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD)) {
          if (!s) s = find_symbol(h, snames);
          if (!d) d = find_symbol(h, dnames);
          where = info.dli_fname;
        }
      }
    }
    if (s && d) {
      b.sgemm = reinterpret_cast<sgemm_t>(s);
      b.dgemm = reinterpret_cast<dgemm_t>(d);
      b.source = "BLAS sgemm/dgemm from " + where;
    }
    return b;
  }();
  return blas;
}

// Fallback: C(m x n) = alpha * A(m x k) * B(k x n) + beta * C with element strides, vectorised
// over the contiguous n dimension of B and C when their column stride is 1.
template <typename T>
inline void loops_gemm(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t a_rs,
                       int64_t a_cs, const T* b, int64_t b_rs, int64_t b_cs, T beta, T* c,
                       int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    T* ci = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) ci[j] = beta == T(0) ? T(0) : beta * ci[j];
    for (int64_t p = 0; p < k; ++p) {
      const T av = alpha * a[i * a_rs + p * a_cs];
      const T* bp = b + p * b_rs;
      if (b_cs == 1) {
        for (int64_t j = 0; j < n; ++j) ci[j] += av * bp[j];
      } else {
        for (int64_t j = 0; j < n; ++j) ci[j] += av * bp[j * b_cs];
      }
    }
  }
}

// The leading dimension (row pitch) of a row-major operand stored as rows x cols. BLAS requires
// ld >= cols even when there is a single row, whose pitch is never used: a caller may legitimately
// hand a tensor's seqlen stride at seqlen 1 (any value, e.g. 1 for a permuted view), so a
// one-row operand gets the smallest valid pitch instead. A pitch below cols with several rows
// (overlapping rows) or one beyond int range is a caller's bug: MKL would print "Parameter N was
// incorrect on entry to SGEMM" on stderr, skip the product and leave garbage in C, so it is an
// exception here, never a silent wrong answer.
inline int64_t checked_ld(const char* which, int64_t ld, int64_t rows, int64_t cols) {
  if (rows <= 1) ld = std::max<int64_t>(ld, cols);
  TORCH_CHECK(ld >= std::max<int64_t>(1, cols) && ld <= std::numeric_limits<int>::max(),
              "gptfast internal error: BLAS operand ", which, " (", rows, " x ", cols,
              ") has row pitch ", ld, "; it must be in [max(1, ", cols, "), INT_MAX]");
  return ld;
}

// Column-major BLAS call for row-major operands: row-major C = op(A) op(B) is column-major
// C^T = op(B)^T op(A)^T, so the operands swap and keep their transpose flags.
template <typename T>
inline void call(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                 const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  TORCH_CHECK(m <= std::numeric_limits<int>::max() && n <= std::numeric_limits<int>::max() &&
                  k <= std::numeric_limits<int>::max(),
              "gptfast internal error: GEMM size ", m, " x ", n, " x ", k, " exceeds BLAS's int range");
  // A is stored m x k (k x m when transposed), B k x n (n x k), C m x n.
  lda = checked_ld("A", lda, ta ? k : m, ta ? m : k);
  ldb = checked_ld("B", ldb, tb ? n : k, tb ? k : n);
  ldc = checked_ld("C", ldc, m, n);
  const Blas& bl = get();
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
  const char TA = tb ? 'T' : 'N', TB = ta ? 'T' : 'N';
  if (k <= 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (bl.sgemm) {
      bl.sgemm(&TA, &TB, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC, 1, 1);
      return;
    }
  } else {
    if (bl.dgemm) {
      bl.dgemm(&TA, &TB, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC, 1, 1);
      return;
    }
  }
  // A is (m x k): row-major (ta=false) strides (lda, 1); stored transposed (ta=true): (1, lda).
  loops_gemm<T>(m, n, k, alpha, a, ta ? 1 : lda, ta ? lda : 1, b, tb ? 1 : ldb, tb ? ldb : 1, beta,
                c, ldc);
}

// Row-major helpers named by the operand layouts: n = as stored, t = transposed.
// C(m x n) = alpha * A(m x k) B(n x k)^T + beta * C
template <typename T>
inline void gemm_nt(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                    int64_t ldb, T beta, T* c, int64_t ldc) {
  call<T>(false, true, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
// C(m x n) = alpha * A(m x k) B(k x n) + beta * C
template <typename T>
inline void gemm_nn(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                    int64_t ldb, T beta, T* c, int64_t ldc) {
  call<T>(false, false, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
// C(m x n) = alpha * A(k x m)^T B(k x n) + beta * C
template <typename T>
inline void gemm_tn(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                    int64_t ldb, T beta, T* c, int64_t ldc) {
  call<T>(true, false, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace blas
}  // namespace gptfast
