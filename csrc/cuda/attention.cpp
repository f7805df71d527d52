// Host side of the CUDA attention kernels (csrc/cuda/attention.cu): tensors -> AttentionParams.
//
// The kernels move 16-byte chunks, so they need head_dim % 8 == 0, every stride but the last a
// multiple of 8 elements and 16-byte aligned base pointers. Inputs that miss this are copied
// here: a head dim that is not a multiple of 8 is zero-padded up to one (zero columns add
// nothing to q.k and produce zero output columns, which are cut off again), other misaligned
// inputs are made contiguous. Outputs are fresh, contiguous tensors (the launcher contract).
// Every option of csrc/common/backend.h's AttentionOptions runs here (GQA/MQA, seqlen_q !=
// seqlen_k, windows, softcap, ALiBi, dropout) and the packed variable-length layout (csrc/attention.cpp
// passes the (1, total, heads, head_dim) views and the prefix sums, which stay on the device: the
// kernels read them, nothing here does); under GQA the dK/dV kernel writes one gradient per
// query head and each kv head's group is summed here (deterministic, no atomics).
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <cfloat>
#include <cmath>

#include "common/backend.h"
#include "cuda/attention.h"
#include "cuda/host.h"

namespace gptfast {
namespace cuda {

namespace {
constexpr const char* kOp = "gptfast.attention";

bool is_aligned(const at::Tensor& x) {
  if (x.stride(3) != 1) return false;
  for (int d = 0; d < 3; ++d) {
    if (x.size(d) > 1 && x.stride(d) % 8 != 0) return false;
  }
  return reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
}

// x with its head dim padded to `padded` and a layout the kernels can read.
at::Tensor prepare(const at::Tensor& x, int64_t padded) {
  if (x.size(3) != padded) return at::constant_pad_nd(x, {0, padded - x.size(3)}, 0);
  if (is_aligned(x)) return x;
  // contiguous() would return x itself when x is contiguous but starts off a 16-byte boundary
  // (a view at an odd storage offset): copy into a fresh, aligned allocation instead.
  return x.is_contiguous() ? x.clone(at::MemoryFormat::Contiguous) : x.contiguous();
}

// The device's opt-in shared memory per block, and a clear error when `kernel` needs more.
int check_smem(const at::Tensor& q, int64_t head_dim_padded, int kernel, const char* what) {
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, q.get_device()));
  const int need = attention_smem_bytes(static_cast<int>(head_dim_padded), kernel);
  TORCH_CHECK_NOT_IMPLEMENTED(need <= optin, kOp, ": the cuda backend's ", what, " needs ", need,
                              " bytes of shared memory per block for head dim ", q.size(3), "; this GPU ",
                              "allows ", optin, ". Use backend='triton' for this shape on this GPU");
  return optin;
}

void check_dtype(const at::Tensor& q) {
  TORCH_CHECK_TYPE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, kOp,
                   ": the cuda backend runs attention on tensor cores in float16 or bfloat16, got ",
                   q.scalar_type(), "; use backend='triton' or 'reference' for float32/float64");
}

// The dropout key the kernels read: opts.rng_state (int64 [seed, offset], contiguous) where it is
// on q's device already (gptfast.ops._philox.dropout_rng_state draws it there: nothing is copied
// to or from the host, so the launch can be captured in a CUDA graph); a CPU tensor is copied to
// the device (an ordinary host-to-device copy on the current stream). Undefined without dropout.
at::Tensor device_key(const at::Tensor& q, const AttentionOptions& opts) {
  if (opts.dropout_p <= 0.0 || !opts.rng_state.has_value()) return {};
  const at::Tensor& r = *opts.rng_state;
  return r.device() == q.device() ? r : r.to(q.device()).contiguous();
}

