// ctypes entry points of the emulated csrc/cuda/gated_ffn.cu (built by tests/test_cuda_emulated.py
// from the rewritten copy, see rewrite.py). Besides the two element-wise kernels on their own, the
// whole block as csrc/cuda/gated_ffn.cpp runs it: the plan from gated_ffn.h's gated_forward_plan /
// gated_backward_plan (the same function the host code calls), its GEMMs by a CPU loop with
// cuBLASLt's semantics for a plan entry (row-major C = A B as described by the operands' pointer,
// leading dimension and transposition; fp32 accumulation; + bias; + C when accumulating; rounded
// once), its kernels emulated. So the host code's operand bookkeeping -- which buffer, which
// transposition, which leading dimension and offset, the fused [w_gate; w_up] detection, the
// accumulating second dx GEMM -- is checked, and every element a GEMM reads or writes must lie in a
// buffer the test registered. db_down (gelu_ffn.h's column_sum, emulated in gelu_ffn's own tests)
// is a CPU fp32 column sum here. dtype: 0 fp32, 1 fp16, 2 bf16; act: 0 silu, 1 gelu_tanh, 2 gelu.
#include "gated_ffn.cu"

#include <vector>

using namespace gptfast::cuda;

namespace {

float load(const void* p, int64_t i, DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<const float*>(p)[i];
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    default: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
}

void store(void* p, int64_t i, float v, DType dtype) {
  switch (dtype) {
    case DType::kFloat32: static_cast<float*>(p)[i] = v; break;
    case DType::kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    default: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
  }
}

int64_t offset(const GemmOperand& op, int64_t i, int64_t j) { return op.transposed ? j * op.ld + i : i * op.ld + j; }

bool in_bounds(const void* base, int64_t i, int64_t esize, const char* what, const char* operand) {
  if (emu_in_global(static_cast<const char*>(base) + i * esize, esize)) return true;
  g_report.add(emu_fmt("[GEMM %s] OUT OF BOUNDS %s element (offset %ld)", what, operand, static_cast<long>(i)));
  return false;
}

// One plan GEMM as cuBLASLt computes it: D = A B (+ bias) (+ C), fp32 accumulation (exact products
// summed in double here: the tensor cores' order is not modelled), rounded once.
bool run_gemm(const Gemm& g, DType dtype) {
  const int64_t m = g.m(), n = g.n(), k = g.k(), es = dtype_size(dtype);
  if (!g.a.ok || !g.b.ok || g.b.rows != k) {
    g_report.add(emu_fmt("[GEMM %s] bad operands", g.what));
    return false;
  }
  if (m == 0 || n == 0) return true;
  bool ok = true;
  for (int64_t i = 0; i < m && ok; ++i)
    for (int64_t p = 0; p < k && ok; ++p) ok = in_bounds(g.a.ptr, offset(g.a, i, p), es, g.what, "A");
  for (int64_t p = 0; p < k && ok; ++p)
    for (int64_t j = 0; j < n && ok; ++j) ok = in_bounds(g.b.ptr, offset(g.b, p, j), es, g.what, "B");
  for (int64_t i = 0; i < m && ok; ++i)
    for (int64_t j = 0; j < n && ok; ++j) ok = in_bounds(g.c, i * g.ldc + j, es, g.what, "C");
  for (int64_t j = 0; j < n && ok && g.bias != nullptr; ++j) ok = in_bounds(g.bias, j, es, g.what, "bias");
  if (!ok) return false;
  std::vector<float> a(m * k), b(k * n);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t p = 0; p < k; ++p) a[i * k + p] = load(g.a.ptr, offset(g.a, i, p), dtype);
  for (int64_t p = 0; p < k; ++p)
    for (int64_t j = 0; j < n; ++j) b[p * n + j] = load(g.b.ptr, offset(g.b, p, j), dtype);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0.0;
      for (int64_t p = 0; p < k; ++p) acc += static_cast<double>(a[i * k + p]) * b[p * n + j];
      float v = static_cast<float>(acc);
      if (g.bias != nullptr) v += load(g.bias, j, dtype);
      if (g.accumulate) v += load(g.c, i * g.ldc + j, dtype);
      store(g.c, i * g.ldc + j, v, dtype);
    }
  return true;
}

Strided strided(const void* p, int64_t rows, int64_t cols, int64_t s0, int64_t s1) { return {p, rows, cols, s0, s1}; }

}  // namespace

