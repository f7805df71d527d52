// Attention on the CPU: FlashAttention-2 (Dao, 2023, Algorithms 1 and 2) tiled for caches.
//
// Forward: every (batch, head, block of BQ queries) is one task. It streams blocks of BK keys:
// S = scale Q K^T (BLAS tile GEMM), online softmax (running max m and sum l per row, the output
// accumulator rescaled by exp(m_old - m_new)), O += P V. Causal blocks above the diagonal are
// never visited. Saved: out and lse = m + log(l) per row (-inf and out = 0 for a row without keys).
// Backward: every (batch, head) is one task (so dQ needs no atomics): delta = rowsum(dO * O),
// then per key block j, for each query block i that sees it, P = exp(S - lse) is recomputed and
//   dV_j += P^T dO_i,  dS = P * (dO_i V_j^T - delta),  dK_j += scale dS^T Q_i,  dQ_i += scale dS K_j.
// Memory: O(T * D) per thread, never T x T. Accumulation in fp32 (fp64 for fp64 inputs); bf16/fp16
// tiles are widened to fp32 before the GEMMs, fp32/fp64 tiles are read in place through strides.
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/blas.h"
#include "../common/backend.h"
#include "../common/vec_math.h"

namespace gptfast {
namespace cpu {
namespace {

// Tile sizes: BQ query rows x BK keys. Measured on 2 AVX-512 cores (D = 32/64, T = 128..2048,
// against 64x64, 128x128 and 32x64): 64 x 128 is within 5 % of the best everywhere; 128 x 128
// was up to 20 % slower in backward, 32 x 64 up to 12 % slower at T = 2048.
constexpr int64_t BQ = 64;
constexpr int64_t BK = 128;

// One row of the online softmax. `row` holds scale * q_i . k_j for the nk keys of this block, of
// which the first `valid` are unmasked; on return it holds p_j = exp(s_j - m_new) (0 when masked),
// m and l are updated and the output row (D values) is rescaled by exp(m_old - m_new).
template <typename T>
GPTFAST_INLINE void softmax_update_row_impl(T* row, int64_t valid, int64_t nk, T* m, T* l, T* orow,
                                    int64_t D) {
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t j = valid; j < nk; ++j) row[j] = T(0);
  if (valid <= 0) return;
  using V = typename vec::Vec<T>::type;
  constexpr int L = vec::Vec<T>::n;
  V vm = vec::vsplat<T>(ninf);
  int64_t j = 0;
  for (; j + L <= valid; j += L) {
    const V x = vec::vload(row + j);
    vm = x > vm ? x : vm;  // NaN is skipped here, kept by exp below
  }
  T mx = vec::vmax<T>(vm);
  for (; j < valid; ++j) mx = row[j] > mx ? row[j] : mx;
  const T m_old = *m;
  const T m_new = mx > m_old ? mx : m_old;
  const T m_use = m_new == ninf ? T(0) : m_new;  // all keys -inf so far: p = 0, no NaN
  const T alpha = vec::exp_f(m_old - m_use);
  T sum = 0;
  for (j = 0; j < valid; ++j) {  // exp does not vectorise well across the lane sums: keep apart
    row[j] = vec::exp_f(row[j] - m_use);
  }
  V vsum = vec::vsplat<T>(0);
  for (j = 0; j + L <= valid; j += L) vsum += vec::vload(row + j);
  sum = vec::vsum<T>(vsum);
  for (; j < valid; ++j) sum += row[j];
  *l = *l * alpha + sum;
  *m = m_new;
  if (alpha != T(1))
    for (int64_t d = 0; d < D; ++d) orow[d] *= alpha;
}

GPTFAST_VEC_CLONES void softmax_update_row(float* row, int64_t valid, int64_t nk, float* m, float* l,
                                           float* orow, int64_t D) {
  softmax_update_row_impl<float>(row, valid, nk, m, l, orow, D);
}
void softmax_update_row(double* row, int64_t valid, int64_t nk, double* m, double* l, double* orow,
                        int64_t D) {
  softmax_update_row_impl<double>(row, valid, nk, m, l, orow, D);
}

// Backward, one row: p_j = exp(s_j - lse) for the `valid` unmasked keys, 0 otherwise.
template <typename T>
GPTFAST_INLINE void probs_row_impl(T* row, int64_t valid, int64_t nk, T lse) {
  const bool has_keys = lse != -std::numeric_limits<T>::infinity();
  if (!has_keys) valid = 0;
  for (int64_t j = 0; j < valid; ++j) row[j] = vec::exp_f(row[j] - lse);
  for (int64_t j = valid; j < nk; ++j) row[j] = T(0);
}
GPTFAST_VEC_CLONES void probs_row(float* row, int64_t valid, int64_t nk, float lse) {
  probs_row_impl<float>(row, valid, nk, lse);
}
void probs_row(double* row, int64_t valid, int64_t nk, double lse) {
  probs_row_impl<double>(row, valid, nk, lse);
}

// Backward, one row: p_j <- p_j * (dp_j - delta), in place (dS overwrites P).
template <typename T>
GPTFAST_INLINE void dsoftmax_row_impl(T* p, const T* dp, int64_t nk, T delta) {
  for (int64_t j = 0; j < nk; ++j) p[j] = p[j] * (dp[j] - delta);
}
GPTFAST_VEC_CLONES void dsoftmax_row(float* p, const float* dp, int64_t nk, float delta) {
  dsoftmax_row_impl<float>(p, dp, nk, delta);
}
void dsoftmax_row(double* p, const double* dp, int64_t nk, double delta) {
  dsoftmax_row_impl<double>(p, dp, nk, delta);
}

// Widen `rows` rows of D values (row stride `ld`) into a dense acc_t buffer.
template <typename scalar_t, typename acc_t>
inline void load_rows(const scalar_t* src, int64_t ld, int64_t rows, int64_t D, acc_t* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) dst[r * D + d] = static_cast<acc_t>(src[r * ld + d]);
}

template <typename scalar_t, typename acc_t>
inline void store_rows(const acc_t* src, int64_t rows, int64_t D, scalar_t* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) dst[r * ld + d] = static_cast<scalar_t>(src[r * D + d]);
}