// `key`: device_key's tensor, kept alive by the caller until the launch is enqueued.
void set_qkv(AttentionParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
             double scale, const AttentionOptions& opts, const at::Tensor& key) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_batch_stride = q.stride(0), p.q_row_stride = q.stride(1), p.q_head_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_row_stride = k.stride(1), p.k_head_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_row_stride = v.stride(1), p.v_head_stride = v.stride(2);
  p.batch = static_cast<int>(q.size(0));
  p.seqlen_q = static_cast<int>(q.size(1));
  p.seqlen_k = static_cast<int>(k.size(1));
  p.heads = static_cast<int>(q.size(2));
  p.heads_k = static_cast<int>(k.size(2));
  p.head_dim = static_cast<int>(q.size(3));
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * M_LOG2E);
  const float* slopes = nullptr;
  int64_t slopes_batch_stride = 0;
  if (opts.alibi_slopes.has_value()) {  // fp32 (H,) or (B, H), contiguous (csrc/attention.cpp)
    slopes = opts.alibi_slopes->data_ptr<float>();
    slopes_batch_stride = opts.alibi_slopes->dim() == 2 ? q.size(2) : 0;
  }
  set_attention_options(p, opts.window_left, opts.window_right, opts.softcap, slopes, slopes_batch_stride,
                        opts.dropout_p, opts.dropout_threshold,
                        key.defined() ? reinterpret_cast<const uint64_t*>(key.const_data_ptr<int64_t>()) : nullptr);
  p.is_bf16 = q.scalar_type() == at::kBFloat16;
  if (opts.cu_seqlens_q.has_value()) {  // packed: q, k, v are (1, total, heads, head_dim) views
    p.batch = static_cast<int>(opts.cu_seqlens_q->numel() - 1);
    p.cu_seqlens_q = opts.cu_seqlens_q->data_ptr<int>();
    p.cu_seqlens_k = opts.cu_seqlens_k->data_ptr<int>();
  }
}

at::Tensor unpad(const at::Tensor& x, int64_t head_dim) {
  return x.size(3) == head_dim ? x : x.narrow(3, 0, head_dim).contiguous();
}

int64_t padded_head_dim(int64_t d) { return (d + 7) / 8 * 8; }

void check_scale(double scale) {
  TORCH_CHECK_VALUE(std::abs(scale) <= FLT_MAX, kOp, ": softmax_scale ", scale, " overflows float32");
}

void check_sizes(const at::Tensor& q, const at::Tensor& k) {
  // Grid: batch * heads on x (up to 2^31 - 1), blocks of 64 query rows (forward, dQ) or key rows
  // (dK/dV) on y (up to 65535). The same bound keeps the kernels' mask arithmetic (row + seqlen_k
  // - seqlen_q +- window, attention.h kWindowUnbounded) within int.
  for (const auto* t : {&q, &k}) {
    const char* name = t == &q ? "seqlen_q" : "seqlen_k";
    TORCH_CHECK_VALUE(t->size(1) <= 64LL * 65535, kOp, ": ", name, " ", t->size(1),
                      " exceeds the cuda backend's limit ", 64LL * 65535);
  }
  TORCH_CHECK_VALUE(q.size(0) * q.size(2) <= INT32_MAX, kOp, ": batch * nheads is too large");
}

// A packed call's grids: blocks of 64 rows over all sequences plus one per sequence (attention.h
// varlen_blocks) on y. The prefix sums stay on the device (csrc/attention.cpp checked their dtype,
// shape and device; their values are the caller's, gptfast.ops.varlen checks them in eager mode).
void check_packed(const at::Tensor& q, const at::Tensor& k, const AttentionOptions& opts) {
  if (!opts.cu_seqlens_q.has_value()) return;
  const int64_t batch = opts.cu_seqlens_q->numel() - 1;
  TORCH_CHECK_VALUE(batch <= INT32_MAX, kOp, ": too many sequences (", batch, ")");
  for (const auto* t : {&q, &k}) {
    const char* name = t == &q ? "total_q" : "total_k";
    const int64_t blocks = varlen_blocks(t->size(1), static_cast<int>(batch));
    TORCH_CHECK_VALUE(blocks <= 65535, kOp, ": ", name, " / 64 + batch = ", blocks,
                      " exceeds the cuda backend's grid limit 65535");
  }
  for (const auto* cu : {&*opts.cu_seqlens_q, &*opts.cu_seqlens_k}) {
    TORCH_CHECK_VALUE(cu->device() == q.device(), kOp, ": cu_seqlens must be on q's device ", q.device(),
                      ", got ", cu->device());
  }
}

// What only this backend requires, beyond the shared checks of csrc/attention.cpp. Every option
// is implemented (gptfast.ops._backend.KERNEL_ATTENTION_FEATURES["cuda"]): none is refused.
void check_cuda_inputs(const at::Tensor& q, const at::Tensor& k, double scale, const AttentionOptions& opts) {
  check_dtype(q);
  check_sizes(q, k);
  check_scale(scale);
  check_packed(q, k, opts);
}

