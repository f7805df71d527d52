// KV-cache decoding on the CPU (gptfast/ops/kvcache.py, step 3 of flash_attn_with_kvcache):
// split-K attention that reads the cache in place -- contiguous rows through cache_batch_idx, or
// pages through block_table -- with each sequence's own key range [key_start[b], key_end[b]).
//
// Why split: a decoding step has Tq = 1 query row per (sequence, head), so B * H tasks may be
// fewer than the cores (B = 1, H = 12 on 16 cores leaves 4 idle) and each task is one long pass
// over Tk keys. So the keys a task sees are cut into S chunks ("splits", FlashAttention's
// num_splits; Flash-Decoding), and every (sequence, head, query block, split) is one task of
// at::parallel_for. A task streams its chunk in blocks of BK keys -- S = scale Q K^T (BLAS tile
// GEMM, m = the block's query rows), softcap / ALiBi / window as in the dense kernels, online
// softmax -- and ends with the partial state of each row: max m_s, sum l_s = sum_j e^(s_j - m_s)
// and the unnormalised acc_s = sum_j e^(s_j - m_s) v_j. A second pass merges the S partials of a
// row exactly (log-sum-exp): M = max_s m_s, w_s = e^(m_s - M), L = sum_s w_s l_s,
// out = sum_s w_s acc_s / L, lse = M + log L. With S = 1 the task writes out and lse itself.
//
// num_splits = 0 picks S so that tasks * S >= threads while every chunk keeps >= kMinChunk keys
// (below that the merge and the per-task setup outweigh the parallelism). Accumulation in fp32
// (fp64 for fp64 inputs); fp16/bf16 blocks are widened before the GEMMs, fp32/fp64 are read in
// place through the cache's row pitch. A block never crosses a page, so each is one strided tile.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/blas.h"
#include "../common/checks.h"
#include "../common/vec_math.h"

