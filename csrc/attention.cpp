// gptfast attention: argument checks for the native launchers (bound in bindings.cpp).
// Shapes, dtypes and return values follow the launcher contract in gptfast/ops/_backend.py:
// q (B, Tq, H, D), k and v (B, Tk, Hk, D) with H % Hk == 0, and FlashAttention 2.8's dense
// options (window, softcap, ALiBi, dropout), normalised here into one AttentionOptions.
#include <array>
#include <cmath>
#include <cstring>
#include <tuple>

#include "common/backend.h"

namespace gptfast {

namespace {
constexpr const char* kOp = "gptfast.attention";
constexpr int64_t kMaxHeadDim = 256;

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  CHECK_DIM(q, 4);
  CHECK_BACKEND_DEVICE(q);
  CHECK_FLOATING(q);
  const int64_t B = q.size(0), H = q.size(2), D = q.size(3);
  TORCH_CHECK_VALUE(D >= 1 && D <= kMaxHeadDim, kOp, ": head dim (q.shape[3]) must be in 1..",
                    kMaxHeadDim, ", got ", D);
  for (const auto* t : {&k, &v}) {
    const at::Tensor& x = *t;
    const char* name = t == &k ? "k" : "v";
    TORCH_CHECK_VALUE(x.device() == q.device(), kOp, ": ", name, " is on ", x.device(),
                      " but q is on ", q.device());
    TORCH_CHECK_TYPE(x.scalar_type() == q.scalar_type(), kOp, ": ", name, " has dtype ",
                     x.scalar_type(), " but q has ", q.scalar_type());
    TORCH_CHECK_VALUE(x.dim() == 4 && x.size(0) == B && x.size(3) == D && x.size(2) >= 1 &&
                          H % x.size(2) == 0,
                      kOp, ": ", name, " must have shape (batch, seqlen_k, nheads_k, headdim) = (",
                      B, ", seqlen_k, nheads_k, ", D, ") with nheads (", H,
                      ") a multiple of nheads_k, got ", x.sizes());
  }
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), kOp, ": v must have k's shape ", k.sizes(), ", got ",
                    v.sizes());
  CHECK_LAST_DIM_CONTIGUOUS(q);
  CHECK_LAST_DIM_CONTIGUOUS(k);
  CHECK_LAST_DIM_CONTIGUOUS(v);
  CHECK_ROWS_DISJOINT(q);
  CHECK_ROWS_DISJOINT(k);
  CHECK_ROWS_DISJOINT(v);
}

