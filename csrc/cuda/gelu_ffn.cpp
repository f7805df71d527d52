// The GPT feed-forward block on the GPU: out = GELU(x w1^T + b1) w2^T + b2, host side.
//
// Forward (x (M, K), w1 (H, K), w2 (N, H); h = x w1^T + b1 is the one (M, H) tensor saved):
//   tanh GELU, fp16/bf16: one cuBLASLt GEMM with the GELU_AUX_BIAS epilogue (GELU_AUX without b1)
//       writes a = GELU(h) as its output and h as its auxiliary output: bias and GELU never make
//       a pass of their own.
//   otherwise: cuBLASLt GEMM with the BIAS epilogue writes h, then gelu_forward_kernel (ours,
//       csrc/cuda/gelu_ffn.cu) a = GELU(h): erf for exact GELU (cuBLASLt's GELU is the tanh form
//       only), precise tanhf for fp32 tanh GELU (see below).
//   then out = a w2^T + b2 (BIAS epilogue); a is dropped.
// Backward (dout (M, N); GELU(h) is recomputed from h, never saved):
//   tanh GELU, fp16/bf16: dA = dout w2 with the DGELU_BGRAD epilogue (DGELU without b1; aux input
//       h) gives dh = dA * GELU'(h) and db1 = column sums of dh; then a = GELU(h) (our kernel).
//   otherwise: plain GEMM dA = dout w2, then gelu_backward_kernel: dh = dA * GELU'(h) in place,
//       a = GELU(h) and db1's partial column sums in one pass (deterministic, no atomics).
//   then dw2 = dout^T a, db2 = column sums of dout (our deterministic reduction), dw1 = dh^T x,
//   dx = dh w1. Temporaries: dh and a, (M, H) each.
//
// Why cuBLASLt: it is the only NVIDIA GEMM API with epilogues (bias, GELU with the pre-activation
// as an extra output, dGELU + bias gradient), which remove the separate bias/GELU/dGELU/db1 passes
// an eager PyTorch block makes; it takes the transposes and strides directly, so nn.Linear weights
// (or transposed views of Conv1D weights) are read in place. All GEMMs use CUBLAS_COMPUTE_32F:
// fp32 accumulation for fp16/bf16, and true fp32 (no TF32) for fp32 inputs, so that fp32 results
// match an fp32 reference closely. The GELU epilogues are used for fp16/bf16 only: how precisely
// cuBLASLt evaluates tanh inside them is not documented (an approximate tanh is harmless next to a
// 16-bit output's rounding, not next to fp32's), so fp32 keeps our kernels' precise tanhf.
//
// Fallbacks, never a silent wrong answer: a GELU epilogue needs H % 8 == 0 (the aux matrix's
// leading dimension) and a kernel from the heuristic (none for some dtypes); otherwise the exact
// path's structure runs with the tanh formula in our kernels. A plain or bias GEMM that cuBLASLt
// cannot take -- a dimension of size <= 1 (PyTorch's addmm avoids cuBLASLt there too: its
// heuristic can fail with INVALID_VALUE), K == 0, or no heuristic result -- goes to at::mm_out /
// at::addmm_out, which PyTorch routes to cuBLAS. Empty batches (M == 0) run no GEMM: empty
// outputs, zero weight and bias gradients.
//
// Row-major vs column-major: cuBLASLt is column-major, and a row-major (r, c) matrix with leading
// dimension ld is the column-major (c, r) matrix with the same ld. So the row-major C = A @ B is
// computed as the column-major C^T = B^T @ A^T: cuBLASLt's "A" is our B and its "B" is our A,
// with m = n(ours), n = m(ours). Then cuBLASLt's "rows of D" are our columns: the bias vector
// (length = rows of D) is indexed by our output column -- b1 (H,), b2 (N,) -- and DGELU_BGRAD's
// bias gradient (a reduction over the columns of D) is the sum over our rows: db1 = sum_i dh[i, :].
// The auxiliary matrix has D's layout: our row-major (M, H) h with leading dimension H.
#include "common/backend.h"
#include "cuda/gelu_ffn.h"
#include "cuda/host.h"
#include "cuda/lt_common.h"

