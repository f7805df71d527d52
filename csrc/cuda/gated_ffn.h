// The CUDA gated feed-forward block (SwiGLU / GeGLU):
//   out = (act(x w_gate^T + b_gate) * (x w_up^T + b_up)) w_down^T + b_down
// Element-wise kernels (csrc/cuda/gated_ffn.cu) and the plan of the whole block (below): which
// GEMMs run, on which operands and buffers, in which order. The host code (csrc/cuda/gated_ffn.cpp)
// allocates the buffers, builds the plan and runs its GEMMs on cuBLASLt; the CPU emulation
// (tests/cuda_emu/gated_ffn_api.cpp) builds the same plan from the same function and runs its
// GEMMs with a CPU loop of cuBLASLt's semantics, so the operand/transposition/leading-dimension
// bookkeeping of the host code is tested without a GPU.
//
// Plain C++ (no CUDA or torch headers beyond the runtime API), so that nvcc, the host compiler
// and the emulator all read it. Every launch function returns cudaGetLastError() after its
// launches (wrap it in GPTFAST_CUDA_LAUNCH_CHECK, csrc/cuda/host.h) and launches nothing for
// empty inputs.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

#include "cuda/gelu_ffn.h"
#include "cuda/types.h"

namespace gptfast {
namespace cuda {

// The gate's activation (the launcher contract's names: "silu", "gelu_tanh", "gelu").
enum class GatedActivation : int { kSilu = 0, kGeluTanh = 1, kGelu = 2 };

// a = act(g) * u over `numel` contiguous elements: fp32 math on the stored g, u, rounded once.
struct GatedForwardParams {
  const void* g;  // (numel,) gate pre-activation
  const void* u;  // (numel,) up projection
  void* a;        // (numel,) act(g) * u; must not overlap g or u
  int64_t numel;
  DType dtype;    // of g, u, a
  GatedActivation act;
};
cudaError_t gated_forward(const GatedForwardParams& params, cudaStream_t stream);

// The backward of a = act(g) * u for (rows, cols) matrices, in one pass:
//   dg = da * u * act'(g)   (in place: `dgu` row i holds da in columns [0, cols) on entry),
//   du = da * act(g)        (into columns [cols, 2 cols) of the same row of `dgu`),
//   a  = act(g) * u         (recomputed for dw_down; contiguous (rows, cols)),
// each rounded once to dtype from fp32; and, when dbias is set, the column sums (fp32, of the
// rounded values) of [dg du]: dbias[j] = sum_i dgu[i, j] for j < 2 cols (db_gate, then db_up).
// dgu has leading dimension 2 cols: [dg du] is one (rows, 2 cols) matrix, so that dw_gate and
// dw_up are one GEMM (and dx one GEMM for fused gate_up weights).
struct GatedBackwardParams {
  const void* g;      // (rows, cols) contiguous
  const void* u;      // (rows, cols) contiguous
  void* dgu;          // (rows, 2 cols) contiguous: [da | ?] in, [dg | du] out
  void* a;            // (rows, cols) contiguous, out; must not overlap the others
  void* dbias;        // (2 cols,) or null
  float* workspace;   // gated_backward_workspace_floats(rows, cols) floats when dbias is set
  int64_t rows, cols;
  DType dtype;        // of every tensor above except the fp32 workspace
  GatedActivation act;
};
cudaError_t gated_backward(const GatedBackwardParams& params, cudaStream_t stream);

// fp32 workspace of the backward's column sums: one partial row of 2 cols per chunk of gelu_ffn.h's
// column_chunks (the same deterministic split of the rows as the GELU block's bias gradients).
inline int64_t gated_backward_workspace_floats(int64_t rows, int64_t cols) {
  return column_sum_workspace_floats(rows, 2 * cols);
}

// ---- the plan ------------------------------------------------------------------------------------

// A logical (rows, cols) matrix in memory: element (i, j) at ptr[i * s0 + j * s1] (elements).
struct Strided {
  const void* ptr;
  int64_t rows, cols, s0, s1;
  Strided t() const { return {ptr, cols, rows, s1, s0}; }
};

// A GEMM operand as cuBLASLt reads it: element (i, j) at ptr[i * ld + j] (row-major) or at
// ptr[j * ld + i] (transposed = true). `ok` false: the strides fit neither (the host copies).
struct GemmOperand {
  const void* ptr;
  int64_t rows, cols, ld;
  bool transposed;
  bool ok;
};
inline GemmOperand gemm_operand(const Strided& m) {
  if (m.s1 == 1 && m.s0 >= m.cols) return {m.ptr, m.rows, m.cols, m.s0, false, true};
  if (m.s0 == 1 && m.s1 >= m.rows) return {m.ptr, m.rows, m.cols, m.s1, true, true};
  return {m.ptr, m.rows, m.cols, 0, false, false};
}

// Row-major C (m, n), leading dimension ldc, = A (m, k) @ B (k, n) [+ bias (n,)] [+ C if
// accumulate]: fp32 accumulation, the sum rounded once to the dtype (cuBLASLt's alpha = 1,
// beta = accumulate, BIAS epilogue).
struct Gemm {
  const char* what;
  GemmOperand a, b;
  void* c;
  int64_t ldc;
  const void* bias;  // (n,) contiguous or null
  bool accumulate;
  int64_t m() const { return a.rows; }
  int64_t k() const { return a.cols; }
  int64_t n() const { return b.cols; }
};

// The element size of a dtype code.
inline int64_t dtype_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// Forward. Two GEMMs for g and u rather than one into (M, 2H) for fused gate_up weights: the
// contract returns g and u as separate contiguous (M, H) tensors, and a fused GEMM's output
// interleaves them by row, so splitting it costs a 2MH temporary plus a 2MH write and read more
// than the two GEMMs' outputs, while the weights are read once either way; it only saves one GEMM
// launch and one read of x (M K), which matters at decode sizes only. (One strided-batched GEMM of
// two, x broadcast, would give both without the copy; not done: unverified without a GPU here.)
struct GatedForwardPlan {
  Gemm gate;                 // g = x @ w_gate^T + b_gate
  Gemm up;                   // u = x @ w_up^T + b_up
  GatedForwardParams act;    // a = act(g) * u
  Gemm down;                 // out = a @ w_down^T + b_down
};
// x (M, K) contiguous; the weights' strides must give ok operands (gemm_operand); biases contiguous
// or null; g, u, a (M, H) and out (M, N) contiguous.
inline GatedForwardPlan gated_forward_plan(const void* x, int64_t M, int64_t K, const Strided& w_gate,
                                           const void* b_gate, const Strided& w_up, const void* b_up,
                                           const Strided& w_down, const void* b_down, void* g, void* u,
                                           void* a, void* out, DType dtype, GatedActivation act) {
  const int64_t H = w_gate.rows, N = w_down.rows;
  const GemmOperand xa = gemm_operand({x, M, K, K, 1});
  GatedForwardPlan p{};
  p.gate = {"g = x @ w_gate^T + b_gate", xa, gemm_operand(w_gate.t()), g, H, b_gate, false};
  p.up = {"u = x @ w_up^T + b_up", xa, gemm_operand(w_up.t()), u, H, b_up, false};
  p.act = {g, u, a, M * H, dtype, act};
  p.down = {"out = a @ w_down^T + b_down", gemm_operand({a, M, H, H, 1}), gemm_operand(w_down.t()), out, N,
            b_down, false};
  return p;
}

// Whether w_up continues w_gate's storage as rows H .. 2H - 1 of one (2H, K) matrix of the same
// layout (a fused gate_up weight split by the op): then [w_gate; w_up] is one GEMM operand.
inline bool fused_rows(const GemmOperand& w_gate, const GemmOperand& w_up, int64_t esize) {
  if (!w_gate.ok || !w_up.ok || w_gate.transposed != w_up.transposed || w_gate.ld != w_up.ld) return false;
  const int64_t step = w_gate.transposed ? w_gate.rows : w_gate.rows * w_gate.ld;  // H rows, elements
  if (!w_gate.transposed && w_gate.ld < w_gate.cols) return false;
  if (w_gate.transposed && w_gate.ld < 2 * w_gate.rows) return false;  // 2H rows in each column
  return static_cast<const char*>(w_up.ptr) == static_cast<const char*>(w_gate.ptr) + step * esize;
}

// Backward (a recomputed, never saved):
//   da  = dout @ w_down                 into dgu[:, :H] (ldc 2H)
//   kernel: dg (in place), du (dgu[:, H:]), a, and the column sums of [dg du] (db_gate, db_up)
//   dw_down = dout^T @ a;  db_down = column sums of dout (gelu_ffn.h's column_sum)
//   dw_gate = dg^T @ x, dw_up = du^T @ x: two GEMMs into separate outputs (custom-op outputs
//   may not alias each other, so one (2H, K) result could not be returned as its two halves)
//   dx = dgu @ [w_gate; w_up] (one GEMM over 2H) when the weights are fused rows, else
//   dx = dg @ w_gate, then dx += du @ w_up (accumulate: cuBLASLt's beta = 1).
struct GatedBackwardPlan {
  Gemm da;
  GatedBackwardParams act;
  Gemm dw_down;
  const void* dout;          // db_down = column sums of dout (M, N) when db_down is set
  void* db_down;
  Gemm dw_gate;
  Gemm dw_up;
  Gemm dx_gate;              // the whole dx when dx_fused
  Gemm dx_up;                // unused when dx_fused
  bool dx_fused;
};
// dout (M, N), x (M, K), g, u (M, H) contiguous; dgu (M, 2H), a (M, H), dw_gate and dw_up (H, K),
// dw_down (N, H), dx (M, K) contiguous outputs; dbias_gate_up (2H,) or null (with its workspace),
// db_down (N,) or null.
inline GatedBackwardPlan gated_backward_plan(const void* dout, const void* x, const void* g, const void* u,
                                             int64_t M, int64_t K, const Strided& w_gate, const Strided& w_up,
                                             const Strided& w_down, void* dgu, void* a, void* dw_gate, void* dw_up,
                                             void* dbias_gate_up, float* workspace, void* dw_down, void* db_down,
                                             void* dx, DType dtype, GatedActivation act) {
  const int64_t H = w_gate.rows, N = w_down.rows, esize = dtype_size(dtype);
  char* dgu_bytes = static_cast<char*>(dgu);
  const GemmOperand douta = gemm_operand({dout, M, N, N, 1});
  const GemmOperand dga = gemm_operand({dgu, M, H, 2 * H, 1});
  const GemmOperand dua = gemm_operand({dgu_bytes + H * esize, M, H, 2 * H, 1});
  const GemmOperand wg = gemm_operand(w_gate), wu = gemm_operand(w_up);
  GatedBackwardPlan p{};
  p.da = {"da = dout @ w_down", douta, gemm_operand(w_down), dgu, 2 * H, nullptr, false};
  p.act = {g, u, dgu, a, dbias_gate_up, workspace, M, H, dtype, act};
  p.dw_down = {"dw_down = dout^T @ a", gemm_operand(Strided{dout, M, N, N, 1}.t()), gemm_operand({a, M, H, H, 1}),
               dw_down, H, nullptr, false};
  p.dout = dout;
  p.db_down = db_down;
  p.dw_gate = {"dw_gate = dg^T @ x", gemm_operand(Strided{dgu, M, H, 2 * H, 1}.t()), gemm_operand({x, M, K, K, 1}),
               dw_gate, K, nullptr, false};
  p.dw_up = {"dw_up = du^T @ x", gemm_operand(Strided{dgu_bytes + H * esize, M, H, 2 * H, 1}.t()),
             gemm_operand({x, M, K, K, 1}), dw_up, K, nullptr, false};
  p.dx_fused = H > 0 && fused_rows(wg, wu, esize);
  if (p.dx_fused) {
    GemmOperand w = wg;
    w.rows = 2 * H;
    p.dx_gate = {"dx = [dg du] @ [w_gate; w_up]", gemm_operand({dgu, M, 2 * H, 2 * H, 1}), w, dx, K, nullptr, false};
  } else {
    p.dx_gate = {"dx = dg @ w_gate", dga, wg, dx, K, nullptr, false};
    p.dx_up = {"dx += du @ w_up", dua, wu, dx, K, nullptr, true};
  }
  return p;
}

}  // namespace cuda
}  // namespace gptfast
