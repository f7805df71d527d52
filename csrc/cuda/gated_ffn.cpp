// The gated feed-forward block on the GPU (SwiGLU / GeGLU), host side:
//   out = (act(x w_gate^T + b_gate) * (x w_up^T + b_up)) w_down^T + b_down
//
// What runs is the plan in csrc/cuda/gated_ffn.h (shared with the CPU emulation, which checks it):
// forward: g and u as two cuBLASLt GEMMs with the BIAS epilogue, a = act(g) * u (our kernel,
// csrc/cuda/gated_ffn.cu), out = a w_down^T + b_down (BIAS epilogue); g and u are returned (saved),
// a is dropped. Backward: da = dout w_down written straight into the first half of a (M, 2H)
// buffer, our kernel turns it into [dg du] (and recomputes a, and sums db_gate / db_up), then
// dw_down = dout^T a, db_down (gelu_ffn.h's deterministic column_sum), [dw_gate; dw_up] = [dg du]^T x
// as one GEMM into a (2H, K) buffer whose two halves are returned, and dx = dg w_gate + du w_up: one
// GEMM over 2H when w_up continues w_gate's storage (a fused gate_up weight split by the op), else
// two, the second accumulating (beta = 1). Temporaries: [dg du] (M, 2H) and a (M, H).
//
// cuBLASLt as in csrc/cuda/gelu_ffn.cpp (see its header: row-major C = A B as the column-major
// C^T = B^T A^T, CUBLAS_COMPUTE_32F -- fp32 accumulation, no TF32 --, PyTorch's workspace, the
// operands' real alignments, ATen fallback for dimensions <= 1, K == 0 or no heuristic result).
// The argument checks of the launchers bound in csrc/bindings.cpp are at the end of this file.
#include "common/backend.h"
#include "cuda/gated_ffn.h"
#include "cuda/gelu_ffn.h"
#include "cuda/host.h"
#include "cuda/lt_common.h"

#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
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

constexpr const char* kOp = "gptfast.gated_ffn (cuda)";

// cuBLASLt's view of a row-major operand: stored column-major as (cols, rows) with ld, used as
// is; a transposed one is stored as (rows, cols) column-major and used transposed.
void operand_layout(LayoutDesc& layout, cudaDataType_t dtype, const GemmOperand& op, const LtWhat& what) {
  const int64_t stored_rows = op.transposed ? op.rows : op.cols;
  const int64_t stored_cols = op.transposed ? op.cols : op.rows;
  check_lt(cublasLtMatrixLayoutCreate(&layout.handle, dtype, stored_rows, stored_cols, op.ld),
           "cublasLtMatrixLayoutCreate", what);
}