inline int64_t valid_keys(bool causal, int64_t qi, int64_t k0, int64_t nk) {
  if (!causal) return nk;
  return std::min(nk, std::max<int64_t>(0, qi - k0 + 1));
}

template <typename scalar_t>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                  at::Tensor& lse, bool causal, double scale_d) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;  // GEMMs read the inputs in place
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t sqb = q.stride(0), sqt = q.stride(1), sqh = q.stride(2);
  const int64_t skb = k.stride(0), skt = k.stride(1), skh = k.stride(2);
  const int64_t svb = v.stride(0), svt = v.stride(1), svh = v.stride(2);
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  acc_t* lp = lse.data_ptr<acc_t>();
  const acc_t scale = static_cast<acc_t>(scale_d);
  const int64_t nqb = (T + BQ - 1) / BQ;

  at::parallel_for(0, B * H * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qbuf(kDirect ? 0 : BQ * D), kbuf(kDirect ? 0 : BK * D),
        vbuf(kDirect ? 0 : BK * D), s(BQ * BK), o(BQ * D), m(BQ), l(BQ);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t bh = idx / nqb, qb = idx % nqb, b = bh / H, h = bh % H;
      const int64_t q0 = qb * BQ, nq = std::min(BQ, T - q0);
      const scalar_t* qt = qp + b * sqb + h * sqh + q0 * sqt;
      const acc_t* Q;
      int64_t ldq;
      if constexpr (kDirect) {
        Q = qt, ldq = sqt;
      } else {
        load_rows(qt, sqt, nq, D, qbuf.data());
        Q = qbuf.data(), ldq = D;
      }
      std::fill(o.begin(), o.begin() + nq * D, acc_t(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(l.begin(), l.end(), acc_t(0));
      const int64_t kend = causal ? std::min(T, q0 + nq) : T;
      for (int64_t k0 = 0; k0 < kend; k0 += BK) {
        const int64_t nk = std::min(BK, kend - k0);
        const scalar_t* kt = kp + b * skb + h * skh + k0 * skt;
        const scalar_t* vt = vp + b * svb + h * svh + k0 * svt;
        const acc_t *K, *V;
        int64_t ldk, ldv;
        if constexpr (kDirect) {
          K = kt, ldk = skt, V = vt, ldv = svt;
        } else {
          load_rows(kt, skt, nk, D, kbuf.data());
          load_rows(vt, svt, nk, D, vbuf.data());
          K = kbuf.data(), ldk = D, V = vbuf.data(), ldv = D;
        }
        blas::gemm_nt<acc_t>(nq, nk, D, scale, Q, ldq, K, ldk, acc_t(0), s.data(), BK);
        for (int64_t i = 0; i < nq; ++i)
          softmax_update_row(s.data() + i * BK, valid_keys(causal, q0 + i, k0, nk), nk, &m[i], &l[i],
                             o.data() + i * D, D);
        blas::gemm_nn<acc_t>(nq, D, nk, acc_t(1), s.data(), BK, V, ldv, acc_t(1), o.data(), D);
      }
      for (int64_t i = 0; i < nq; ++i) {
        const bool has_keys = l[i] > acc_t(0) || l[i] != l[i];  // NaN propagates, 0 means no keys
        const acc_t inv = has_keys ? acc_t(1) / l[i] : acc_t(0);
        acc_t* orow = o.data() + i * D;
        scalar_t* dst = op + ((b * T + q0 + i) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(orow[d] * inv);
        lp[bh * T + q0 + i] =
            has_keys ? m[i] + std::log(l[i]) : -std::numeric_limits<acc_t>::infinity();
      }
    }
  });
}

