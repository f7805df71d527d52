// Launch parameters and launch functions of the CUDA attention kernels (csrc/cuda/attention.cu).
// Plain C++: shared by the kernels (nvcc) and the host launcher attention.cpp (host compiler).
#pragma once

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>

namespace gptfast {
namespace cuda {

// q, out, dout: (batch, seqlen_q, heads, head_dim); k, v: (batch, seqlen_k, heads_k, head_dim), of
// 16-bit elements, stride 1 in head_dim, every other stride a multiple of 8 elements and every
// base pointer 16-byte aligned (the host launcher copies inputs that are not), head_dim a multiple
// of 8 (the host pads it). Query head h reads kv head h / (heads / heads_k).
struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int batch, seqlen_q, seqlen_k, heads, heads_k, head_dim;
  float scale;       // softmax scale
  float scale_log2;  // softmax scale * log2(e): the kernels work with exp2
  // Mask, bottom-right aligned: query i sees key j iff
  //   i + seqlen_k - seqlen_q - window_left <= j <= i + seqlen_k - seqlen_q + window_right,
  // each side kWindowUnbounded when unbounded (causal: right 0, left unbounded). Pure index math:
  // every instantiation handles it.
  int window_left, window_right;
  // Score modifiers (run in the kHasModifiers instantiation only; see attention.cu's header).
  bool has_modifiers;     // softcap > 0, ALiBi or dropout
  float softcap_scale;    // scale / softcap: tanh's argument is qk * softcap_scale (softcap > 0)
  float softcap_log2;     // softcap * log2(e); 0: no softcap
  const float* alibi_slopes;    // fp32, slope of (b, h) at b * alibi_batch_stride + h; or nullptr
  int64_t alibi_batch_stride;   // 0 for (heads,) slopes, heads for (batch, heads)
  bool dropout;                 // dropout_p > 0: gptfast/ops/_philox.py's mask
  uint32_t dropout_threshold;   // keep iff the Philox word >= this (floor(p * 2^32), from double p)
  float dropout_scale;          // 1 / (1 - p)
  // Philox key and stream offset: gptfast/ops/_philox.py's rng_state, int64 [seed, offset] (their
  // 64-bit patterns; the offset a multiple of 4) in device memory, read by the kernels when they
  // draw (no host copy: a launch stays valid in a CUDA graph and the values may change between
  // replays). nullptr without dropout.
  const uint64_t* dropout_key;
  bool is_bf16;
  // Packed variable-length layout (gptfast/ops/varlen.py), or nullptr for the dense one. Set: the
  // tensors are the packed (1, total_q, heads, head_dim) / (1, total_k, heads_k, head_dim) views
  // (seqlen_q = total_q, seqlen_k = total_k, batch strides unused), `batch` is the number of
  // sequences, and sequence b is rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 of q (of k, v:
  // cu_seqlens_k), a dense problem of its own lengths (its own bottom-right masks, ALiBi row b,
  // dropout drawn as batch entry b). int32 (batch + 1,) prefix sums in device memory, read by
  // the kernels (no host synchronisation). lse and delta are (heads, total_q); the outputs are
  // packed like q, k. Grids: varlen_blocks below.
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;
  // The device's opt-in shared-memory limit per block (bytes): the backward double-buffers its
  // streamed tiles only where that variant fits (attention_smem_bytes).
  int max_smem_per_block;

  // Forward outputs: out (batch, seqlen_q, heads, head_dim) contiguous; lse (batch, heads, seqlen_q).
  void* out;
  float* lse;

  // Backward inputs: out and dout laid out like q (own strides), lse (batch, heads, seqlen_q) fp32
  // contiguous; delta (batch, heads, seqlen_q) fp32 scratch, written by the preprocessing kernel.
  const void* out_in;
  const void* dout;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t do_batch_stride, do_row_stride, do_head_stride;
  const float* lse_in;
  float* delta;
  // Backward outputs, contiguous: dq (batch, seqlen_q, heads, head_dim); dk, dv (batch, seqlen_k,
  // heads, head_dim) -- per query head: under GQA the caller sums each kv head's group. dq_accum
  // (fp32, dq's layout, zeroed) is used when dQ is accumulated with atomics; nullptr selects the
  // deterministic dQ kernel.
  void* dq;
  void* dk;
  void* dv;
  float* dq_accum;
};

// Rows of all sequences together: batch * seqlen_q (dense) or total_q (packed).
inline int64_t total_rows_q(const AttentionParams& p) {
  return p.cu_seqlens_q == nullptr ? static_cast<int64_t>(p.batch) * p.seqlen_q : p.seqlen_q;
}

// A packed grid's 64-row blocks: sequence b's blocks are numbers cu[b] / 64 + b .. + ceil(len_b /
// 64) - 1 (disjoint and increasing in b, since floor((c + n) / 64) - floor(c / 64) >= ceil(n / 64) - 1),
// so total / 64 + batch blocks cover every sequence without knowing the longest one, and at most
// batch + 1 of them find no rows and exit at once. A kernel finds its sequence by binary search.
inline int64_t varlen_blocks(int64_t total, int batch) { return total / 64 + batch; }

// A window side that bounds nothing: larger than any distance between a query and a key (seqlen
// <= 64 * 65535, checked by the host), small enough that i + shift +- it never overflows int.
constexpr int kWindowUnbounded = 1 << 30;

// Fills the mask and score-modifier fields from the options in FlashAttention's normal form
// (csrc/common/backend.h AttentionOptions: -1 = unbounded side; softcap 0 = none; dropout_p 0 =
// none, threshold = floor(p * 2^32) computed in double; dropout_key: the device address of the
// int64 [seed, offset] pair). One definition for the host launcher and
// the CPU emulation's entry points (tests/cuda_emu/attention_api.cpp).
inline void set_attention_options(AttentionParams& p, int64_t window_left, int64_t window_right, double softcap,
                                  const float* alibi_slopes, int64_t alibi_batch_stride, double dropout_p,
                                  uint32_t dropout_threshold, const uint64_t* dropout_key) {
  p.window_left = window_left < 0 ? kWindowUnbounded : static_cast<int>(window_left);
  p.window_right = window_right < 0 ? kWindowUnbounded : static_cast<int>(window_right);
  p.softcap_log2 = softcap > 0.0 ? static_cast<float>(softcap * M_LOG2E) : 0.f;
  p.softcap_scale = softcap > 0.0 ? static_cast<float>(static_cast<double>(p.scale) / softcap) : 0.f;
  p.alibi_slopes = alibi_slopes;
  p.alibi_batch_stride = alibi_batch_stride;
  p.dropout = dropout_p > 0.0;
  p.dropout_threshold = dropout_threshold;
  p.dropout_scale = p.dropout ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 1.f;
  p.dropout_key = p.dropout ? dropout_key : nullptr;
  p.has_modifiers = softcap > 0.0 || alibi_slopes != nullptr || p.dropout || window_left >= 0;
}

cudaError_t attention_forward_launch(const AttentionParams& params, cudaStream_t stream);
cudaError_t attention_backward_launch(const AttentionParams& params, cudaStream_t stream);
// Dynamic shared memory for a head dim: forward (kernel 0), backward kernels single-buffered (1)
// or double-buffered (2; -1 where that variant is not compiled).
int attention_smem_bytes(int head_dim, int kernel);

}  // namespace cuda
}  // namespace gptfast