// The Gemm on cuBLASLt as the column-major C^T (n, m) = B^T (n, k) A^T (k, m): cuBLASLt's A is our
// B, its B our A. false when no kernel was found or NOT_SUPPORTED (nothing launched).
bool lt_matmul(const Gemm& gemm, at::ScalarType scalar_type) {
  const LtWhat what{kOp, gemm.what};
  const int64_t m = gemm.m(), n = gemm.n();
  const cudaDataType_t dtype = cuda_data_type(kOp, scalar_type);
  MatmulDesc desc;
  check_lt(cublasLtMatmulDescCreate(&desc.handle, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate",
           what);
  const int32_t trans_a = gemm.b.transposed ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int32_t trans_b = gemm.a.transposed ? CUBLAS_OP_T : CUBLAS_OP_N;
  set_attribute(desc.handle, CUBLASLT_MATMUL_DESC_TRANSA, trans_a, what);
  set_attribute(desc.handle, CUBLASLT_MATMUL_DESC_TRANSB, trans_b, what);
  const cublasLtEpilogue_t epilogue = gemm.bias != nullptr ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  set_attribute(desc.handle, CUBLASLT_MATMUL_DESC_EPILOGUE, static_cast<uint32_t>(epilogue), what);
  if (gemm.bias != nullptr) set_attribute(desc.handle, CUBLASLT_MATMUL_DESC_BIAS_POINTER, gemm.bias, what);

  LayoutDesc a_layout, b_layout, c_layout;
  operand_layout(a_layout, dtype, gemm.b, what);
  operand_layout(b_layout, dtype, gemm.a, what);
  check_lt(cublasLtMatrixLayoutCreate(&c_layout.handle, dtype, n, m, gemm.ldc), "cublasLtMatrixLayoutCreate", what);

  const LtWorkspace workspace = lt_workspace(at::TensorOptions().device(at::kCUDA));
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulHeuristicResult_t heuristic;
  cublasStatus_t heuristic_status;
  if (!lt_heuristic(handle, desc.handle, a_layout.handle, b_layout.handle, c_layout.handle, gemm.b.ptr, gemm.a.ptr,
                    gemm.c, workspace, what, &heuristic, &heuristic_status)) {
    TORCH_WARN_ONCE(kOp, ": cuBLASLt found no kernel for ", gemm.what, " (m=", m, ", n=", n, ", k=", gemm.k(),
                    ", status ", cublasLtGetStatusString(heuristic_status),
                    "); using at::mm instead (slower, same result)");
    return false;
  }
  const float alpha = 1.f, beta = gemm.accumulate ? 1.f : 0.f;
  const cublasStatus_t status =
      cublasLtMatmul(handle, desc.handle, &alpha, gemm.b.ptr, a_layout.handle, gemm.a.ptr, b_layout.handle, &beta,
                     gemm.c, c_layout.handle, gemm.c, c_layout.handle, &heuristic.algo, workspace.ptr, workspace.size,
                     current_stream());
  if (status == CUBLAS_STATUS_NOT_SUPPORTED) return false;  // decided before any launch
  check_lt(status, "cublasLtMatmul", what);
  return true;
}

at::Tensor view_of(const GemmOperand& op, const at::TensorOptions& opts) {
  const int64_t strides[2] = {op.transposed ? 1 : op.ld, op.transposed ? op.ld : 1};
  return at::from_blob(const_cast<void*>(op.ptr), {op.rows, op.cols}, strides, opts);
}

// One GEMM of the plan: cuBLASLt when every dimension is > 1, else (or without a kernel) ATen.
void run(const Gemm& gemm, const at::TensorOptions& opts) {
  const int64_t m = gemm.m(), n = gemm.n(), k = gemm.k();
  TORCH_INTERNAL_ASSERT(gemm.a.ok && gemm.b.ok && gemm.b.rows == k, kOp, ": bad GEMM operands for ", gemm.what);
  if (m == 0 || n == 0) return;
  if (m > 1 && n > 1 && k > 1 && lt_matmul(gemm, opts.dtype().toScalarType())) return;
  at::Tensor c = at::from_blob(gemm.c, {m, n}, {gemm.ldc, 1}, opts);
  const at::Tensor a = view_of(gemm.a, opts), b = view_of(gemm.b, opts);
  if (gemm.accumulate) {
    c.addmm_(a, b);
  } else if (gemm.bias != nullptr) {
    const at::Tensor bias = at::from_blob(const_cast<void*>(gemm.bias), {n}, opts);
    c.copy_(at::addmm(bias, a, b));
  } else {
    c.copy_(at::mm(a, b));
  }
}

// A weight as the plan takes it, copied when its strides fit neither GEMM layout.
struct Weight {
  at::Tensor t;
  Strided s;
};
Weight weight_of(const at::Tensor& w) {
  at::Tensor t = w;  // (a layout that fits, fits transposed too)
  if (!gemm_operand({t.const_data_ptr(), t.size(0), t.size(1), t.stride(0), t.stride(1)}).ok) t = w.contiguous();
  return {t, {t.const_data_ptr(), t.size(0), t.size(1), t.stride(0), t.stride(1)}};
}

GatedActivation activation_of(int64_t activation) {
  TORCH_CHECK_VALUE(activation >= 0 && activation <= 2, kOp, ": activation code must be 0 (silu), 1 (gelu_tanh) "
                    "or 2 (gelu), got ", activation);
  return static_cast<GatedActivation>(activation);
}

// cuBLASLt's bias epilogue takes a packed vector, and its alignment cannot be declared as the
// operands' is: a 16-byte-aligned copy of a bias that is not (b_up split off a fused (2H,) bias
// of odd H), H elements.
at::Tensor bias_of(const at::Tensor& b) {
  at::Tensor c = b.contiguous();
  return alignment_of(c.const_data_ptr()) >= 16 ? c : c.clone();
}

const void* ptr_or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? t->const_data_ptr() : nullptr; }

}  // namespace

// The kernels' entry points: backend::gated_ffn_* (csrc/common/backend.h), activation 0 SiLU,
// 1 GELU tanh, 2 GELU erf (GatedActivation), inputs checked by the caller except what only the
// cuda backend refuses (float64, non-CUDA tensors).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_ffn_forward(
    const at::Tensor& x, const at::Tensor& w_gate, const std::optional<at::Tensor>& b_gate, const at::Tensor& w_up,
    const std::optional<at::Tensor>& b_up, const at::Tensor& w_down, const std::optional<at::Tensor>& b_down,
    int64_t activation) {
  const GatedActivation act = activation_of(activation);
  check_dtype_and_device(kOp, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), H = w_gate.size(0), N = w_down.size(0);
  const auto opts = x.options();
  at::Tensor g = at::empty({M, H}, opts), u = at::empty({M, H}, opts), out = at::empty({M, N}, opts);
  if (M == 0) return {out, g, u};
  const at::Tensor xc = x.contiguous();
  const Weight wg = weight_of(w_gate), wu = weight_of(w_up), wd = weight_of(w_down);
  std::optional<at::Tensor> bg, bu, bd;
  if (b_gate) bg = bias_of(*b_gate);
  if (b_up) bu = bias_of(*b_up);
  if (b_down) bd = bias_of(*b_down);
  at::Tensor a = at::empty({M, H}, opts);  // act(g) * u, dropped after the down GEMM
  const GatedForwardPlan plan =
      gated_forward_plan(xc.const_data_ptr(), M, K, wg.s, ptr_or_null(bg), wu.s, ptr_or_null(bu), wd.s,
                         ptr_or_null(bd), g.data_ptr(), u.data_ptr(), a.data_ptr(), out.data_ptr(), dtype_code(x), act);
  run(plan.gate, opts);
  run(plan.up, opts);
  GPTFAST_CUDA_LAUNCH_CHECK(gated_forward(plan.act, current_stream()));
  run(plan.down, opts);
  return {out, g, u};
}

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>, at::Tensor, std::optional<at::Tensor>, at::Tensor,
           std::optional<at::Tensor>>