#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <cublasLt.h>
#include <torch/version.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace gptfast {
namespace cuda {
namespace {

constexpr const char* kOp = "gptfast.gelu_ffn (cuda)";

// A logical (rows, cols) GEMM operand in memory: element (i, j) at ptr[i * ld + j] (transposed =
// false, row-major) or at ptr[j * ld + i] (transposed = true, e.g. w1.t() of a row-major w1).
struct Operand {
  const void* ptr;
  int64_t ld;
  bool transposed;
  at::Tensor owner;  // a contiguous copy when the strides fit neither layout
};

// Both dims of t must be > 1 (the callers route smaller shapes to ATen).
Operand operand_of(const at::Tensor& t) {
  const int64_t rows = t.size(0), cols = t.size(1);
  if (t.stride(1) == 1 && t.stride(0) >= cols) return {t.const_data_ptr(), t.stride(0), false, {}};
  if (t.stride(0) == 1 && t.stride(1) >= rows) return {t.const_data_ptr(), t.stride(1), true, {}};
  at::Tensor c = t.contiguous();
  return {c.const_data_ptr(), cols, false, c};
}

// What a GEMM's epilogue does besides the product (see cublasLtEpilogue_t).
struct Epilogue {
  cublasLtEpilogue_t kind = CUBLASLT_EPILOGUE_DEFAULT;
  at::Tensor bias;           // (n,): added (BIAS, GELU_AUX_BIAS) or written (DGELU_BGRAD); else undefined
  at::Tensor aux;            // (m, n) contiguous h: written (GELU_AUX*) or read (DGELU*); else undefined
  bool fused_gelu() const { return kind != CUBLASLT_EPILOGUE_DEFAULT && kind != CUBLASLT_EPILOGUE_BIAS; }
};

enum class LtResult { kDone, kNoKernel };

// Row-major C (m, n) = A (m, k) @ B (k, n) + epilogue on cuBLASLt, as the column-major
// C^T (n, m) = B^T (n, k) @ A^T (k, m) (see the file header). A, B: logical operands (any of the
// layouts operand_of takes); C: contiguous; m, n, k > 1.
LtResult lt_matmul(const char* gemm, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                   const Epilogue& ep) {
  const LtWhat what{kOp, gemm};
  const int64_t m = A.size(0), k = A.size(1), n = B.size(1);
  const Operand a = operand_of(A), b = operand_of(B);
  const cudaDataType_t dtype = cuda_data_type(kOp, C.scalar_type());

  MatmulDesc desc;
  check_lt(cublasLtMatmulDescCreate(&desc.handle, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate",
           what);
  // cuBLASLt's A is our B: stored as column-major (n, k) when B is row-major (use as is), or as
  // column-major (k, n) when B is transposed (transpose it). Its B is our A, likewise with (k, m).
  const int32_t trans_a = b.transposed ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int32_t trans_b = a.transposed ? CUBLAS_OP_T : CUBLAS_OP_N;
  set_attribute(desc.handle, CUBLASLT_MATMUL_DESC_TRANSA, trans_a, what);
  set_attribute(desc.handle, CUBLASLT_MATMUL_DESC_TRANSB, trans_b, what);
  set_attribute(desc.handle, CUBLASLT_MATMUL_DESC_EPILOGUE, static_cast<uint32_t>(ep.kind), what);
  if (ep.bias.defined()) {  // added (BIAS, GELU_AUX_BIAS) or written (DGELU_BGRAD)
    set_attribute(desc.handle, CUBLASLT_MATMUL_DESC_BIAS_POINTER, ep.bias.const_data_ptr(), what);
  }
  if (ep.aux.defined()) {  // written (GELU_AUX*) or read (DGELU*); D's layout: column-major (n, m)
    set_attribute(desc.handle, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, ep.aux.const_data_ptr(), what);
    set_attribute(desc.handle, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, static_cast<int64_t>(n), what);
  }

  // Layouts of the stored (column-major) matrices: type, rows, cols, ld.
  LayoutDesc a_layout, b_layout, c_layout;
  check_lt(cublasLtMatrixLayoutCreate(&a_layout.handle, dtype, b.transposed ? k : n,
                                      b.transposed ? n : k, b.ld),
           "cublasLtMatrixLayoutCreate", what);
  check_lt(cublasLtMatrixLayoutCreate(&b_layout.handle, dtype, a.transposed ? m : k,
                                      a.transposed ? k : m, a.ld),
           "cublasLtMatrixLayoutCreate", what);
  check_lt(cublasLtMatrixLayoutCreate(&c_layout.handle, dtype, n, m, n), "cublasLtMatrixLayoutCreate", what);

  const LtWorkspace workspace = lt_workspace(C.options());
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulHeuristicResult_t heuristic;
  cublasStatus_t heuristic_status;
  if (!lt_heuristic(handle, desc.handle, a_layout.handle, b_layout.handle, c_layout.handle, b.ptr, a.ptr,
                    C.const_data_ptr(), workspace, what, &heuristic, &heuristic_status)) {
    // NOT_SUPPORTED: no kernel for this epilogue/dtype/layout; INVALID_VALUE: a configuration the
    // heuristic rejects (seen by PyTorch for degenerate shapes). The caller falls back.
    if (!ep.fused_gelu()) {
      TORCH_WARN_ONCE(kOp, ": cuBLASLt found no kernel for ", gemm, " (m=", m, ", n=", n, ", k=", k,
                      ", status ", cublasLtGetStatusString(heuristic_status),
                      "); using at::mm instead (slower, same result)");
    }
    return LtResult::kNoKernel;
  }

  const float alpha = 1.f, beta = 0.f;
  void* c_ptr = C.data_ptr();
  const cublasStatus_t status =
      cublasLtMatmul(handle, desc.handle, &alpha, b.ptr, a_layout.handle, a.ptr, b_layout.handle, &beta,
                     c_ptr, c_layout.handle, c_ptr, c_layout.handle, &heuristic.algo, workspace.ptr,
                     workspace.size, current_stream());
  // NOT_SUPPORTED is decided before anything is launched: safe to fall back.
  if (status == CUBLAS_STATUS_NOT_SUPPORTED) return LtResult::kNoKernel;
  check_lt(status, "cublasLtMatmul", what);
  return LtResult::kDone;
}

// Row-major C (m, n) = A (m, k) @ B (k, n) with the epilogue `ep`; A and B may be transposed views,
// C is fresh and contiguous. Plain and bias GEMMs always complete (cuBLASLt, else ATen). A fused
// GELU epilogue returns false when cuBLASLt cannot run it, and the caller takes the unfused path.
bool matmul(const char* what, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
            const Epilogue& ep) {
  const int64_t m = A.size(0), k = A.size(1), n = B.size(1);
  TORCH_INTERNAL_ASSERT(B.size(0) == k && C.size(0) == m && C.size(1) == n && C.is_contiguous());
  if (m == 0 || n == 0) return true;  // nothing to write (callers handle empty bias gradients)
  bool lt_ok = m > 1 && n > 1 && k > 1;
  if (ep.fused_gelu()) lt_ok = lt_ok && n % 8 == 0 && ep.aux.is_contiguous();  // aux ld % 8 == 0
  if (lt_ok && lt_matmul(what, A, B, C, ep) == LtResult::kDone) return true;
  if (ep.fused_gelu()) return false;
  at::Tensor out = C;
  if (ep.kind == CUBLASLT_EPILOGUE_BIAS) {
    at::addmm_out(out, ep.bias, A, B);
  } else {
    at::mm_out(out, A, B);
  }
  return true;
}

// Whether the cuBLASLt GELU / dGELU epilogues may be tried (see the file header).
bool lt_gelu_epilogues(const at::Tensor& x, bool tanh_approx) {
  return tanh_approx && x.scalar_type() != at::kFloat;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gelu_ffn_forward(const at::Tensor& x, const at::Tensor& w1,
                                                    const std::optional<at::Tensor>& b1,
                                                    const at::Tensor& w2,
                                                    const std::optional<at::Tensor>& b2,
                                                    bool tanh_approx) {
  check_dtype_and_device(kOp, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), H = w1.size(0), N = w2.size(0);
  const auto opts = x.options();
  at::Tensor h = at::empty({M, H}, opts);    // (M, H) pre-activation, saved for backward
  at::Tensor out = at::empty({M, N}, opts);  // (M, N)
  if (M == 0) return {out, h};

  const at::Tensor xc = x.contiguous();
  at::Tensor a = at::empty({M, H}, opts);  // (M, H) GELU(h), dropped after the second GEMM
  Epilogue first;
  first.bias = b1.has_value() ? b1->contiguous() : at::Tensor();  // cuBLASLt wants a packed vector
  bool fused = false;
  if (lt_gelu_epilogues(x, tanh_approx)) {
    first.kind = b1.has_value() ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
    first.aux = h;
    fused = matmul("GELU(x @ w1^T + b1) [GELU_AUX epilogue]", xc, w1.t(), a, first);
  }
  if (!fused) {
    first.kind = b1.has_value() ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
    first.aux = at::Tensor();
    matmul("h = x @ w1^T + b1", xc, w1.t(), h, first);
    GeluForwardParams params{h.const_data_ptr(), a.data_ptr(), M * H, dtype_code(x), tanh_approx};
    GPTFAST_CUDA_LAUNCH_CHECK(gelu_forward(params, current_stream()));
  }

  Epilogue second;
  second.kind = b2.has_value() ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  second.bias = b2.has_value() ? b2->contiguous() : at::Tensor();
  matmul("out = GELU(h) @ w2^T + b2", a, w2.t(), out, second);
  return {out, h};
}

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>, at::Tensor, std::optional<at::Tensor>>
gelu_ffn_backward(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& h,
                  const at::Tensor& w1, const at::Tensor& w2, bool has_b1, bool has_b2,
                  bool tanh_approx) {
  check_dtype_and_device(kOp, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), H = w1.size(0), N = w2.size(0);
  const auto opts = x.options();
  if (M == 0) {  // empty batch: the weight and bias gradients are empty sums
    std::optional<at::Tensor> db1, db2;
    if (has_b1) db1 = at::zeros({H}, opts);
    if (has_b2) db2 = at::zeros({N}, opts);
    return {at::empty({0, K}, opts), at::zeros({H, K}, opts), db1, at::zeros({N, H}, opts), db2};
  }

  const at::Tensor xc = x.contiguous(), hc = h.contiguous(), doutc = dout.contiguous();
  const DType dtype = dtype_code(x);
  const cudaStream_t stream = current_stream();
  at::Tensor dx = at::empty({M, K}, opts);
  at::Tensor dw1 = at::empty({H, K}, opts);
  at::Tensor dw2 = at::empty({N, H}, opts);
  std::optional<at::Tensor> db1, db2;
  if (has_b1) db1 = at::empty({H}, opts);
  if (has_b2) db2 = at::empty({N}, opts);

  at::Tensor dh = at::empty({M, H}, opts);  // dA, then dh
  at::Tensor a = at::empty({M, H}, opts);   // GELU(h), recomputed
  bool fused = false;
  if (lt_gelu_epilogues(x, tanh_approx)) {
    Epilogue ep;
    ep.kind = has_b1 ? CUBLASLT_EPILOGUE_DGELU_BGRAD : CUBLASLT_EPILOGUE_DGELU;
    ep.bias = has_b1 ? *db1 : at::Tensor();
    ep.aux = hc;
    fused = matmul("dh = (dout @ w2) * GELU'(h) [DGELU epilogue]", doutc, w2, dh, ep);
    if (fused) {
      GeluForwardParams params{hc.const_data_ptr(), a.data_ptr(), M * H, dtype, true};
      GPTFAST_CUDA_LAUNCH_CHECK(gelu_forward(params, stream));
    }
  }
  if (!fused) {
    matmul("dA = dout @ w2", doutc, w2, dh, Epilogue{});
    at::Tensor workspace;
    if (has_b1) workspace = at::empty({column_sum_workspace_floats(M, H)}, opts.dtype(at::kFloat));
    GeluBackwardParams params{hc.const_data_ptr(), dh.data_ptr(), a.data_ptr(),
                              has_b1 ? db1->data_ptr() : nullptr,
                              has_b1 ? workspace.data_ptr<float>() : nullptr,
                              M, H, dtype, tanh_approx};
    GPTFAST_CUDA_LAUNCH_CHECK(gelu_backward(params, stream));
  }

  matmul("dw2 = dout^T @ GELU(h)", doutc.t(), a, dw2, Epilogue{});
  a.reset();  // free (M, H) before the next GEMMs
  if (has_b2) {
    at::Tensor workspace = at::empty({column_sum_workspace_floats(M, N)}, opts.dtype(at::kFloat));
    ColumnSumParams params{doutc.const_data_ptr(), db2->data_ptr(), workspace.data_ptr<float>(), M, N, dtype};
    GPTFAST_CUDA_LAUNCH_CHECK(column_sum(params, stream));
  }
  matmul("dw1 = dh^T @ x", dh.t(), xc, dw1, Epilogue{});
  matmul("dx = dh @ w1", dh, w1, dx, Epilogue{});
  return {dx, dw1, db1, dw2, db2};
}

}  // namespace cuda
}  // namespace gptfast