namespace gptfast {
namespace cpu {
namespace {

constexpr const char* kOp = "gptfast.kvcache";
constexpr int64_t BQ = 64;         // query rows per task (a prefill chunk; decoding has Tq = 1)
constexpr int64_t BK = 128;        // keys per GEMM block
constexpr int64_t kMinChunk = 128; // the heuristic's smallest chunk of keys per split
constexpr int64_t kMaxSplits = 128;

// Bottom-right aligned window over (Tq, Tk): row i sees key j iff i + shift - left <= j <=
// i + shift + right, shift = Tk - Tq, -1 sides unbounded (gptfast/ops/attention.py).
struct Window {
  int64_t Tk, shift, left, right;
  int64_t key_lo(int64_t i) const {
    return left < 0 ? 0 : std::min(Tk, std::max<int64_t>(0, i + shift - left));
  }
  int64_t key_hi(int64_t i) const {
    return right < 0 ? Tk : std::min(Tk, std::max<int64_t>(0, i + shift + right + 1));
  }
};

// Where key j of a sequence lives: row `row` of a contiguous cache, or the pages of one
// block_table row. `rows_until_break` bounds a block so that its rows are one strided tile.
template <typename scalar_t>
struct CacheView {
  const scalar_t* base;
  int64_t s0, s1, s2;       // strides of (row or block, position, kv head)
  const int32_t* table;     // block_table row of the sequence, or null (contiguous)
  int64_t page;             // positions per block (paged)
  const scalar_t* key(int64_t row, int64_t pos, int64_t kvh) const {
    if (!table) return base + row * s0 + pos * s1 + kvh * s2;
    return base + static_cast<int64_t>(table[pos / page]) * s0 + (pos % page) * s1 + kvh * s2;
  }
  int64_t rows_until_break(int64_t pos) const { return table ? page - pos % page : INT64_MAX; }
};


// One score row of a block: the options in the reference's order (softcap, ALiBi, window as
// -inf), then the online softmax update. On return row[j] = e^(s_j - m_new) (0 if masked), m, l
// are updated and acc (D values) is rescaled by e^(m_old - m_new).
template <typename T>
GPTFAST_INLINE void score_row_impl(T* row, int64_t nk, int64_t lo, int64_t hi, T softcap, T slope,
                                   int64_t dist0, T* m, T* l, T* acc, int64_t D) {
  const T ninf = -std::numeric_limits<T>::infinity();
  if (softcap > T(0))
    for (int64_t j = 0; j < nk; ++j) row[j] = vec::softcap_tanh(row[j] / softcap) * softcap;
  if (slope != T(0))
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t dist = dist0 - j;  // i + shift - (k0 + j)
      row[j] -= slope * static_cast<T>(dist < 0 ? -dist : dist);
    }
  lo = std::max<int64_t>(lo, 0), hi = std::min(hi, nk);
  for (int64_t j = 0; j < std::min(lo, nk); ++j) row[j] = T(0);
  for (int64_t j = std::max(hi, lo); j < nk; ++j) row[j] = T(0);
  if (hi <= lo) return;
  using V = typename vec::Vec<T>::type;
  constexpr int L = vec::Vec<T>::n;
  V vm = vec::vsplat<T>(ninf);
  int64_t j = lo;
  for (; j + L <= hi; j += L) {
    const V x = vec::vload(row + j);
    vm = x > vm ? x : vm;  // NaN is skipped here, kept by exp below
  }
  T mx = vec::vmax<T>(vm);
  for (; j < hi; ++j) mx = row[j] > mx ? row[j] : mx;
  const T m_new = mx > *m ? mx : *m;
  const T m_use = m_new == ninf ? T(0) : m_new;  // every key -inf so far: p = 0, no NaN
  const T alpha = vec::exp_f(*m - m_use);
  for (j = lo; j < hi; ++j) row[j] = vec::exp_f(row[j] - m_use);
  V vs = vec::vsplat<T>(0);
  for (j = lo; j + L <= hi; j += L) vs += vec::vload(row + j);
  T sum = vec::vsum<T>(vs);
  for (; j < hi; ++j) sum += row[j];
  *l = *l * alpha + sum;
  *m = m_new;
  if (alpha != T(1))
    for (int64_t d = 0; d < D; ++d) acc[d] *= alpha;
}
GPTFAST_VEC_CLONES void score_row(float* row, int64_t nk, int64_t lo, int64_t hi, float softcap, float slope,
                                  int64_t dist0, float* m, float* l, float* acc, int64_t D) {
  score_row_impl<float>(row, nk, lo, hi, softcap, slope, dist0, m, l, acc, D);
}
void score_row(double* row, int64_t nk, int64_t lo, int64_t hi, double softcap, double slope, int64_t dist0,
               double* m, double* l, double* acc, int64_t D) {
  score_row_impl<double>(row, nk, lo, hi, softcap, slope, dist0, m, l, acc, D);
}

// `rows` rows of D values, row pitch `ld`, as a GEMM operand: in place when scalar_t is acc_t,
// else widened into `buf` (pitch D).
template <typename acc_t, typename scalar_t>
inline const acc_t* operand(const scalar_t* src, int64_t ld, int64_t rows, int64_t D, acc_t* buf, int64_t* pitch) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    *pitch = ld;
    return src;
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t d = 0; d < D; ++d) buf[r * D + d] = static_cast<acc_t>(src[r * ld + d]);
    *pitch = D;
    return buf;
  }
}

// out_row = acc / l, lse = m + log l; a row without keys (l = 0) gives 0 and -inf, a NaN l
// propagates.
template <typename scalar_t, typename acc_t>
inline void finish_row(const acc_t* acc, acc_t m, acc_t l, int64_t D, scalar_t* dst, acc_t* lse) {
  const bool has_keys = l > acc_t(0) || l != l;
  const acc_t inv = has_keys ? acc_t(1) / l : acc_t(0);
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(has_keys ? acc[d] * inv : acc_t(0));
  *lse = has_keys ? m + std::log(l) : -std::numeric_limits<acc_t>::infinity();
}

struct Plan {
  int64_t B, Tq, H, D, Hk, nqb, splits;
};

