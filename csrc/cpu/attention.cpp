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
//
// FlashAttention 2.8's dense options (GQA/MQA, seqlen_q != seqlen_k, windows, softcap, ALiBi,
// dropout; semantics in gptfast/ops/attention.py) run in a second pair of kernels, so that plain
// calls keep the path above unchanged. There the score tile gets, after the GEMM, the softcap
// (s = c tanh(s / c)), the ALiBi bias and the bottom-right aligned window as -inf; each query
// block visits only the key blocks its rows' windows reach (and, in the backward, each key block
// only the query rows that see it). Query head h reads kv head h / (H / Hk) in place (K/V are never
// repeated); the backward's task is one (batch, kv head), which loops over its group's query
// heads and sums their dK, dV in a fixed order: deterministic without atomics. Dropout regenerates
// gptfast/ops/_philox.py's mask (Philox 4x32-10 below) per tile, scales kept P by 1/(1-p) before
// P V, and in the backward uses it for dV and dP; lse stays the undropped logsumexp.
//
// Packed variable-length calls (gptfast/ops/varlen.py) run in the options kernels too: q, k, v
// arrive as one batch entry of total rows, and `Seqs` maps sequence s to its rows (cu_seqlens), so a
// task is one (sequence, head, query block) -- work sum_s Tq_s Tk_s, nothing padded -- and sequence s
// plays batch entry s for its window, ALiBi row and dropout counters.
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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

// A (rows x D) GEMM operand read from ``src`` (row pitch ``ld``): the tensor's own rows when
// scalar_t is the accumulation type (fp32, fp64: BLAS reads them in place), else widened into
// ``buf`` (pitch D). Sets *pitch to the operand's row pitch.
template <typename acc_t, typename scalar_t>
inline const acc_t* operand_rows(const scalar_t* src, int64_t ld, int64_t rows, int64_t D, acc_t* buf,
                                 int64_t* pitch) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    *pitch = ld;
    return src;
  } else {
    load_rows(src, ld, rows, D, buf);
    *pitch = D;
    return buf;
  }
}

