// The Llama-family gated feed-forward block on the CPU (SwiGLU / GeGLU):
//   out = (act(x w_gate^T + b_gate) * (x w_up^T + b_up)) w_down^T + b_down.
//
// The GEMMs go to ATen (at::mm / at::addmm -> MKL or oneDNN), as csrc/cpu/gelu_ffn.cpp's do, with
// the biases inside addmm so that g and u are rounded once, exactly as F.linear rounds them. The
// element-wise work around them is one pass each way:
//   forward : g, u (two GEMMs, both returned and saved for backward), then one pass
//             a = act(g) * u (fed to the down GEMM, not saved).
//   backward: dA = dout w_down (GEMM), then one pass recomputing a for dW_down and turning dA into
//             dg = dA * u * act'(g) in place and du = dA * act(g), accumulating db_gate / db_up in
//             per-thread partial rows; then dW_gate = dg^T x, dW_up = du^T x, dx = dg w_gate + du w_up.
// act and act' run in fp32 for fp16/bf16/fp32 storage (fp64 for fp64), widened and narrowed
// element by element inside the cloned (AVX-512 / AVX2 / baseline) row functions below; each
// result is rounded once to the storage type. Temporaries: a in forward; dA/dg, du and a in
// backward -- eager PyTorch keeps act(g) and a as well in forward, and makes dg, du through
// three more (M, H) passes.
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>

#include <algorithm>
#include <vector>

#include "../common/backend.h"
#include "../common/vec_math.h"

