// The gptfast native extension: one pybind11 module binding the launchers of every op.
// Argument checks live in csrc/<op>.cpp, kernels in csrc/cpu/ or csrc/cuda/: the file is compiled
// once per backend (common/backend.h). Errors raised with TORCH_CHECK_* arrive in Python as
// TypeError / ValueError / RuntimeError.
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>

#include "common/backend.h"
#ifdef GPTFAST_CUDA
#include "cuda/attention.h"
#else
#include "common/blas.h"
#endif

namespace gptfast {
std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, bool, double, int64_t,
                                                     int64_t, double,
                                                     const std::optional<at::Tensor>&, double,
                                                     const std::optional<at::Tensor>&,
                                                     const std::optional<at::Tensor>&,
                                                     const std::optional<at::Tensor>&);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, bool, double, bool, int64_t, int64_t, double,
    const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> layer_norm_forward(
    const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
    const std::optional<at::Tensor>&);
std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> layer_norm_backward(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
    const at::Tensor&, bool, const std::optional<at::Tensor>&);
std::tuple<at::Tensor, at::Tensor> gelu_ffn_forward(const at::Tensor&, const at::Tensor&,
                                                    const std::optional<at::Tensor>&,
                                                    const at::Tensor&,
                                                    const std::optional<at::Tensor>&,
                                                    const std::string&);
std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>, at::Tensor, std::optional<at::Tensor>>
gelu_ffn_backward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                  const at::Tensor&, bool, bool, const std::string&);
std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> rms_norm_forward(
    const at::Tensor&, const std::optional<at::Tensor>&, double, double, const std::optional<at::Tensor>&);
std::tuple<at::Tensor, std::optional<at::Tensor>> rms_norm_backward(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, double,
    const std::optional<at::Tensor>&);
at::Tensor cross_entropy_logits_(at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
                                 double, double);
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_ffn_forward(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
    const std::optional<at::Tensor>&, const at::Tensor&, const std::optional<at::Tensor>&, const std::string&);
std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>, at::Tensor, std::optional<at::Tensor>, at::Tensor,
           std::optional<at::Tensor>>