// The backward's per-row inputs of one (batch, head): delta_i = rowsum(dO_i * O_i) and lse_i.
template <typename scalar_t, typename acc_t>
inline void backward_row_stats(const acc_t* dO, int64_t lddo, const scalar_t* out, int64_t ldo,
                               const acc_t* lse, int64_t lse_st, int64_t rows, int64_t D, acc_t* delta,
                               acc_t* lrow) {
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* orow = out + i * ldo;
    const acc_t* drow = dO + i * lddo;
    acc_t acc = 0;
    for (int64_t d = 0; d < D; ++d) acc += drow[d] * static_cast<acc_t>(orow[d]);
    delta[i] = acc;
    lrow[i] = lse[i * lse_st];
  }
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
      int64_t ldq;
      const acc_t* Q = operand_rows<acc_t>(qt, sqt, nq, D, qbuf.data(), &ldq);
      std::fill(o.begin(), o.begin() + nq * D, acc_t(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(l.begin(), l.end(), acc_t(0));
      const int64_t kend = causal ? std::min(T, q0 + nq) : T;
      for (int64_t k0 = 0; k0 < kend; k0 += BK) {
        const int64_t nk = std::min(BK, kend - k0);
        const scalar_t* kt = kp + b * skb + h * skh + k0 * skt;
        const scalar_t* vt = vp + b * svb + h * svh + k0 * svt;
        int64_t ldk, ldv;
        const acc_t* K = operand_rows<acc_t>(kt, skt, nk, D, kbuf.data(), &ldk);
        const acc_t* V = operand_rows<acc_t>(vt, svt, nk, D, vbuf.data(), &ldv);
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
      int64_t ldq, ldk, ldv, lddo;
      const acc_t* Q = operand_rows<acc_t>(qt, q.stride(1), T, D, qf.data(), &ldq);
      const acc_t* K = operand_rows<acc_t>(kt, k.stride(1), T, D, kf.data(), &ldk);
      const acc_t* V = operand_rows<acc_t>(vt, v.stride(1), T, D, vf.data(), &ldv);
      const acc_t* dO = operand_rows<acc_t>(dot, dout.stride(1), T, D, dof.data(), &lddo);
      backward_row_stats(dO, lddo, ot, out.stride(1), lsep + b * lse_sb + h * lse_sh, lse_st, T, D,
                         delta.data(), lrow.data());
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

// --------------------------------------------------------------------------- options path

// Philox 4x32-10 (Random123's philox4x32_R(10, ctr, key)), the generator gptfast/ops/_philox.py
// specifies: ten rounds, the key bumped by the Weyl constants between rounds.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

inline void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    if (r) k0 += kPhiloxW0, k1 += kPhiloxW1;
    const uint64_t p0 = uint64_t(kPhiloxM0) * c[0];
    const uint64_t p1 = uint64_t(kPhiloxM1) * c[2];
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c[1] ^ k0;
    const uint32_t n2 = uint32_t(p0 >> 32) ^ c[3] ^ k1;
    c[0] = n0, c[1] = uint32_t(p1), c[2] = n2, c[3] = uint32_t(p0);
  }
}

// The dropout multipliers of columns j0 .. j0+n-1 of score row i of head bh = b * H + h:
// keep / (1 - p) with keep = (draw >= threshold), one Philox call per 4 columns (_philox.py's layout).
template <typename T>
void dropout_row(const AttentionOptions& o, uint64_t bh, int64_t i, int64_t j0, int64_t n, T rp, T* mult) {
  const uint32_t k0 = static_cast<uint32_t>(o.seed), k1 = static_cast<uint32_t>(o.seed >> 32);
  const int64_t j1 = j0 + n;
  for (int64_t g = j0 / 4; g * 4 < j1; ++g) {
    const uint64_t cn = (o.offset >> 2) + static_cast<uint64_t>(g);
    uint32_t c[4] = {static_cast<uint32_t>(cn), static_cast<uint32_t>(cn >> 32), static_cast<uint32_t>(i),
                     static_cast<uint32_t>(bh)};
    philox4x32_10(c, k0, k1);
    for (int w = 0; w < 4; ++w) {
      const int64_t col = g * 4 + w;
      if (col >= j0 && col < j1) mult[col - j0] = c[w] >= o.dropout_threshold ? rp : T(0);
    }
  }
}

// Visibility with bottom-right aligned windows: query i sees key j iff
// i + shift - left <= j <= i + shift + right (shift = Tk - Tq; -1 sides unbounded).
struct Window {
  int64_t Tq, Tk, shift, left, right;
  int64_t key_lo(int64_t i) const {  // first visible key of row i, clipped to [0, Tk]
    return left < 0 ? 0 : std::min(Tk, std::max<int64_t>(0, i + shift - left));
  }
  int64_t key_hi(int64_t i) const {  // one past the last visible key, clipped to [0, Tk]
    return right < 0 ? Tk : std::min(Tk, std::max<int64_t>(0, i + shift + right + 1));
  }
  int64_t row_lo(int64_t k0) const {  // first query row that sees a key >= k0
    return right < 0 ? 0 : std::min(Tq, std::max<int64_t>(0, k0 - shift - right));
  }
  int64_t row_hi(int64_t k1) const {  // one past the last query row that sees a key < k1
    return left < 0 ? Tq : std::min(Tq, std::max<int64_t>(0, k1 - shift + left));
  }
};

// The sequences of a call: the batch entries of a dense call, or the packed sequences of a
// varlen one (memory batch entry 0, rows cu[s] .. cu[s+1] - 1).
struct Seq {
  int64_t b, q0, tq, k0, tk;  // memory batch entry, first q row and count, first k row and count
};
struct Seqs {
  int64_t n, Tq, Tk;  // sequences; rows per batch entry of q and k (dense: the lengths)
  const int32_t* cq = nullptr;
  const int32_t* ck = nullptr;
  explicit Seqs(const at::Tensor& q, const at::Tensor& k, const AttentionOptions& o)
      : n(o.cu_seqlens_q ? o.cu_seqlens_q->numel() - 1 : q.size(0)), Tq(q.size(1)), Tk(k.size(1)) {
    if (o.cu_seqlens_q) {
      cq = o.cu_seqlens_q->const_data_ptr<int32_t>();
      ck = o.cu_seqlens_k->const_data_ptr<int32_t>();
    }
  }
  Seq operator[](int64_t s) const {
    if (!cq) return {s, 0, Tq, 0, Tk};
    return {0, cq[s], cq[s + 1] - cq[s], ck[s], ck[s + 1] - ck[s]};
  }
  int64_t max_tq() const { return max_len(cq, Tq); }
  int64_t max_tk() const { return max_len(ck, Tk); }

 private:
  int64_t max_len(const int32_t* cu, int64_t dense) const {
    if (!cu) return dense;
    int64_t m = 0;
    for (int64_t s = 0; s < n; ++s) m = std::max<int64_t>(m, cu[s + 1] - cu[s]);
    return m;
  }
};


// The score tile's options in the reference's order: softcap (keeping t = tanh(s / c) for the
// backward when `tanh_out`), ALiBi (-slope |i + shift - j|), then the window as -inf.
template <typename T>
void transform_scores(T* s, int64_t ld, int64_t nq, int64_t nk, int64_t q0, int64_t k0, const Window& w,
                      T softcap, bool alibi, T slope, T* tanh_out) {
  for (int64_t r = 0; r < nq; ++r) {
    const int64_t i = q0 + r;
    const int64_t lo = w.key_lo(i) - k0, hi = w.key_hi(i) - k0;
    T* row = s + r * ld;
    if (softcap > T(0)) {
      T* trow = tanh_out ? tanh_out + r * ld : nullptr;
      for (int64_t j = 0; j < nk; ++j) {
        const T t = vec::softcap_tanh(row[j] / softcap);
        if (trow) trow[j] = t;
        row[j] = t * softcap;
      }
    }
    if (alibi) {
      for (int64_t j = 0; j < nk; ++j) {
        const int64_t dist = i + w.shift - (k0 + j);
        row[j] -= slope * static_cast<T>(dist < 0 ? -dist : dist);
      }
    }
    const T ninf = -std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < std::min(lo, nk); ++j) row[j] = ninf;
    for (int64_t j = std::max<int64_t>(hi, 0); j < nk; ++j) row[j] = ninf;
  }
}