// The options in FlashAttention's normal form: a window side >= seqlen_k is unbounded, causal
// sets the right side to 0, a softcap <= 0 is none; the dropout generator's state is read from
// rng_state (int64 [seed, offset], their 64-bit patterns) and its threshold computed in double.
AttentionOptions make_options(const at::Tensor& q, const at::Tensor& k, bool causal, double scale,
                              int64_t window_left, int64_t window_right, double softcap,
                              const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
                              const std::optional<at::Tensor>& rng_state, int64_t sequences = -1) {
  TORCH_CHECK_VALUE(std::isfinite(scale), kOp, ": softmax_scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, kOp,
                    ": window_size must be two integers >= -1 (-1: unbounded), got (", window_left,
                    ", ", window_right, ")");
  TORCH_CHECK_VALUE(std::isfinite(softcap), kOp, ": softcap must be finite, got ", softcap);
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, kOp, ": dropout_p must be in [0, 1), got ",
                    dropout_p);
  // sequences: a packed call's number of sequences (each plays a batch entry); -1: q's batch.
  const int64_t B = sequences < 0 ? q.size(0) : sequences, H = q.size(2), Tk = k.size(1);
  AttentionOptions o;
  o.window_left = window_left >= Tk ? -1 : window_left;
  o.window_right = causal ? 0 : (window_right >= Tk ? -1 : window_right);
  o.softcap = softcap > 0.0 ? softcap : 0.0;
  if (alibi_slopes.has_value()) {
    const at::Tensor& s = *alibi_slopes;
    TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, kOp, ": alibi_slopes must be float32, got ",
                     s.scalar_type());
    TORCH_CHECK_VALUE(s.device() == q.device(), kOp, ": alibi_slopes is on ", s.device(),
                      " but q is on ", q.device());
    TORCH_CHECK_VALUE((s.dim() == 1 && s.size(0) == H) || (s.dim() == 2 && s.size(0) == B && s.size(1) == H),
                      kOp, ": alibi_slopes must have shape (nheads,) = (", H,
                      ",) or (batch, nheads) = (", B, ", ", H, "), got ", s.sizes());
    o.alibi_slopes = s.contiguous();
  }
  o.dropout_p = dropout_p;
  if (dropout_p > 0.0) {
    TORCH_CHECK_VALUE(rng_state.has_value(), kOp,
                      ": dropout_p > 0 needs rng_state (int64 [seed, offset]), got None");
    const at::Tensor& r = *rng_state;
    TORCH_CHECK_TYPE(r.scalar_type() == at::kLong, kOp, ": rng_state must be int64, got ",
                     r.scalar_type());
    TORCH_CHECK_VALUE((r.device().is_cpu() || r.device() == q.device()) && r.numel() == 2, kOp,
                      ": rng_state must be 2 values [seed, offset] on the CPU or on q's device, got ",
                      r.numel(), " values on ", r.device());
    o.rng_state = r.contiguous();
    // The cuda kernels read the key on the device (attention.h dropout_key): a copy to the host
    // would synchronise with the device and is illegal during CUDA-graph capture, so a key on q's
    // device is passed on unread and its values are the caller's (gptfast.ops._philox draws them
    // valid). A CPU key (and every key of the cpu backend) is read and checked here; o.seed and
    // o.offset hold its values for the cpu kernels.
    const bool read_on_device = std::strcmp(kBackendName, "cuda") == 0 && !r.device().is_cpu();
    if (!read_on_device) {
      const int64_t* rp = o.rng_state->const_data_ptr<int64_t>();
      std::memcpy(&o.seed, rp, sizeof(uint64_t));  // the same 64 bits, read as unsigned
      std::memcpy(&o.offset, rp + 1, sizeof(uint64_t));
      TORCH_CHECK_VALUE(o.offset % 4 == 0, kOp,
                        ": rng_state's offset must be a multiple of 4 (a Philox stream position), got ",
                        o.offset);
    }
    TORCH_CHECK_VALUE(B * H <= (int64_t(1) << 32) && q.size(1) <= (int64_t(1) << 32), kOp,
                      ": dropout needs batch * nheads <= 2^32 and seqlen_q <= 2^32 (Philox counter words)");
    // p * 2^32 is exact in double; p < 1 keeps the threshold below 2^32.
    o.dropout_threshold = static_cast<uint32_t>(std::floor(dropout_p * 4294967296.0));
  }
  return o;
}
// A packed (varlen) call: q (total_q, H, D), k, v (total_k, Hk, D) and int32 prefix sums. Returns
// the 4-D views (1, total, H, D) the kernels take (sequence s: rows cu[s] .. cu[s+1] - 1) and
// records the prefix sums in `opts`. Which backends run it: those whose kernels read `Seqs`.
std::array<at::Tensor, 3> packed_views(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& cu_q, const std::optional<at::Tensor>& cu_k_opt) {
  // The cuda kernels read the prefix sums on q's device (no host synchronisation, so their values
  // are not checked here); the cpu kernels on the host.
  const bool on_device = std::strcmp(kBackendName, "cuda") == 0;
  TORCH_CHECK_NOT_IMPLEMENTED(on_device || std::strcmp(kBackendName, "cpu") == 0, kOp, ": backend '",
                              kBackendName, "' does not support varlen yet; backend='auto' routes such calls to a ",
                              "backend that does");
  TORCH_CHECK_VALUE(cu_k_opt.has_value(), kOp, ": cu_seqlens_q needs cu_seqlens_k");
  const at::Tensor& cu_k = *cu_k_opt;
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK_VALUE(t->dim() == 3, kOp, ": a varlen call takes q, k, v of shape (total, nheads, headdim), ",
                      "got ", t->sizes());
  }
  for (const auto* t : {&cu_q, &cu_k}) {
    const char* name = t == &cu_q ? "cu_seqlens_q" : "cu_seqlens_k";
    const int64_t total = (t == &cu_q ? q : k).size(0);
    TORCH_CHECK_VALUE(t->scalar_type() == at::kInt && t->dim() == 1 && t->numel() == cu_q.numel() &&
                          t->numel() >= 1 && (on_device ? t->device() == q.device() : t->device().is_cpu()),
                      kOp, ": ", name, " must be a 1-D int32 tensor on ", on_device ? "q's device" : "the CPU",
                      " of batch + 1 = ", cu_q.numel(), " prefix sums, got ", t->scalar_type(), " ", t->sizes(),
                      " on ", t->device());
    if (on_device) continue;
    const at::Tensor c = t->contiguous();
    const int32_t* p = c.const_data_ptr<int32_t>();
    bool ok = p[0] == 0 && p[c.numel() - 1] == total;
    for (int64_t i = 1; i < c.numel() && ok; ++i) ok = p[i] >= p[i - 1];
    TORCH_CHECK_VALUE(ok, kOp, ": ", name, " must start at 0, never decrease and end at the number of rows (",
                      total, ")");
  }
  return {q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)};
}