EMU_API int emu_gated_forward(const void* g, const void* u, void* a, int64_t numel, int dtype, int act) {
  GatedForwardParams p{g, u, a, numel, static_cast<DType>(dtype), static_cast<GatedActivation>(act)};
  return gated_forward(p, nullptr);
}

EMU_API int emu_gated_backward(const void* g, const void* u, void* dgu, void* a, void* dbias, float* workspace,
                               int64_t rows, int64_t cols, int dtype, int act) {
  GatedBackwardParams p{g, u, dgu, a, dbias, workspace, rows, cols, static_cast<DType>(dtype),
                        static_cast<GatedActivation>(act)};
  return gated_backward(p, nullptr);
}

EMU_API void emu_gated_chunks(int64_t rows, int64_t* rows_per_chunk, int64_t* count) {
  const ColumnChunks c = column_chunks(rows);
  *rows_per_chunk = c.rows_per_chunk, *count = c.count;
}

// w (ptr, s0, s1): the weights' element strides. Returns 0, -1 for a GEMM finding (see emu_report),
// or the kernel's cudaError.
EMU_API int emu_gated_ffn_forward(const void* x, int64_t M, int64_t K, int64_t H, int64_t N, const void* wg,
                                  int64_t wg_s0, int64_t wg_s1, const void* bg, const void* wu, int64_t wu_s0,
                                  int64_t wu_s1, const void* bu, const void* wd, int64_t wd_s0, int64_t wd_s1,
                                  const void* bd, void* g, void* u, void* a, void* out, int dtype, int act) {
  const DType dt = static_cast<DType>(dtype);
  const GatedForwardPlan plan =
      gated_forward_plan(x, M, K, strided(wg, H, K, wg_s0, wg_s1), bg, strided(wu, H, K, wu_s0, wu_s1), bu,
                         strided(wd, N, H, wd_s0, wd_s1), bd, g, u, a, out, dt, static_cast<GatedActivation>(act));
  if (M == 0) return 0;  // as the host code: nothing runs
  if (!run_gemm(plan.gate, dt) || !run_gemm(plan.up, dt)) return -1;
  if (const int rc = gated_forward(plan.act, nullptr)) return rc;
  return run_gemm(plan.down, dt) ? 0 : -1;
}

// dx_fused (out): whether the plan took the one-GEMM dx over [w_gate; w_up]. dw_gate_up (2H, K):
// the plan's dw_gate and dw_up outputs are its two halves.
EMU_API int emu_gated_ffn_backward(const void* dout, const void* x, const void* g, const void* u, int64_t M,
                                   int64_t K, int64_t H, int64_t N, const void* wg, int64_t wg_s0, int64_t wg_s1,
                                   const void* wu, int64_t wu_s0, int64_t wu_s1, const void* wd, int64_t wd_s0,
                                   int64_t wd_s1, void* dgu, void* a, void* dw_gate_up, void* dbias_gate_up,
                                   float* workspace, void* dw_down, void* db_down, void* dx, int dtype, int act,
                                   int* dx_fused) {
  const DType dt = static_cast<DType>(dtype);
  const GatedBackwardPlan plan = gated_backward_plan(
      dout, x, g, u, M, K, strided(wg, H, K, wg_s0, wg_s1), strided(wu, H, K, wu_s0, wu_s1),
      strided(wd, N, H, wd_s0, wd_s1), dgu, a, dw_gate_up,
      static_cast<char*>(dw_gate_up) + H * K * dtype_size(dt), dbias_gate_up, workspace, dw_down, db_down, dx, dt,
      static_cast<GatedActivation>(act));
  *dx_fused = plan.dx_fused ? 1 : 0;
  if (!run_gemm(plan.da, dt)) return -1;
  if (const int rc = gated_backward(plan.act, nullptr)) return rc;
  if (!run_gemm(plan.dw_down, dt)) return -1;
  if (plan.db_down != nullptr) {
    for (int64_t j = 0; j < N; ++j) {
      float s = 0.f;
      for (int64_t i = 0; i < M; ++i) s += load(plan.dout, i * N + j, dt);
      store(plan.db_down, j, s, dt);
    }
  }
  if (!run_gemm(plan.dw_gate, dt) || !run_gemm(plan.dw_up, dt) || !run_gemm(plan.dx_gate, dt)) return -1;
  if (!plan.dx_fused && !run_gemm(plan.dx_up, dt)) return -1;
  return 0;
}
