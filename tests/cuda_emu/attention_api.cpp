// ctypes entry points of the emulated csrc/cuda/attention.cu (built by tests/test_cuda_emulated.py
// from the rewritten copy, see rewrite.py). Strides: q, k, v, out, dout, each (batch, row, head),
// in elements; the packed layout through emu_attention_set_varlen. Options go through
// emu_attention_set_options (kept until the next call), then attention.h's set_attention_options,
// as csrc/cuda/attention.cpp does.
#include "attention.cu"

using gptfast::cuda::AttentionParams;

// The device's opt-in shared memory per block that the launches see (default: sm_90's 227 KiB;
// 99 KiB, as on sm_86/89/120, selects the backward's single-buffered kernels).
static int g_max_smem = 227 * 1024;
EMU_API void emu_attention_set_max_smem(int bytes) { g_max_smem = bytes; }

// The normalised options of csrc/common/backend.h's AttentionOptions (window sides -1 =
// unbounded; causal is window_right 0), ALiBi slopes (fp32, batch stride 0 or heads) or null, and
// the dropout key: the address of an int64 [seed, offset] pair (rng_state's data; "device" memory
// is host memory here), which the kernels read when they run, as on the GPU -- the launch copies
// nothing, so a change of those 16 bytes before the launch changes the mask.
static struct {
  int64_t window_left = -1, window_right = -1;
  double softcap = 0.0;
  const float* alibi = nullptr;
  int64_t alibi_batch_stride = 0;
  double dropout_p = 0.0;
  uint32_t threshold = 0;
  const int64_t* rng_state = nullptr;
} g_opts;
EMU_API void emu_attention_set_options(int64_t window_left, int64_t window_right, double softcap, const float* alibi,
                                       int64_t alibi_batch_stride, double dropout_p, uint32_t threshold,
                                       const int64_t* rng_state) {
  g_opts.window_left = window_left, g_opts.window_right = window_right, g_opts.softcap = softcap;
  g_opts.alibi = alibi, g_opts.alibi_batch_stride = alibi_batch_stride;
  g_opts.dropout_p = dropout_p, g_opts.threshold = threshold, g_opts.rng_state = rng_state;
}

// The packed variable-length layout (attention.h): int32 prefix sums of `batch` sequences, or
// null for the dense layout (kept until the next call). With it set, the calls below take the
// packed (1, total_q, ...) / (1, total_k, ...) tensors: B = 1, Tq = total_q, Tk = total_k.
static struct {
  const int* cu_q = nullptr;
  const int* cu_k = nullptr;
  int batch = 0;
} g_varlen;
EMU_API void emu_attention_set_varlen(const int* cu_seqlens_q, const int* cu_seqlens_k, int batch) {
  g_varlen.cu_q = cu_seqlens_q, g_varlen.cu_k = cu_seqlens_k, g_varlen.batch = batch;
}

static void fill(AttentionParams& p, const void* q, const void* k, const void* v, const int64_t* st, int B, int Tq,
                 int Tk, int H, int Hk, int D, float scale, int bf16) {
  p.q = q, p.k = k, p.v = v;
  p.q_batch_stride = st[0], p.q_row_stride = st[1], p.q_head_stride = st[2];
  p.k_batch_stride = st[3], p.k_row_stride = st[4], p.k_head_stride = st[5];
  p.v_batch_stride = st[6], p.v_row_stride = st[7], p.v_head_stride = st[8];
  p.batch = B, p.seqlen_q = Tq, p.seqlen_k = Tk, p.heads = H, p.heads_k = Hk, p.head_dim = D;
  p.scale = scale;
  p.scale_log2 = static_cast<float>(static_cast<double>(scale) * M_LOG2E);  // as csrc/cuda/attention.cpp
  gptfast::cuda::set_attention_options(p, g_opts.window_left, g_opts.window_right, g_opts.softcap, g_opts.alibi,
                                       g_opts.alibi_batch_stride, g_opts.dropout_p, g_opts.threshold,
                                       reinterpret_cast<const uint64_t*>(g_opts.rng_state));
  p.is_bf16 = bf16;
  p.max_smem_per_block = g_max_smem;
  if (g_varlen.cu_q != nullptr) {  // as csrc/cuda/attention.cpp's set_qkv
    p.batch = g_varlen.batch;
    p.cu_seqlens_q = g_varlen.cu_q, p.cu_seqlens_k = g_varlen.cu_k;
  }
}

EMU_API int emu_attention_forward(const void* q, const void* k, const void* v, const int64_t* st, int B, int Tq,
                                  int Tk, int H, int Hk, int D, float scale, int bf16, void* out, float* lse) {
  AttentionParams p{};
  fill(p, q, k, v, st, B, Tq, Tk, H, Hk, D, scale, bf16);
  p.out = out;
  p.lse = lse;
  return gptfast::cuda::attention_forward_launch(p, nullptr);
}

// dk, dv: (B, Tk, H, D), one gradient per query head (the host sums each kv head's group).
EMU_API int emu_attention_backward(const void* q, const void* k, const void* v, const int64_t* st, int B, int Tq,
                                   int Tk, int H, int Hk, int D, float scale, int bf16, const void* out,
                                   const void* dout, const float* lse, float* delta, void* dq, void* dk, void* dv,
                                   float* dq_accum) {
  AttentionParams p{};
  fill(p, q, k, v, st, B, Tq, Tk, H, Hk, D, scale, bf16);
  p.out_in = out, p.dout = dout;
  p.o_batch_stride = st[9], p.o_row_stride = st[10], p.o_head_stride = st[11];
  p.do_batch_stride = st[12], p.do_row_stride = st[13], p.do_head_stride = st[14];
  p.lse_in = lse;
  p.delta = delta;
  p.dq = dq, p.dk = dk, p.dv = dv;
  p.dq_accum = dq_accum;
  return gptfast::cuda::attention_backward_launch(p, nullptr);
}