template <typename scalar_t>
void kvcache_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const std::optional<at::Tensor>& block_table, const std::optional<at::Tensor>& batch_idx,
                  const int32_t* kstart, const int32_t* kend, double scale_d, int64_t left, int64_t right,
                  double softcap_d, const std::optional<at::Tensor>& alibi, const Plan& p, at::Tensor& out,
                  at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;
  const int64_t Tq = p.Tq, H = p.H, D = p.D, G = H / p.Hk, S = p.splits, nqb = p.nqb;
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const int64_t sqb = q.stride(0), sqt = q.stride(1), sqh = q.stride(2);
  const scalar_t* kp = k_cache.const_data_ptr<scalar_t>();
  const scalar_t* vp = v_cache.const_data_ptr<scalar_t>();
  const int32_t* table = block_table ? block_table->const_data_ptr<int32_t>() : nullptr;
  const int64_t table_sb = block_table ? block_table->stride(0) : 0;
  const int32_t* rows = batch_idx ? batch_idx->const_data_ptr<int32_t>() : nullptr;
  const float* slopes = alibi ? alibi->const_data_ptr<float>() : nullptr;
  const int64_t slope_sb = alibi && alibi->dim() == 2 ? H : 0;
  const acc_t scale = static_cast<acc_t>(scale_d), softcap = static_cast<acc_t>(softcap_d);
  scalar_t* op = out.data_ptr<scalar_t>();
  acc_t* lp = lse.data_ptr<acc_t>();
  // Partials of split s of row (b, h, i): m, l at [((b H + h) Tq + i) S + s], acc D values there.
  std::vector<acc_t> pm(S > 1 ? p.B * H * Tq * S : 0), pl(pm.size()), pacc(pm.size() * D);

  at::parallel_for(0, p.B * H * nqb * S, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qbuf(kDirect ? 0 : BQ * D), kbuf(kDirect ? 0 : BK * D), vbuf(kDirect ? 0 : BK * D),
        s(BQ * BK), acc(BQ * D), m(BQ), l(BQ);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t split = idx % S, bhq = idx / S, qb = bhq % nqb, bh = bhq / nqb, b = bh / H, h = bh % H;
      const int64_t kvh = h / G, q0 = qb * BQ, nq = std::min(BQ, Tq - q0);
      const int64_t start = kstart[b], tk = std::max<int64_t>(0, int64_t(kend[b]) - start);
      const Window win{tk, tk - Tq, left, right};
      // This task's chunk of the keys its block's rows see (both window bounds grow with the row).
      const int64_t vis_lo = win.key_lo(q0), vis_hi = std::max(vis_lo, win.key_hi(q0 + nq - 1));
      const int64_t chunk = (vis_hi - vis_lo + S - 1) / S;
      const int64_t c0 = std::min(vis_hi, vis_lo + split * chunk), c1 = std::min(vis_hi, c0 + chunk);
      const CacheView<scalar_t> kc{kp, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                                   table ? table + b * table_sb : nullptr, k_cache.size(1)};
      const CacheView<scalar_t> vc{vp, v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), kc.table,
                                   v_cache.size(1)};
      const int64_t row = rows ? rows[b] : b;
      const acc_t slope = slopes ? static_cast<acc_t>(slopes[b * slope_sb + h]) : acc_t(0);
      int64_t ldq;
      const acc_t* Q = operand<acc_t>(qp + b * sqb + h * sqh + q0 * sqt, sqt, nq, D, qbuf.data(), &ldq);
      std::fill(acc.begin(), acc.begin() + nq * D, acc_t(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(l.begin(), l.end(), acc_t(0));
      for (int64_t k0 = c0; k0 < c1;) {
        const int64_t nk = std::min({BK, c1 - k0, kc.rows_until_break(start + k0)});
        int64_t ldk, ldv;
        const acc_t* K = operand<acc_t>(kc.key(row, start + k0, kvh), kc.s1, nk, D, kbuf.data(), &ldk);
        const acc_t* V = operand<acc_t>(vc.key(row, start + k0, kvh), vc.s1, nk, D, vbuf.data(), &ldv);
        blas::gemm_nt<acc_t>(nq, nk, D, scale, Q, ldq, K, ldk, acc_t(0), s.data(), BK);
        for (int64_t r = 0; r < nq; ++r) {
          const int64_t i = q0 + r;
          score_row(s.data() + r * BK, nk, win.key_lo(i) - k0, win.key_hi(i) - k0, softcap, slope,
                    i + win.shift - k0, &m[r], &l[r], acc.data() + r * D, D);
        }
        blas::gemm_nn<acc_t>(nq, D, nk, acc_t(1), s.data(), BK, V, ldv, acc_t(1), acc.data(), D);
        k0 += nk;
      }
      for (int64_t r = 0; r < nq; ++r) {
        const int64_t i = q0 + r;
        if (S == 1) {
          finish_row<scalar_t, acc_t>(acc.data() + r * D, m[r], l[r], D, op + ((b * Tq + i) * H + h) * D,
                                      lp + bh * Tq + i);
        } else {
          const int64_t at = (bh * Tq + i) * S + split;
          pm[at] = m[r], pl[at] = l[r];
          std::copy(acc.data() + r * D, acc.data() + (r + 1) * D, pacc.data() + at * D);
        }
      }
    }
  });
  if (S == 1) return;

  // The exact merge of each row's S partials (a split without keys has m = -inf, l = 0).
  at::parallel_for(0, p.B * H * Tq, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> o(D);
    const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* m_s = pm.data() + r * S;
      const acc_t* l_s = pl.data() + r * S;
      acc_t M = ninf;
      for (int64_t s = 0; s < S; ++s) M = m_s[s] > M ? m_s[s] : M;
      const acc_t M_use = M == ninf ? acc_t(0) : M;
      acc_t L = 0;
      std::fill(o.begin(), o.end(), acc_t(0));
      for (int64_t s = 0; s < S; ++s) {
        if (m_s[s] == ninf && l_s[s] == acc_t(0)) continue;  // no keys in this chunk
        const acc_t w = vec::exp_f(m_s[s] - M_use);
        L += w * l_s[s];
        const acc_t* a = pacc.data() + (r * S + s) * D;
        for (int64_t d = 0; d < D; ++d) o[d] += w * a[d];
      }
      const int64_t bh = r / Tq, i = r % Tq, b = bh / H, h = bh % H;
      finish_row<scalar_t, acc_t>(o.data(), M, L, D, op + ((b * Tq + i) * H + h) * D, lp + r);
    }
  });
}

