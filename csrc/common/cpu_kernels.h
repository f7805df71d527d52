// Entry points of the CPU kernels (csrc/cpu/*.cpp). Inputs are validated by csrc/<op>.cpp;
// signatures and return values follow the launcher contract in gptfast/ops/_backend.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace gptfast {
namespace cpu {

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v, bool causal, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double scale,
    bool deterministic);  // ignored: the cpu backward is always deterministic (no atomics)

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps);
std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> layer_norm_backward(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, bool has_bias);

std::tuple<at::Tensor, at::Tensor> gelu_ffn_forward(const at::Tensor& x, const at::Tensor& w1,
                                                    const std::optional<at::Tensor>& b1,
                                                    const at::Tensor& w2,
                                                    const std::optional<at::Tensor>& b2,
                                                    bool tanh_approx);
std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>, at::Tensor, std::optional<at::Tensor>>
gelu_ffn_backward(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& h,
                  const at::Tensor& w1, const at::Tensor& w2, bool has_b1, bool has_b2,
                  bool tanh_approx);

}  // namespace cpu
}  // namespace gptfast