gated_ffn_backward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                   const at::Tensor&, const at::Tensor&, bool, bool, bool, const std::string&);
#ifndef GPTFAST_CUDA
namespace cpu {  // csrc/cpu/kvcache.cpp (no cuda kernel: the cuda build binds no kvcache_forward)
std::tuple<at::Tensor, at::Tensor> kvcache_forward(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const std::optional<at::Tensor>&,
                                                   const std::optional<at::Tensor>&, const at::Tensor&,
                                                   const at::Tensor&, double, int64_t, int64_t, double,
                                                   const std::optional<at::Tensor>&, int64_t);
}  // namespace cpu
#endif
}  // namespace gptfast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "gptfast native kernels; see gptfast/ops/_backend.py for the contract";
  m.attr("backend") = gptfast::kBackendName;
  m.def("attention_forward", &gptfast::attention_forward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("causal"), py::arg("softmax_scale"), py::arg("window_left") = -1,
        py::arg("window_right") = -1, py::arg("softcap") = 0.0, py::arg("alibi_slopes") = py::none(),
        py::arg("dropout_p") = 0.0, py::arg("rng_state") = py::none(),
        py::arg("cu_seqlens_q") = py::none(), py::arg("cu_seqlens_k") = py::none(),
        "FlashAttention-2 forward: (out (B,Tq,H,D), lse (B,H,Tq) fp32); k, v (B,Tk,Hk,D); with "
        "cu_seqlens: packed q (total_q,H,D), k, v (total_k,Hk,D) -> (out (total_q,H,D), lse (H,total_q))");
  m.def("attention_backward", &gptfast::attention_backward, py::arg("dout"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("causal"),
        py::arg("softmax_scale"), py::arg("deterministic") = false, py::arg("window_left") = -1,
        py::arg("window_right") = -1, py::arg("softcap") = 0.0, py::arg("alibi_slopes") = py::none(),
        py::arg("dropout_p") = 0.0, py::arg("rng_state") = py::none(),
        py::arg("cu_seqlens_q") = py::none(), py::arg("cu_seqlens_k") = py::none(),
        "FlashAttention-2 backward: (dq, dk, dv); deterministic avoids atomics where a backend uses them");
  // A 3-tuple without a residual (the launcher returns it as it comes), a 4-tuple with one.
  m.def(
      "layer_norm_forward",
      [](const at::Tensor& x, const std::optional<at::Tensor>& weight,
         const std::optional<at::Tensor>& bias, double eps,
         const std::optional<at::Tensor>& residual) -> py::tuple {
        auto [y, mean, rstd, s] = gptfast::layer_norm_forward(x, weight, bias, eps, residual);
        if (s.has_value()) return py::make_tuple(y, mean, rstd, *s);
        return py::make_tuple(y, mean, rstd);
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"),
      py::arg("residual") = py::none(),
      "LayerNorm forward: (y, mean, rstd); with residual, of s = x + residual: (y, mean, rstd, s)");
  m.def("layer_norm_backward", &gptfast::layer_norm_backward, py::arg("dy"), py::arg("x"),
        py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("has_bias"),
        py::arg("dresidual") = py::none(),
        "LayerNorm backward: (dx, dweight or None, dbias or None); with dresidual, dx + dresidual");
  m.def("gelu_ffn_forward", &gptfast::gelu_ffn_forward, py::arg("x"), py::arg("w1"), py::arg("b1"),
        py::arg("w2"), py::arg("b2"), py::arg("approximate"), "GELU-FFN forward: (out, h)");
  m.def("gelu_ffn_backward", &gptfast::gelu_ffn_backward, py::arg("dout"), py::arg("x"),
        py::arg("h"), py::arg("w1"), py::arg("w2"), py::arg("has_b1"), py::arg("has_b2"),
        py::arg("approximate"), "GELU-FFN backward: (dx, dw1, db1, dw2, db2)");
#ifdef GPTFAST_CUDA
  m.def("attention_smem_bytes", &gptfast::cuda::attention_smem_bytes, py::arg("head_dim"),
        py::arg("kernel"), "Dynamic shared memory (bytes) for a head dim of kernel 0 (forward), "
        "1 (dK/dV) or 2 (deterministic dQ)");
#else
  m.def("kvcache_forward", &gptfast::cpu::kvcache_forward, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("block_table"), py::arg("cache_batch_idx"), py::arg("key_start"),
        py::arg("key_end"), py::arg("softmax_scale"), py::arg("window_left"), py::arg("window_right"),
        py::arg("softcap"), py::arg("alibi_slopes"), py::arg("num_splits"),
        "Split-K KV-cache decoding: (out (B,Tq,H,D), lse (B,H,Tq) fp32); the cache read in place "
        "(contiguous rows or block_table pages), keys key_start[b] .. key_end[b] - 1 of sequence b");
#endif
  // As layer_norm_forward: a 2-tuple without a residual, a 3-tuple with one.
  m.def(
      "rms_norm_forward",
      [](const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps, double offset,
         const std::optional<at::Tensor>& residual) -> py::tuple {
        auto [y, rstd, s] = gptfast::rms_norm_forward(x, weight, eps, offset, residual);
        if (s.has_value()) return py::make_tuple(y, rstd, *s);
        return py::make_tuple(y, rstd);
      },
      py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("offset") = 0.0,
      py::arg("residual") = py::none(),
      "RMSNorm forward: (y, rstd); with residual, of s = x + residual: (y, rstd, s)");
  m.def("rms_norm_backward", &gptfast::rms_norm_backward, py::arg("dy"), py::arg("x"), py::arg("weight"),
        py::arg("rstd"), py::arg("offset") = 0.0, py::arg("dresidual") = py::none(),
        "RMSNorm backward: (dx, dweight or None); with dresidual, dx + dresidual");
  m.def("cross_entropy_logits_", &gptfast::cross_entropy_logits_, py::arg("z"), py::arg("targets"),
        py::arg("row_scale"), py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("softcap"),
        "linear_cross_entropy's logits epilogue: the row losses (C,); z (C, V) becomes the gradient of "
        "sum(row_scale * losses) in place when row_scale is given");
  m.def("gated_ffn_forward", &gptfast::gated_ffn_forward, py::arg("x"), py::arg("w_gate"), py::arg("b_gate"),
        py::arg("w_up"), py::arg("b_up"), py::arg("w_down"), py::arg("b_down"), py::arg("activation"),
        "Gated FFN (SwiGLU / GeGLU) forward: (out, g, u)");
  m.def("gated_ffn_backward", &gptfast::gated_ffn_backward, py::arg("dout"), py::arg("x"), py::arg("g"),
        py::arg("u"), py::arg("w_gate"), py::arg("w_up"), py::arg("w_down"), py::arg("has_b_gate"),
        py::arg("has_b_up"), py::arg("has_b_down"), py::arg("activation"),
        "Gated FFN backward: (dx, dw_gate, db_gate, dw_up, db_up, dw_down, db_down)");
#ifndef GPTFAST_CUDA
  m.def("blas_source", [] { return gptfast::blas::get().source; },
        "Where the attention tiles' GEMMs come from (BLAS symbol or built-in loops)");
#endif
}