void set_packed(AttentionOptions& o, const at::Tensor& cu_q, const at::Tensor& cu_k) {
  o.cu_seqlens_q = cu_q.contiguous();
  o.cu_seqlens_k = cu_k.contiguous();
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, bool causal, double softmax_scale,
    int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    const std::optional<at::Tensor>& rng_state, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k) {
  at::Tensor q = q_in, k = k_in, v = v_in;
  if (cu_seqlens_q) std::tie(q, k, v) = std::tuple_cat(packed_views(q_in, k_in, v_in, *cu_seqlens_q, cu_seqlens_k));
  check_qkv(q, k, v);
  AttentionOptions opts = make_options(q, k, causal, softmax_scale, window_left, window_right,
                                       softcap, alibi_slopes, dropout_p, rng_state,
                                       cu_seqlens_q ? cu_seqlens_q->numel() - 1 : -1);
  if (!cu_seqlens_q) return backend::attention_forward(q, k, v, softmax_scale, opts);
  set_packed(opts, *cu_seqlens_q, *cu_seqlens_k);
  auto [out, lse] = backend::attention_forward(q, k, v, softmax_scale, opts);
  return {out.squeeze(0), lse.squeeze(0)};  // (total_q, H, D), (H, total_q)
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, bool causal, double softmax_scale,
    bool deterministic, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    const std::optional<at::Tensor>& rng_state, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k) {
  at::Tensor q = q_in, k = k_in, v = v_in, dout = dout_in, out = out_in, lse = lse_in;
  if (cu_seqlens_q) {
    std::tie(q, k, v) = std::tuple_cat(packed_views(q_in, k_in, v_in, *cu_seqlens_q, cu_seqlens_k));
    dout = dout_in.unsqueeze(0), out = out_in.unsqueeze(0), lse = lse_in.unsqueeze(0);
  }
  check_qkv(q, k, v);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  CHECK_DEVICE(dout, q.device());  // one GPU of several: all on q's
  CHECK_DEVICE(out, q.device());
  CHECK_DEVICE(lse, q.device());
  CHECK_SAME_DTYPE(dout, q);
  CHECK_SAME_DTYPE(out, q);
  CHECK_SHAPE(dout, B, T, H, D);
  CHECK_SHAPE(out, B, T, H, D);
  CHECK_SHAPE(lse, B, H, T);
  CHECK_LAST_DIM_CONTIGUOUS(dout);
  CHECK_LAST_DIM_CONTIGUOUS(out);
  CHECK_ROWS_DISJOINT(dout);
  CHECK_ROWS_DISJOINT(out);
  CHECK_DTYPE(lse, q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  AttentionOptions opts = make_options(q, k, causal, softmax_scale, window_left, window_right,
                                       softcap, alibi_slopes, dropout_p, rng_state,
                                       cu_seqlens_q ? cu_seqlens_q->numel() - 1 : -1);
  if (!cu_seqlens_q) return backend::attention_backward(dout, q, k, v, out, lse, softmax_scale, deterministic, opts);
  set_packed(opts, *cu_seqlens_q, *cu_seqlens_k);
  auto [dq, dk, dv] = backend::attention_backward(dout, q, k, v, out, lse, softmax_scale, deterministic, opts);
  return {dq.squeeze(0), dk.squeeze(0), dv.squeeze(0)};
}

}  // namespace gptfast