void check_index(const std::optional<at::Tensor>& t, const char* name, int64_t dim0) {
  if (!t) return;
  TORCH_CHECK_TYPE(t->scalar_type() == at::kInt, kOp, ": ", name, " must be int32, got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->device().is_cpu() && t->size(0) == dim0 && t->stride(-1) == 1, kOp, ": ", name,
                    " must be a CPU tensor with ", dim0, " rows and stride 1 in its last dimension, got ",
                    t->sizes(), " on ", t->device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kvcache_forward(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const std::optional<at::Tensor>& block_table, const std::optional<at::Tensor>& cache_batch_idx,
    const at::Tensor& key_start_in, const at::Tensor& key_end_in, double softmax_scale, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes, int64_t num_splits) {
  CHECK_DIM(q, 4);
  CHECK_CPU(q);
  CHECK_FLOATING(q);
  CHECK_LAST_DIM_CONTIGUOUS(q);
  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), D = q.size(3);
  CHECK_DIM(k_cache, 4);
  CHECK_CPU(k_cache);
  CHECK_SAME_DTYPE(k_cache, q);
  CHECK_SAME_DTYPE(v_cache, q);
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes() && v_cache.device() == k_cache.device(), kOp,
                    ": v_cache must have k_cache's shape ", k_cache.sizes(), " and device, got ", v_cache.sizes());
  const int64_t Hk = k_cache.size(2);
  TORCH_CHECK_VALUE(k_cache.size(3) == D && Hk >= 1 && H % Hk == 0, kOp,
                    ": k_cache must have shape (..., nheads_k, ", D, ") with nheads (", H,
                    ") a multiple of nheads_k, got ", k_cache.sizes());
  CHECK_LAST_DIM_CONTIGUOUS(k_cache);
  CHECK_LAST_DIM_CONTIGUOUS(v_cache);
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale) && std::isfinite(softcap), kOp,
                    ": softmax_scale and softcap must be finite");
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, kOp, ": window sides must be >= -1, got (",
                    window_left, ", ", window_right, ")");
  TORCH_CHECK_VALUE(num_splits >= 0, kOp, ": num_splits must be >= 0 (0: heuristic), got ", num_splits);
  check_index(block_table, "block_table", B);
  check_index(cache_batch_idx, "cache_batch_idx", B);
  TORCH_CHECK_VALUE(!(block_table && cache_batch_idx), kOp, ": cache_batch_idx cannot be combined with block_table");
  if (block_table) CHECK_DIM((*block_table), 2);
  for (const at::Tensor* t : {&key_start_in, &key_end_in}) {
    TORCH_CHECK_VALUE(t->scalar_type() == at::kInt && t->dim() == 1 && t->size(0) == B && t->device().is_cpu(),
                      kOp, ": ", t == &key_start_in ? "key_start" : "key_end", " must be int32 (", B,
                      ",) on the CPU, got ", t->scalar_type(), " ", t->sizes());
  }
  if (alibi_slopes) {
    const at::Tensor& a = *alibi_slopes;
    TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat, kOp, ": alibi_slopes must be float32, got ", a.scalar_type());
    TORCH_CHECK_VALUE(a.is_contiguous() && a.device().is_cpu() &&
                          ((a.dim() == 1 && a.size(0) == H) || (a.dim() == 2 && a.size(0) == B && a.size(1) == H)),
                      kOp, ": alibi_slopes must be contiguous (nheads,) or (batch, nheads) on the CPU, got ",
                      a.sizes());
  }
  const at::Tensor key_start = key_start_in.contiguous(), key_end = key_end_in.contiguous();
  const int32_t* ks = key_start.const_data_ptr<int32_t>();
  const int32_t* ke = key_end.const_data_ptr<int32_t>();
  // Every position a task will read must exist: checked here, once, not per key.
  const bool paged = block_table.has_value();
  const int64_t page = k_cache.size(1);
  const int64_t cache_len = paged ? block_table->size(1) * page : k_cache.size(1);
  int64_t tk_max = 0;
  for (int64_t b = 0; b < B; ++b) {
    if (ke[b] <= ks[b]) continue;
    TORCH_CHECK_VALUE(ks[b] >= 0 && ke[b] <= cache_len, kOp, ": sequence ", b, "'s keys [", ks[b], ", ", ke[b],
                      ") exceed the cache's ", cache_len, " positions");
    tk_max = std::max<int64_t>(tk_max, ke[b] - ks[b]);
    if (paged) {
      const int32_t* row = block_table->const_data_ptr<int32_t>() + b * block_table->stride(0);
      for (int64_t i = ks[b] / page; i <= (ke[b] - 1) / page; ++i)
        TORCH_CHECK_VALUE(row[i] >= 0 && row[i] < k_cache.size(0), kOp, ": block_table[", b, ", ", i, "] = ",
                          row[i], " is not a block of the cache (", k_cache.size(0), " blocks)");
    } else {
      const int64_t r = cache_batch_idx ? cache_batch_idx->const_data_ptr<int32_t>()[b] : b;
      TORCH_CHECK_VALUE(r >= 0 && r < k_cache.size(0), kOp, ": cache row ", r, " of sequence ", b,
                        " is not in the cache's ", k_cache.size(0), " rows (cache_batch_idx)");
    }
  }
  Plan plan{B, Tq, H, D, Hk, (Tq + BQ - 1) / BQ, 1};
  if (num_splits == 0) {
    // Enough tasks for every thread, but no chunk under kMinChunk keys.
    const int64_t tasks = std::max<int64_t>(1, B * H * plan.nqb), threads = at::get_num_threads();
    plan.splits = std::max<int64_t>(1, std::min((threads + tasks - 1) / tasks, tk_max / kMinChunk));
  } else {
    plan.splits = std::max<int64_t>(1, std::min({num_splits, kMaxSplits, std::max<int64_t>(tk_max, 1)}));
  }
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({B, Tq, H, D}, q.options());
  at::Tensor lse = at::empty({B, H, Tq}, q.options().dtype(acc_dtype));
  if (q.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "kvcache_forward", [&] {
    kvcache_impl<scalar_t>(q, k_cache, v_cache, block_table, cache_batch_idx, ks, ke, softmax_scale, window_left,
                           window_right, softcap, alibi_slopes, plan, out, lse);
  });
  return {out, lse};
}

}  // namespace cpu
}  // namespace gptfast
