// gptfast attention: argument checks for the native launchers (bound in bindings.cpp).
// Shapes, dtypes and return values follow the launcher contract in gptfast/ops/_backend.py:
// q (B, Tq, H, D), k and v (B, Tk, Hk, D) with H % Hk == 0, and FlashAttention 2.8's dense
// options (window, softcap, ALiBi, dropout), normalised here into one AttentionOptions.
#include <cmath>
#include <cstring>

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
                              const std::optional<at::Tensor>& rng_state) {
  TORCH_CHECK_VALUE(std::isfinite(scale), kOp, ": softmax_scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, kOp,
                    ": window_size must be two integers >= -1 (-1: unbounded), got (", window_left,
                    ", ", window_right, ")");
  TORCH_CHECK_VALUE(std::isfinite(softcap), kOp, ": softcap must be finite, got ", softcap);
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, kOp, ": dropout_p must be in [0, 1), got ",
                    dropout_p);
  const int64_t B = q.size(0), H = q.size(2), Tk = k.size(1);
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
    o.rng_state = r.contiguous();  // for kernels that read the key on the device (graph-safe)
    // The host copy of the key: free for a CPU tensor; a device-to-host copy otherwise (a kernel
    // that reads o.rng_state on the device does not need these values).
    const at::Tensor rc = r.device().is_cpu() ? *o.rng_state : r.to(at::kCPU);
    const int64_t* rp = rc.const_data_ptr<int64_t>();
    std::memcpy(&o.seed, rp, sizeof(uint64_t));  // the same 64 bits, read as unsigned
    std::memcpy(&o.offset, rp + 1, sizeof(uint64_t));
    TORCH_CHECK_VALUE(o.offset % 4 == 0, kOp,
                      ": rng_state's offset must be a multiple of 4 (a Philox stream position), got ",
                      o.offset);
    TORCH_CHECK_VALUE(B * H <= (int64_t(1) << 32) && q.size(1) <= (int64_t(1) << 32), kOp,
                      ": dropout needs batch * nheads <= 2^32 and seqlen_q <= 2^32 (Philox counter words)");
    // p * 2^32 is exact in double; p < 1 keeps the threshold below 2^32.
    o.dropout_threshold = static_cast<uint32_t>(std::floor(dropout_p * 4294967296.0));
  }
  return o;
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double softmax_scale,
    int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    const std::optional<at::Tensor>& rng_state) {
  check_qkv(q, k, v);
  const AttentionOptions opts = make_options(q, k, causal, softmax_scale, window_left, window_right,
                                             softcap, alibi_slopes, dropout_p, rng_state);
  return backend::attention_forward(q, k, v, softmax_scale, opts);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double softmax_scale,
    bool deterministic, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    const std::optional<at::Tensor>& rng_state) {
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
  const AttentionOptions opts = make_options(q, k, causal, softmax_scale, window_left, window_right,
                                             softcap, alibi_slopes, dropout_p, rng_state);
  return backend::attention_backward(dout, q, k, v, out, lse, softmax_scale, deterministic, opts);
}

}  // namespace gptfast