gated_ffn_backward(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& g, const at::Tensor& u,
                   const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down, bool has_b_gate,
                   bool has_b_up, bool has_b_down, int64_t activation) {
  const GatedActivation act = activation_of(activation);
  check_dtype_and_device(kOp, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), H = w_gate.size(0), N = w_down.size(0);
  const auto opts = x.options();
  std::optional<at::Tensor> db_gate, db_up, db_down;
  if (M == 0) {  // empty batch: the weight and bias gradients are empty sums
    if (has_b_gate) db_gate = at::zeros({H}, opts);
    if (has_b_up) db_up = at::zeros({H}, opts);
    if (has_b_down) db_down = at::zeros({N}, opts);
    return {at::empty({0, K}, opts), at::zeros({H, K}, opts), db_gate, at::zeros({H, K}, opts), db_up,
            at::zeros({N, H}, opts), db_down};
  }
  const at::Tensor xc = x.contiguous(), gc = g.contiguous(), uc = u.contiguous(), doutc = dout.contiguous();
  const Weight wg = weight_of(w_gate), wu = weight_of(w_up), wd = weight_of(w_down);
  const DType dtype = dtype_code(x);
  const cudaStream_t stream = current_stream();

  at::Tensor dx = at::empty({M, K}, opts);
  at::Tensor dw_gate = at::empty({H, K}, opts), dw_up = at::empty({H, K}, opts);
  at::Tensor dw_down = at::empty({N, H}, opts);
  at::Tensor dgu = at::empty({M, 2 * H}, opts);  // [da | -], then [dg | du]
  at::Tensor a = at::empty({M, H}, opts);        // act(g) * u, recomputed
  at::Tensor db_gate_up, workspace;
  if (has_b_gate || has_b_up) {
    db_gate_up = at::empty({2 * H}, opts);
    workspace = at::empty({gated_backward_workspace_floats(M, H)}, opts.dtype(at::kFloat));
  }
  if (has_b_down) db_down = at::empty({N}, opts);
  const GatedBackwardPlan plan = gated_backward_plan(
      doutc.const_data_ptr(), xc.const_data_ptr(), gc.const_data_ptr(), uc.const_data_ptr(), M, K, wg.s, wu.s, wd.s,
      dgu.data_ptr(), a.data_ptr(), dw_gate.data_ptr(), dw_up.data_ptr(), db_gate_up.defined() ? db_gate_up.data_ptr() : nullptr,
      workspace.defined() ? workspace.data_ptr<float>() : nullptr, dw_down.data_ptr(),
      db_down ? db_down->data_ptr() : nullptr, dx.data_ptr(), dtype, act);

  run(plan.da, opts);
  GPTFAST_CUDA_LAUNCH_CHECK(gated_backward(plan.act, stream));
  run(plan.dw_down, opts);
  a.reset();  // free (M, H) before the next GEMMs
  if (plan.db_down != nullptr) {
    at::Tensor ws = at::empty({column_sum_workspace_floats(M, N)}, opts.dtype(at::kFloat));
    ColumnSumParams params{plan.dout, plan.db_down, ws.data_ptr<float>(), M, N, dtype};
    GPTFAST_CUDA_LAUNCH_CHECK(column_sum(params, stream));
  }
  run(plan.dw_gate, opts);
  run(plan.dw_up, opts);
  run(plan.dx_gate, opts);
  if (!plan.dx_fused) run(plan.dx_up, opts);

  // fresh tensors, not two views of one buffer: custom-op outputs may not alias each other
  if (has_b_gate) db_gate = db_gate_up.slice(0, 0, H).clone();
  if (has_b_up) db_up = db_gate_up.slice(0, H, 2 * H).clone();
  return {dx, dw_gate, db_gate, dw_up, db_up, dw_down, db_down};
}

}  // namespace cuda
}  // namespace gptfast