namespace gptfast {
namespace cpu {
namespace {

// kAct: 0 SiLU, 1 GELU (tanh), 2 GELU (erf) -- csrc/gated_ffn.cpp's parse_activation.
template <typename T, int kAct>
GPTFAST_INLINE void act_and_grad(T g, T* act, T* grad) {
  if constexpr (kAct == 0) {
    vec::silu_and_grad<T>(g, act, grad);
  } else {
    vec::gelu_and_grad<T>(g, kAct == 1, act, grad);
  }
}

// a[j] = act(g[j]) * u[j], evaluated in T = opmath(S), rounded once. Results go through locals
// (see csrc/cpu/gelu_ffn.cpp: GCC left loops writing through pointers into the outputs scalar).
template <typename S, int kAct>
GPTFAST_INLINE void glu_forward_row_impl(const S* __restrict__ g, const S* __restrict__ u, S* __restrict__ a,
                                         int64_t n) {
  using T = at::opmath_type<S>;
  for (int64_t j = 0; j < n; ++j) {
    T act;
    act_and_grad<T, kAct>(static_cast<T>(g[j]), &act, nullptr);
    a[j] = static_cast<S>(act * static_cast<T>(u[j]));
  }
}

// On entry d holds dA; on exit d = dg = dA * u * act'(g) and du = dA * act(g), a = act(g) * u,
// each rounded once to S; pg[j] / pu[j] += the rounded dg / du (the bias gradients sum what the
// weight gradients see, as the reference does). pg and pu are both null (no bias) or both set
// (either bias: the loop stays branch-free, the unused sum costs one add). The rows never overlap
// (fresh outputs, per-thread partials): __restrict__, without which GCC's alias versioning of the
// seven pointers exceeded its check budget and left the bias loop scalar in every clone.
// kBias: the loop with the bias partial sums or the one without, from one body.
template <typename S, int kAct, bool kBias>
GPTFAST_INLINE void glu_backward_row_loop(const S* __restrict__ g, const S* __restrict__ u, S* __restrict__ d,
                                          S* __restrict__ du, S* __restrict__ a, at::opmath_type<S>* __restrict__ pg,
                                          at::opmath_type<S>* __restrict__ pu, int64_t n) {
  using T = at::opmath_type<S>;
  for (int64_t j = 0; j < n; ++j) {
    T act, grad;
    const T uv = static_cast<T>(u[j]), da = static_cast<T>(d[j]);
    act_and_grad<T, kAct>(static_cast<T>(g[j]), &act, &grad);
    a[j] = static_cast<S>(act * uv);
    d[j] = static_cast<S>(da * uv * grad);
    du[j] = static_cast<S>(da * act);
    if constexpr (kBias) {
      pg[j] += static_cast<T>(d[j]);  // read back: the rounded values (an S local's copy is not
      pu[j] += static_cast<T>(du[j]); // vectorised by GCC for c10::BFloat16)
    }
  }
}
template <typename S, int kAct>
GPTFAST_INLINE void glu_backward_row_impl(const S* g, const S* u, S* d, S* du, S* a, at::opmath_type<S>* pg,
                                          at::opmath_type<S>* pu, int64_t n) {
  pg ? glu_backward_row_loop<S, kAct, true>(g, u, d, du, a, pg, pu, n)
     : glu_backward_row_loop<S, kAct, false>(g, u, d, du, a, pg, pu, n);
}

#define GPTFAST_GLU_ROWS(S, CLONES)                                                                  \
  CLONES void glu_forward_row(const S* g, const S* u, S* a, int64_t n, int act) {                  \
    act == 0   ? glu_forward_row_impl<S, 0>(g, u, a, n)                                            \
    : act == 1 ? glu_forward_row_impl<S, 1>(g, u, a, n)                                            \
               : glu_forward_row_impl<S, 2>(g, u, a, n);                                           \
  }                                                                                                \
  CLONES void glu_backward_row(const S* g, const S* u, S* d, S* du, S* a, at::opmath_type<S>* pg,  \
                               at::opmath_type<S>* pu, int64_t n, int act) {                       \
    act == 0   ? glu_backward_row_impl<S, 0>(g, u, d, du, a, pg, pu, n)                            \
    : act == 1 ? glu_backward_row_impl<S, 1>(g, u, d, du, a, pg, pu, n)                            \
               : glu_backward_row_impl<S, 2>(g, u, d, du, a, pg, pu, n);                           \
  }
GPTFAST_GLU_ROWS(float, GPTFAST_VEC_CLONES)
GPTFAST_GLU_ROWS(c10::BFloat16, GPTFAST_VEC_CLONES)
GPTFAST_GLU_ROWS(c10::Half, GPTFAST_VEC_CLONES)
GPTFAST_GLU_ROWS(double, )  // libm exp/erf/tanh: scalar anyway (fp64 is for gradcheck, not speed)
#undef GPTFAST_GLU_ROWS

inline int64_t grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  return b.has_value() ? at::addmm(*b, x, w.t()) : at::mm(x, w.t());
}

// The per-thread partial rows summed in order into an (H,) tensor of the storage type.
template <typename scalar_t>
at::Tensor sum_partials(const std::vector<at::opmath_type<scalar_t>>& part, int nthreads, int64_t H,
                        const at::TensorOptions& options) {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor t = at::empty({H}, options);
  scalar_t* o = t.data_ptr<scalar_t>();
  for (int64_t j = 0; j < H; ++j) {
    acc_t s = 0;
    for (int i = 0; i < nthreads; ++i) s += part[static_cast<size_t>(i) * H + j];
    o[j] = static_cast<scalar_t>(s);
  }
  return t;
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& x, const at::Tensor& w_gate, const std::optional<at::Tensor>& b_gate,
    const at::Tensor& w_up, const std::optional<at::Tensor>& b_up, const at::Tensor& w_down,
    const std::optional<at::Tensor>& b_down, int act) {
  at::Tensor g = linear(x, w_gate, b_gate), u = linear(x, w_up, b_up);
  at::Tensor a = at::empty_like(g);
  const int64_t M = g.size(0), H = g.size(1);
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const scalar_t* up = u.const_data_ptr<scalar_t>();
  scalar_t* ap = a.data_ptr<scalar_t>();
  at::parallel_for(0, M, grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) glu_forward_row(gp + r * H, up + r * H, ap + r * H, H, act);
  });
  at::Tensor out = linear(a, w_down, b_down);
  return {out, g, u};
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>, at::Tensor, std::optional<at::Tensor>,
           at::Tensor, std::optional<at::Tensor>>
backward_impl(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& g, const at::Tensor& u,
              const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down, bool has_b_gate,
              bool has_b_up, bool has_b_down, int act) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t M = g.size(0), H = g.size(1);
  at::Tensor dg = at::mm(dout, w_down);  // dA, turned into dg in place below
  at::Tensor du = at::empty_like(dg), a = at::empty_like(dg);
  at::Tensor gc = g.contiguous(), uc = u.contiguous();
  const scalar_t* gp = gc.const_data_ptr<scalar_t>();
  const scalar_t* up = uc.const_data_ptr<scalar_t>();
  scalar_t* dgp = dg.data_ptr<scalar_t>();
  scalar_t* dup = du.data_ptr<scalar_t>();
  scalar_t* ap = a.data_ptr<scalar_t>();
  const int nthreads = at::get_num_threads();
  const bool any_bias = has_b_gate || has_b_up;
  std::vector<acc_t> pg(any_bias ? static_cast<size_t>(nthreads) * H : 0);
  std::vector<acc_t> pu(any_bias ? static_cast<size_t>(nthreads) * H : 0);
  at::parallel_for(0, M, grain(H), [&](int64_t begin, int64_t end) {
    const size_t off = static_cast<size_t>(at::get_thread_num()) * H;
    acc_t* pgr = any_bias ? pg.data() + off : nullptr;
    acc_t* pur = any_bias ? pu.data() + off : nullptr;
    for (int64_t r = begin; r < end; ++r)
      glu_backward_row(gp + r * H, up + r * H, dgp + r * H, dup + r * H, ap + r * H, pgr, pur, H, act);
  });
  at::Tensor dw_down = at::mm(dout.t(), a);
  a.reset();  // free (M, H) before the next GEMMs allocate
  std::optional<at::Tensor> db_gate, db_up, db_down;
  if (has_b_down) db_down = at::sum(dout, {0}, false, acc_type).to(dout.scalar_type());
  at::Tensor dw_gate = at::mm(dg.t(), x);
  at::Tensor dw_up = at::mm(du.t(), x);
  at::Tensor dx = at::mm(dg, w_gate);
  dx.addmm_(du, w_up);
  if (has_b_gate) db_gate = sum_partials<scalar_t>(pg, nthreads, H, x.options());
  if (has_b_up) db_up = sum_partials<scalar_t>(pu, nthreads, H, x.options());
  return {dx, dw_gate, db_gate, dw_up, db_up, dw_down, db_down};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_ffn_forward(
    const at::Tensor& x, const at::Tensor& w_gate, const std::optional<at::Tensor>& b_gate,
    const at::Tensor& w_up, const std::optional<at::Tensor>& b_up, const at::Tensor& w_down,
    const std::optional<at::Tensor>& b_down, int64_t activation) {
  const int act = static_cast<int>(activation);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gptfast_gated_ffn_fwd", [&] {
    return forward_impl<scalar_t>(x, w_gate, b_gate, w_up, b_up, w_down, b_down, act);
  });
}

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>, at::Tensor, std::optional<at::Tensor>, at::Tensor,
           std::optional<at::Tensor>>
gated_ffn_backward(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& g, const at::Tensor& u,
                   const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down, bool has_b_gate,
                   bool has_b_up, bool has_b_down, int64_t activation) {
  const int act = static_cast<int>(activation);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gptfast_gated_ffn_bwd", [&] {
    return backward_impl<scalar_t>(dout, x, g, u, w_gate, w_up, w_down, has_b_gate, has_b_up, has_b_down, act);
  });
}

}  // namespace cpu
}  // namespace gptfast
