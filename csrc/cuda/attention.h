// Launch parameters and launch functions of the CUDA attention kernels (csrc/cuda/attention.cu).
// Plain C++: shared by the kernels (nvcc) and the host launcher attention.cpp (host compiler).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace gptfast {
namespace cuda {

// q, k, v, out, dout: (batch, seqlen, heads, head_dim) of 16-bit elements, stride 1 in head_dim,
// every other stride a multiple of 8 elements and every base pointer 16-byte aligned (the host
// launcher copies inputs that are not), head_dim a multiple of 8 (the host pads it).
struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int batch, seqlen, heads, head_dim;
  float scale;       // softmax scale
  float scale_log2;  // softmax scale * log2(e): the kernels work with exp2
  bool causal;
  bool is_bf16;
  // The device's opt-in shared-memory limit per block (bytes): the backward double-buffers its
  // streamed tiles only where that variant fits (attention_smem_bytes).
  int max_smem_per_block;

  // Forward outputs: out (batch, seqlen, heads, head_dim) contiguous; lse (batch, heads, seqlen).
  void* out;
  float* lse;

  // Backward inputs: out and dout laid out like q (own strides), lse (batch, heads, seqlen) fp32
  // contiguous; delta (batch, heads, seqlen) fp32 scratch, written by the preprocessing kernel.
  const void* out_in;
  const void* dout;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t do_batch_stride, do_row_stride, do_head_stride;
  const float* lse_in;
  float* delta;
  // Backward outputs, contiguous (batch, seqlen, heads, head_dim). dq_accum (fp32, same layout,
  // zeroed) is used when dQ is accumulated with atomics; nullptr selects the deterministic
  // dQ kernel.
  void* dq;
  void* dk;
  void* dv;
  float* dq_accum;
};

cudaError_t attention_forward_launch(const AttentionParams& params, cudaStream_t stream);
cudaError_t attention_backward_launch(const AttentionParams& params, cudaStream_t stream);
// Dynamic shared memory for a head dim: forward (kernel 0), backward kernels single-buffered (1)
// or double-buffered (2; -1 where that variant is not compiled).
int attention_smem_bytes(int head_dim, int kernel);

}  // namespace cuda
}  // namespace gptfast
