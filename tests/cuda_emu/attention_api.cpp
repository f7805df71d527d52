// ctypes entry points of the emulated csrc/cuda/attention.cu (built by tests/test_cuda_emulated.py
// from the rewritten copy, see rewrite.py). Strides: q, k, v, out, dout, each (batch, row, head),
// in elements.
#include "attention.cu"

using gptfast::cuda::AttentionParams;

// The device's opt-in shared memory per block that the launches see (default: sm_90's 227 KiB;
// 99 KiB, as on sm_86/89/120, selects the backward's single-buffered kernels).
static int g_max_smem = 227 * 1024;
EMU_API void emu_attention_set_max_smem(int bytes) { g_max_smem = bytes; }

static void fill(AttentionParams& p, const void* q, const void* k, const void* v, const int64_t* st, int B, int T,
                 int H, int D, float scale, int causal, int bf16) {
  p.q = q, p.k = k, p.v = v;
  p.q_batch_stride = st[0], p.q_row_stride = st[1], p.q_head_stride = st[2];
  p.k_batch_stride = st[3], p.k_row_stride = st[4], p.k_head_stride = st[5];
  p.v_batch_stride = st[6], p.v_row_stride = st[7], p.v_head_stride = st[8];
  p.batch = B, p.seqlen = T, p.heads = H, p.head_dim = D;
  p.scale = scale;
  p.scale_log2 = static_cast<float>(static_cast<double>(scale) * M_LOG2E);  // as csrc/cuda/attention.cpp
  p.causal = causal;
  p.is_bf16 = bf16;
  p.max_smem_per_block = g_max_smem;
}

EMU_API int emu_attention_forward(const void* q, const void* k, const void* v, const int64_t* st, int B, int T,
                                  int H, int D, float scale, int causal, int bf16, void* out, float* lse) {
  AttentionParams p{};
  fill(p, q, k, v, st, B, T, H, D, scale, causal, bf16);
  p.out = out;
  p.lse = lse;
  return gptfast::cuda::attention_forward_launch(p, nullptr);
}

EMU_API int emu_attention_backward(const void* q, const void* k, const void* v, const int64_t* st, int B, int T,
                                   int H, int D, float scale, int causal, int bf16, const void* out,
                                   const void* dout, const float* lse, float* delta, void* dq, void* dk, void* dv,
                                   float* dq_accum) {
  AttentionParams p{};
  fill(p, q, k, v, st, B, T, H, D, scale, causal, bf16);
  p.out_in = out, p.dout = dout;
  p.o_batch_stride = st[9], p.o_row_stride = st[10], p.o_head_stride = st[11];
  p.do_batch_stride = st[12], p.do_row_stride = st[13], p.do_head_stride = st[14];
  p.lse_in = lse;
  p.delta = delta;
  p.dq = dq, p.dk = dk, p.dv = dv;
  p.dq_accum = dq_accum;
  return gptfast::cuda::attention_backward_launch(p, nullptr);
}