template <typename scalar_t>
void forward_options_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                          at::Tensor& lse, double scale_d, const AttentionOptions& opts) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;
  const int64_t Tq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Hk = k.size(2), G = H / Hk;
  const Seqs seqs(q, k, opts);
  const int64_t sqb = q.stride(0), sqt = q.stride(1), sqh = q.stride(2);
  const int64_t skb = k.stride(0), skt = k.stride(1), skh = k.stride(2);
  const int64_t svb = v.stride(0), svt = v.stride(1), svh = v.stride(2);
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  acc_t* lp = lse.data_ptr<acc_t>();
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t softcap = static_cast<acc_t>(opts.softcap);
  const float* slopes = opts.alibi_slopes ? opts.alibi_slopes->const_data_ptr<float>() : nullptr;
  const int64_t slope_sb = opts.alibi_slopes && opts.alibi_slopes->dim() == 2 ? H : 0;
  const bool dropout = opts.dropout_p > 0.0;
  const acc_t rp = static_cast<acc_t>(1.0 / (1.0 - opts.dropout_p));
  // Tasks: (sequence, head, query block), sequence s owning [first[s], first[s + 1]).
  std::vector<int64_t> first(seqs.n + 1, 0);
  for (int64_t sq = 0; sq < seqs.n; ++sq) first[sq + 1] = first[sq] + H * ((seqs[sq].tq + BQ - 1) / BQ);

  at::parallel_for(0, first[seqs.n], 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qbuf(kDirect ? 0 : BQ * D), kbuf(kDirect ? 0 : BK * D),
        vbuf(kDirect ? 0 : BK * D), s(BQ * BK), o(BQ * D), m(BQ), l(BQ), mult(dropout ? BK : 0);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t si = std::upper_bound(first.begin(), first.end(), idx) - first.begin() - 1;
      const Seq sq = seqs[si];
      const int64_t nqb = (sq.tq + BQ - 1) / BQ, h = (idx - first[si]) / nqb, qb = (idx - first[si]) % nqb;
      const int64_t b = sq.b, kvh = h / G, bh = si * H + h;  // bh: the dropout counter's (batch, head)
      const Window win{sq.tq, sq.tk, sq.tk - sq.tq, opts.window_left, opts.window_right};
      const int64_t q0 = qb * BQ, nq = std::min(BQ, sq.tq - q0);
      const acc_t slope = slopes ? static_cast<acc_t>(slopes[si * slope_sb + h]) : acc_t(0);
      const scalar_t* qt = qp + b * sqb + h * sqh + (sq.q0 + q0) * sqt;
      int64_t ldq;
      const acc_t* Q = operand_rows<acc_t>(qt, sqt, nq, D, qbuf.data(), &ldq);
      std::fill(o.begin(), o.begin() + nq * D, acc_t(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(l.begin(), l.end(), acc_t(0));
      // The key range the block's windows reach (both bounds grow with the row).
      const int64_t kbeg = win.key_lo(q0), kend = win.key_hi(q0 + nq - 1);
      for (int64_t k0 = kbeg; k0 < kend; k0 += BK) {
        const int64_t nk = std::min(BK, kend - k0);
        const scalar_t* kt = kp + b * skb + kvh * skh + (sq.k0 + k0) * skt;
        const scalar_t* vt = vp + b * svb + kvh * svh + (sq.k0 + k0) * svt;
        int64_t ldk, ldv;
        const acc_t* K = operand_rows<acc_t>(kt, skt, nk, D, kbuf.data(), &ldk);
        const acc_t* V = operand_rows<acc_t>(vt, svt, nk, D, vbuf.data(), &ldv);
        blas::gemm_nt<acc_t>(nq, nk, D, scale, Q, ldq, K, ldk, acc_t(0), s.data(), BK);
        transform_scores<acc_t>(s.data(), BK, nq, nk, q0, k0, win, softcap, slopes != nullptr, slope,
                                nullptr);
        for (int64_t i = 0; i < nq; ++i) {
          acc_t* row = s.data() + i * BK;
          softmax_update_row(row, nk, nk, &m[i], &l[i], o.data() + i * D, D);
          if (dropout) {  // l keeps the undropped sum: lse and the normalisation ignore dropout
            dropout_row<acc_t>(opts, static_cast<uint64_t>(bh), q0 + i, k0, nk, rp, mult.data());
            for (int64_t j = 0; j < nk; ++j) row[j] *= mult[j];
          }
        }
        blas::gemm_nn<acc_t>(nq, D, nk, acc_t(1), s.data(), BK, V, ldv, acc_t(1), o.data(), D);
      }
      for (int64_t i = 0; i < nq; ++i) {
        const bool has_keys = l[i] > acc_t(0) || l[i] != l[i];  // NaN propagates, 0 means no keys
        const acc_t inv = has_keys ? acc_t(1) / l[i] : acc_t(0);
        acc_t* orow = o.data() + i * D;
        scalar_t* dst = op + ((b * Tq + sq.q0 + q0 + i) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(has_keys ? orow[d] * inv : acc_t(0));
        lp[(b * H + h) * Tq + sq.q0 + q0 + i] =
            has_keys ? m[i] + std::log(l[i]) : -std::numeric_limits<acc_t>::infinity();
      }
    }
  });
}