template <typename scalar_t>
void backward_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq,
                   at::Tensor& dk, at::Tensor& dv, bool causal, double scale_d) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  const scalar_t* dop = dout.const_data_ptr<scalar_t>();
  const scalar_t* outp = out.const_data_ptr<scalar_t>();
  const acc_t* lsep = lse.const_data_ptr<acc_t>();
  const int64_t lse_sb = lse.stride(0), lse_sh = lse.stride(1), lse_st = lse.stride(2);
  scalar_t* dqp = dq.data_ptr<scalar_t>();
  scalar_t* dkp = dk.data_ptr<scalar_t>();
  scalar_t* dvp = dv.data_ptr<scalar_t>();
  const acc_t scale = static_cast<acc_t>(scale_d);

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    const int64_t dense = kDirect ? 0 : T * D;
    std::vector<acc_t> qf(dense), kf(dense), vf(dense), dof(dense), dqacc(T * D), dkb(BK * D),
        dvb(BK * D), s(BQ * BK), dp(BQ * BK), delta(T), lrow(T);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const scalar_t* qt = qp + b * q.stride(0) + h * q.stride(2);
      const scalar_t* kt = kp + b * k.stride(0) + h * k.stride(2);
      const scalar_t* vt = vp + b * v.stride(0) + h * v.stride(2);
      const scalar_t* dot = dop + b * dout.stride(0) + h * dout.stride(2);
      const scalar_t* ot = outp + b * out.stride(0) + h * out.stride(2);
      const acc_t *Q, *K, *V, *dO;
      int64_t ldq, ldk, ldv, lddo;
      if constexpr (kDirect) {
        Q = qt, K = kt, V = vt, dO = dot;
        ldq = q.stride(1), ldk = k.stride(1), ldv = v.stride(1), lddo = dout.stride(1);
      } else {
        load_rows(qt, q.stride(1), T, D, qf.data());
        load_rows(kt, k.stride(1), T, D, kf.data());
        load_rows(vt, v.stride(1), T, D, vf.data());
        load_rows(dot, dout.stride(1), T, D, dof.data());
        Q = qf.data(), K = kf.data(), V = vf.data(), dO = dof.data();
        ldq = ldk = ldv = lddo = D;
      }
      for (int64_t i = 0; i < T; ++i) {
        const scalar_t* orow = ot + i * out.stride(1);
        const acc_t* drow = dO + i * lddo;
        acc_t acc = 0;
        for (int64_t d = 0; d < D; ++d) acc += drow[d] * static_cast<acc_t>(orow[d]);
        delta[i] = acc;
        lrow[i] = lsep[b * lse_sb + h * lse_sh + i * lse_st];
      }
      std::fill(dqacc.begin(), dqacc.end(), acc_t(0));
      for (int64_t k0 = 0; k0 < T; k0 += BK) {
        const int64_t nk = std::min(BK, T - k0);
        std::fill(dkb.begin(), dkb.end(), acc_t(0));
        std::fill(dvb.begin(), dvb.end(), acc_t(0));
        const acc_t* Kj = K + k0 * ldk;
        const acc_t* Vj = V + k0 * ldv;
        for (int64_t q0 = causal ? (k0 / BQ) * BQ : 0; q0 < T; q0 += BQ) {
          const int64_t nq = std::min(BQ, T - q0);
          const acc_t* Qi = Q + q0 * ldq;
          const acc_t* dOi = dO + q0 * lddo;
          blas::gemm_nt<acc_t>(nq, nk, D, scale, Qi, ldq, Kj, ldk, acc_t(0), s.data(), BK);
          for (int64_t i = 0; i < nq; ++i)
            probs_row(s.data() + i * BK, valid_keys(causal, q0 + i, k0, nk), nk, lrow[q0 + i]);
          blas::gemm_tn<acc_t>(nk, D, nq, acc_t(1), s.data(), BK, dOi, lddo, acc_t(1), dvb.data(), D);
          blas::gemm_nt<acc_t>(nq, nk, D, acc_t(1), dOi, lddo, Vj, ldv, acc_t(0), dp.data(), BK);
          for (int64_t i = 0; i < nq; ++i)
            dsoftmax_row(s.data() + i * BK, dp.data() + i * BK, nk, delta[q0 + i]);
          blas::gemm_tn<acc_t>(nk, D, nq, scale, s.data(), BK, Qi, ldq, acc_t(1), dkb.data(), D);
          blas::gemm_nn<acc_t>(nq, D, nk, scale, s.data(), BK, Kj, ldk, acc_t(1),
                               dqacc.data() + q0 * D, D);
        }
        store_rows(dkb.data(), nk, D, dkp + ((b * T + k0) * H + h) * D, H * D);
        store_rows(dvb.data(), nk, D, dvp + ((b * T + k0) * H + h) * D, H * D);
      }
      store_rows(dqacc.data(), T, D, dqp + (b * T * H + h) * D, H * D);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v, bool causal, double scale) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2);
  auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({B, H, T}, q.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "gptfast_attention_fwd",
                                  [&] { forward_impl<scalar_t>(q, k, v, out, lse, causal, scale); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double scale, bool /*deterministic*/) {
  auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty(q.sizes(), opts), dk = at::empty(k.sizes(), opts),
             dv = at::empty(v.sizes(), opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, q.scalar_type(), "gptfast_attention_bwd",
      [&] { backward_impl<scalar_t>(dout, q, k, v, out, lse, dq, dk, dv, causal, scale); });
  return {dq, dk, dv};
}

}  // namespace cpu
}  // namespace gptfast
