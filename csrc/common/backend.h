// Which kernels this build of the extension binds, and their entry points. The same bindings and
// argument checks (csrc/bindings.cpp, csrc/<op>.cpp) are compiled twice by gptfast/_build.py:
// once for the cpu backend (kernels in csrc/cpu/, namespace gptfast::cpu), once with
// -DGPTFAST_CUDA for the cuda backend (csrc/cuda/, gptfast::cuda), so that each backend loads,
// and fails to build, on its own. The kernel files include this header too, so both sets of
// definitions are checked against the one declaration list below. Inputs are validated by
// csrc/<op>.cpp; signatures and return values follow the launcher contract in
// gptfast/ops/_backend.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "common/checks.h"

#ifdef GPTFAST_CUDA
#define GPTFAST_KERNELS cuda
#define GPTFAST_BACKEND_NAME "cuda"
#define CHECK_BACKEND_DEVICE(x)                                                                  \
  TORCH_CHECK_VALUE((x).is_cuda(), kOp, ": ", #x,                                                \
                    " must be a CUDA tensor for the cuda backend, got ", (x).device())
#else
#define GPTFAST_KERNELS cpu
#define GPTFAST_BACKEND_NAME "cpu"
#define CHECK_BACKEND_DEVICE(x) CHECK_CPU(x)
#endif

namespace gptfast {

// FlashAttention 2.8's dense options of one attention call, validated and normalised by
// csrc/attention.cpp (the semantics: gptfast/ops/attention.py's docstring). The kv head count
// and seqlen_k come from k's shape.
struct AttentionOptions {
  int64_t window_left = -1;   // -1: unbounded; normalised (>= seqlen_k is -1)
  int64_t window_right = -1;  // -1: unbounded; 0 when causal
  double softcap = 0.0;       // 0: none
  std::optional<at::Tensor> alibi_slopes;  // float32 (H,) or (B, H), contiguous, or none
  double dropout_p = 0.0;     // 0: none
  uint64_t seed = 0, offset = 0;      // gptfast/ops/_philox.py's (seed, offset), from rng_state
  std::optional<at::Tensor> rng_state;  // int64 [seed, offset], contiguous, on the CPU or q's device
  // Packed variable-length sequences (gptfast/ops/varlen.py): q, k, v are then one batch entry of
  // total rows, sequence s is rows cu[s] .. cu[s+1] - 1 (int32, contiguous, validated); none: dense.
  std::optional<at::Tensor> cu_seqlens_q, cu_seqlens_k;
  uint32_t dropout_threshold = 0;     // floor(dropout_p * 2^32), computed in double

  bool causal() const { return window_left < 0 && window_right == 0; }
  // No option beyond a causal or full mask (the shape-dependent gqa / seqlen_q != seqlen_k
  // features are judged by the kernels from the tensors).
  bool plain() const {
    return window_left < 0 && window_right <= 0 && softcap == 0.0 && !alibi_slopes.has_value() &&
           dropout_p == 0.0;
  }
};

namespace GPTFAST_KERNELS {

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v, double scale,
                                                     const AttentionOptions& opts);
// deterministic: no atomics (ignored by the cpu kernels, which never use them)
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale, bool deterministic,
    const AttentionOptions& opts);

// With residual: LayerNorm of s = x + residual (rounded to x's dtype), s returned fourth (none
// without). With dresidual (the gradient of s; x is then the saved s): dx + dresidual.
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> layer_norm_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, const std::optional<at::Tensor>& residual);
std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> layer_norm_backward(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, bool has_bias,
    const std::optional<at::Tensor>& dresidual);

// RMSNorm: y, rstd and, with residual, s = x + residual; backward dx
// (+ dresidual), dweight (none without a weight).
std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> rms_norm_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps, double offset,
    const std::optional<at::Tensor>& residual);
std::tuple<at::Tensor, std::optional<at::Tensor>> rms_norm_backward(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& rstd, double offset, const std::optional<at::Tensor>& dresidual);

// gptfast.linear_cross_entropy's logits epilogue (the contract: cross_entropy_logits_reference in
// gptfast/ops/linear_cross_entropy.py): z (C, V) fp32 (fp64 on cpu) contiguous logits, targets
// (C,) int64, row_scale (C,) of z's dtype or none. Returns the losses (C,); with row_scale, z is
// overwritten by the gradient of sum(row_scale * losses) (otherwise its content is unspecified).
at::Tensor cross_entropy_logits_(at::Tensor& z, const at::Tensor& targets,
                                 const std::optional<at::Tensor>& row_scale, int64_t ignore_index,
                                 double label_smoothing, double softcap);

// The gated FFN (SwiGLU / GeGLU): out, g = x w_gate^T + b_gate, u = x w_up^T + b_up; activation
// 0 SiLU, 1 GELU tanh, 2 GELU erf (parsed by csrc/gated_ffn.cpp). Backward: dx, dw_gate, db_gate,
// dw_up, db_up, dw_down, db_down (the biases' none when absent).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_ffn_forward(
    const at::Tensor& x, const at::Tensor& w_gate, const std::optional<at::Tensor>& b_gate,
    const at::Tensor& w_up, const std::optional<at::Tensor>& b_up, const at::Tensor& w_down,
    const std::optional<at::Tensor>& b_down, int64_t activation);
std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>, at::Tensor, std::optional<at::Tensor>, at::Tensor,
           std::optional<at::Tensor>>
gated_ffn_backward(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& g, const at::Tensor& u,
                   const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down, bool has_b_gate,
                   bool has_b_up, bool has_b_down, int64_t activation);

std::tuple<at::Tensor, at::Tensor> gelu_ffn_forward(const at::Tensor& x, const at::Tensor& w1,
                                                    const std::optional<at::Tensor>& b1,
                                                    const at::Tensor& w2,
                                                    const std::optional<at::Tensor>& b2,
                                                    bool tanh_approx);
std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>, at::Tensor, std::optional<at::Tensor>>
gelu_ffn_backward(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& h,
                  const at::Tensor& w1, const at::Tensor& w2, bool has_b1, bool has_b2,
                  bool tanh_approx);

}  // namespace GPTFAST_KERNELS

namespace backend = GPTFAST_KERNELS;
constexpr const char* kBackendName = GPTFAST_BACKEND_NAME;
}  // namespace gptfast