template <typename scalar_t>
void backward_options_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                           at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, double scale_d,
                           const AttentionOptions& opts) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;
  const int64_t Tq_rows = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Tk_rows = k.size(1), Hk = k.size(2), G = H / Hk;
  const Seqs seqs(q, k, opts);
  const int64_t max_tq = seqs.max_tq(), max_tk = seqs.max_tk();
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
  const acc_t softcap = static_cast<acc_t>(opts.softcap);
  const float* slopes = opts.alibi_slopes ? opts.alibi_slopes->const_data_ptr<float>() : nullptr;
  const int64_t slope_sb = opts.alibi_slopes && opts.alibi_slopes->dim() == 2 ? H : 0;
  const bool dropout = opts.dropout_p > 0.0;
  const acc_t rp = static_cast<acc_t>(1.0 / (1.0 - opts.dropout_p));

  // One task per (sequence, kv head): its query heads' dK, dV are summed here, in head order.
  at::parallel_for(0, seqs.n * Hk, 1, [&](int64_t begin, int64_t end) {
    const int64_t dense_q = kDirect ? 0 : max_tq * D, dense_k = kDirect ? 0 : max_tk * D;
    std::vector<acc_t> qf(dense_q), dof(dense_q), kf(dense_k), vf(dense_k), dqacc(max_tq * D),
        dkacc(max_tk * D), dvacc(max_tk * D), s(BQ * BK), dp(BQ * BK), delta(max_tq), lrow(max_tq),
        tanh_t(softcap > acc_t(0) ? BQ * BK : 0), mult(dropout ? BQ * BK : 0), pd(dropout ? BQ * BK : 0);
    for (int64_t skv = begin; skv < end; ++skv) {
      const int64_t si = skv / Hk, kvh = skv % Hk;
      const Seq sq = seqs[si];
      const int64_t b = sq.b, Tq = sq.tq, Tk = sq.tk;
      const Window win{Tq, Tk, Tk - Tq, opts.window_left, opts.window_right};
      const scalar_t* kt = kp + b * k.stride(0) + kvh * k.stride(2) + sq.k0 * k.stride(1);
      const scalar_t* vt = vp + b * v.stride(0) + kvh * v.stride(2) + sq.k0 * v.stride(1);
      int64_t ldk, ldv;
      const acc_t* K = operand_rows<acc_t>(kt, k.stride(1), Tk, D, kf.data(), &ldk);
      const acc_t* V = operand_rows<acc_t>(vt, v.stride(1), Tk, D, vf.data(), &ldv);
      std::fill(dkacc.begin(), dkacc.end(), acc_t(0));
      std::fill(dvacc.begin(), dvacc.end(), acc_t(0));
      for (int64_t h = kvh * G; h < (kvh + 1) * G; ++h) {
        const acc_t slope = slopes ? static_cast<acc_t>(slopes[si * slope_sb + h]) : acc_t(0);
        const uint64_t bh = static_cast<uint64_t>(si * H + h);
        const scalar_t* qt = qp + b * q.stride(0) + h * q.stride(2) + sq.q0 * q.stride(1);
        const scalar_t* dot = dop + b * dout.stride(0) + h * dout.stride(2) + sq.q0 * dout.stride(1);
        const scalar_t* ot = outp + b * out.stride(0) + h * out.stride(2) + sq.q0 * out.stride(1);
        int64_t ldq, lddo;
        const acc_t* Q = operand_rows<acc_t>(qt, q.stride(1), Tq, D, qf.data(), &ldq);
        const acc_t* dO = operand_rows<acc_t>(dot, dout.stride(1), Tq, D, dof.data(), &lddo);
        backward_row_stats(dO, lddo, ot, out.stride(1), lsep + b * lse_sb + h * lse_sh + sq.q0 * lse_st,
                           lse_st, Tq, D,
                           delta.data(), lrow.data());
        std::fill(dqacc.begin(), dqacc.end(), acc_t(0));
        for (int64_t k0 = 0; k0 < Tk; k0 += BK) {
          const int64_t nk = std::min(BK, Tk - k0);
          const acc_t* Kj = K + k0 * ldk;
          const acc_t* Vj = V + k0 * ldv;
          const int64_t ibeg = win.row_lo(k0), iend = win.row_hi(k0 + nk);  // rows that see the block
          for (int64_t q0 = ibeg; q0 < iend; q0 += BQ) {
            const int64_t nq = std::min(BQ, iend - q0);
            const acc_t* Qi = Q + q0 * ldq;
            const acc_t* dOi = dO + q0 * lddo;
            blas::gemm_nt<acc_t>(nq, nk, D, scale, Qi, ldq, Kj, ldk, acc_t(0), s.data(), BK);
            transform_scores<acc_t>(s.data(), BK, nq, nk, q0, k0, win, softcap, slopes != nullptr, slope,
                                    softcap > acc_t(0) ? tanh_t.data() : nullptr);
            for (int64_t i = 0; i < nq; ++i) probs_row(s.data() + i * BK, nk, nk, lrow[q0 + i]);
            const acc_t* Pv = s.data();  // the probabilities dV sees: dropped ones when dropping
            if (dropout) {
              for (int64_t i = 0; i < nq; ++i) {
                acc_t* mrow = mult.data() + i * BK;
                dropout_row<acc_t>(opts, bh, q0 + i, k0, nk, rp, mrow);
                const acc_t* prow = s.data() + i * BK;
                acc_t* drow = pd.data() + i * BK;
                for (int64_t j = 0; j < nk; ++j) drow[j] = prow[j] * mrow[j];
              }
              Pv = pd.data();
            }
            blas::gemm_tn<acc_t>(nk, D, nq, acc_t(1), Pv, BK, dOi, lddo, acc_t(1), dvacc.data() + k0 * D, D);
            blas::gemm_nt<acc_t>(nq, nk, D, acc_t(1), dOi, lddo, Vj, ldv, acc_t(0), dp.data(), BK);
            for (int64_t i = 0; i < nq; ++i) {
              acc_t* dprow = dp.data() + i * BK;
              if (dropout) {
                const acc_t* mrow = mult.data() + i * BK;
                for (int64_t j = 0; j < nk; ++j) dprow[j] *= mrow[j];
              }
              dsoftmax_row(s.data() + i * BK, dprow, nk, delta[q0 + i]);
              if (softcap > acc_t(0)) {  // d(c tanh(x / c))/dx = 1 - tanh^2
                acc_t* srow = s.data() + i * BK;
                const acc_t* trow = tanh_t.data() + i * BK;
                for (int64_t j = 0; j < nk; ++j) srow[j] *= acc_t(1) - trow[j] * trow[j];
              }
            }
            blas::gemm_tn<acc_t>(nk, D, nq, scale, s.data(), BK, Qi, ldq, acc_t(1), dkacc.data() + k0 * D, D);
            blas::gemm_nn<acc_t>(nq, D, nk, scale, s.data(), BK, Kj, ldk, acc_t(1), dqacc.data() + q0 * D, D);
          }
        }
        store_rows(dqacc.data(), Tq, D, dqp + ((b * Tq_rows + sq.q0) * H + h) * D, H * D);
      }
      store_rows(dkacc.data(), Tk, D, dkp + ((b * Tk_rows + sq.k0) * Hk + kvh) * D, Hk * D);
      store_rows(dvacc.data(), Tk, D, dvp + ((b * Tk_rows + sq.k0) * Hk + kvh) * D, Hk * D);
    }
  });
}

}  // namespace