// dK or dV of the kv heads: the kernels' per-query-head gradient x (B, Tk, H, Dp) summed over
// each group of H / Hk query heads (FlashAttention's way: deterministic, no atomics).
at::Tensor group_sum(const at::Tensor& x, int64_t heads_k) {
  const int64_t B = x.size(0), Tk = x.size(1), H = x.size(2), Dp = x.size(3);
  if (H == heads_k) return x;
  return at::sum(x.view({B, Tk, heads_k, H / heads_k, Dp}), {3});
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, double scale,
                                                     const AttentionOptions& options) {
  check_cuda_inputs(q_in, k_in, scale, options);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), T = q_in.size(1), H = q_in.size(2), D = q_in.size(3);
  const int64_t Dp = padded_head_dim(D);
  const int max_smem = check_smem(q_in, Dp, 0, "forward");
  if (k_in.size(1) == 0) {  // no keys: every row is empty (out 0, lse -inf); nothing to launch
    return {at::zeros({B, T, H, D}, q_in.options()),
            at::full({B, H, T}, -INFINITY, q_in.options().dtype(at::kFloat))};
  }
  at::Tensor out = at::empty({B, T, H, Dp}, q_in.options());
  at::Tensor lse = at::empty({B, H, T}, q_in.options().dtype(at::kFloat));
  if (B * T * H == 0) return {unpad(out, D), lse};
  const at::Tensor q = prepare(q_in, Dp), k = prepare(k_in, Dp), v = prepare(v_in, Dp);
  AttentionParams p{};
  const at::Tensor key = device_key(q_in, options);
  set_qkv(p, q, k, v, scale, options, key);
  p.max_smem_per_block = max_smem;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  GPTFAST_CUDA_LAUNCH_CHECK(attention_forward_launch(p, current_stream()));
  return {unpad(out, D), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, double scale, bool deterministic,
    const AttentionOptions& options) {
  check_cuda_inputs(q_in, k_in, scale, options);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), T = q_in.size(1), H = q_in.size(2), D = q_in.size(3);
  const int64_t Tk = k_in.size(1), Hk = k_in.size(2);
  const int64_t Dp = padded_head_dim(D);
  const int max_smem = check_smem(q_in, Dp, 1, "backward");  // the single-buffered variant
  const auto opts = q_in.options();
  if (B * T * H == 0 || Tk == 0) {  // nothing to launch: an empty output or every row without keys
    return {at::zeros({B, T, H, D}, opts), at::zeros({B, Tk, Hk, D}, opts), at::zeros({B, Tk, Hk, D}, opts)};
  }
  // dK, dV per query head (the kernels'); group_sum reduces them to the kv heads under GQA.
  at::Tensor dq = at::empty({B, T, H, Dp}, opts), dk = at::empty({B, Tk, H, Dp}, opts),
             dv = at::empty({B, Tk, H, Dp}, opts);
  const at::Tensor q = prepare(q_in, Dp), k = prepare(k_in, Dp), v = prepare(v_in, Dp);
  const at::Tensor out = prepare(out_in, Dp), dout = prepare(dout_in, Dp);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor delta = at::empty({B, H, T}, opts.dtype(at::kFloat));
  at::Tensor dq_accum;
  if (!deterministic) dq_accum = at::zeros({B, T, H, Dp}, opts.dtype(at::kFloat));

  AttentionParams p{};
  const at::Tensor key = device_key(q_in, options);
  set_qkv(p, q, k, v, scale, options, key);
  p.max_smem_per_block = max_smem;
  p.out_in = out.data_ptr();
  p.dout = dout.data_ptr();
  p.o_batch_stride = out.stride(0), p.o_row_stride = out.stride(1), p.o_head_stride = out.stride(2);
  p.do_batch_stride = dout.stride(0), p.do_row_stride = dout.stride(1), p.do_head_stride = dout.stride(2);
  p.lse_in = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_accum = deterministic ? nullptr : dq_accum.data_ptr<float>();
  GPTFAST_CUDA_LAUNCH_CHECK(attention_backward_launch(p, current_stream()));
  return {unpad(dq, D), unpad(group_sum(dk, Hk), D), unpad(group_sum(dv, Hk), D)};
}

}  // namespace cuda
}  // namespace gptfast