// A call that uses no option (equal lengths and heads, causal or full mask) takes the original
// kernels above; every other call the options kernels.
static bool plain_call(const at::Tensor& q, const at::Tensor& k, const AttentionOptions& opts) {
  return opts.plain() && !opts.cu_seqlens_q && k.size(1) == q.size(1) && k.size(2) == q.size(2);
}

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v, double scale,
                                                     const AttentionOptions& opts) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2);
  auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({B, H, T}, q.options().dtype(acc));
  const bool plain = plain_call(q, k, opts);
  const bool causal = opts.causal();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "gptfast_attention_fwd", [&] {
    if (plain)
      forward_impl<scalar_t>(q, k, v, out, lse, causal, scale);
    else
      forward_options_impl<scalar_t>(q, k, v, out, lse, scale, opts);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale, bool /*deterministic*/,
    const AttentionOptions& opts) {
  auto mf = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty(q.sizes(), mf), dk = at::empty(k.sizes(), mf), dv = at::empty(v.sizes(), mf);
  const bool plain = plain_call(q, k, opts);
  const bool causal = opts.causal();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "gptfast_attention_bwd", [&] {
    if (plain)
      backward_impl<scalar_t>(dout, q, k, v, out, lse, dq, dk, dv, causal, scale);
    else
      backward_options_impl<scalar_t>(dout, q, k, v, out, lse, dq, dk, dv, scale, opts);
  });
  return {dq, dk, dv};
}

}  // namespace cpu
}  // namespace gptfast
