// The GPT feed-forward block on the CPU: out = GELU(x w1^T + b1) w2^T + b2.
//
// The four GEMMs of forward and backward go to ATen (at::mm / at::addmm -> MKL or oneDNN); the
// element-wise work around them is fused into one pass each:
//   forward : h = x w1^T (GEMM), then one pass h += b1 (stored, saved for backward) and
//             a = GELU(h) (fed to the second GEMM, not saved).
//   backward: dA = dout w2 (GEMM), then one pass recomputing a = GELU(h) for dW2 and turning dA into
//             dh = dA * GELU'(h) in place, accumulating db1 in per-thread partial rows.
// Temporaries: h and a in forward; dA/dh and a in backward -- the same (M, H) tensors eager
// PyTorch needs, minus eager's separate GELU'(h), dh and bias-gradient passes.
// bf16/fp16: the GEMMs run in the input dtype with the bias inside addmm (as F.linear), GELU and
// GELU' in fp32, widened and narrowed element by element inside the one pass; the forward looks
// GELU up in a table of all 65536 inputs made by that same fp32 code.
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../common/backend.h"
#include "../common/vec_math.h"

namespace gptfast {
namespace cpu {
namespace {

// One pass per row, in the row's storage type S (float, double, bf16, fp16), GELU in T = opmath(S).
// The conversions are inside the cloned functions below, so that they vectorise with the GELU (the
// bf16 path used to widen each row into a heap buffer and narrow it back in baseline-ISA loops).
// Results go through locals, not pointers into a or dh: GCC left the AVX-512 clone of a loop
// scalar when gelu_and_grad wrote to &a[j], and does not vectorise a copy of a c10::BFloat16.

// h[j] (+)= b[j] (b may be null; fp32/fp64 only, h is then written back), a[j] = GELU(h[j]).
template <typename S, bool kTanh>
GPTFAST_INLINE void bias_gelu_row_impl(S* h, const S* b, S* a, int64_t n) {
  using T = at::opmath_type<S>;
  if (b) {
    for (int64_t j = 0; j < n; ++j) {
      const T v = static_cast<T>(h[j]) + static_cast<T>(b[j]);
      h[j] = static_cast<S>(v);
      T act;
      vec::gelu_and_grad<T>(v, kTanh, &act, nullptr);
      a[j] = static_cast<S>(act);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      T act;
      vec::gelu_and_grad<T>(static_cast<T>(h[j]), kTanh, &act, nullptr);
      a[j] = static_cast<S>(act);
    }
  }
}

// a[j] = GELU(h[j]); dh[j] = dh[j] * GELU'(h[j]) in place (dh holds dA on entry), rounded to S;
// part[j] += that rounded dh[j] (db1 sums what dW1 and dx see, as the reference does).
template <typename S, bool kTanh>
GPTFAST_INLINE void gelu_backward_row_impl(const S* h, S* dh, S* a, at::opmath_type<S>* part, int64_t n) {
  using T = at::opmath_type<S>;
  if (part) {
    for (int64_t j = 0; j < n; ++j) {
      T act, g;
      vec::gelu_and_grad<T>(static_cast<T>(h[j]), kTanh, &act, &g);
      dh[j] = static_cast<S>(static_cast<T>(dh[j]) * g);
      a[j] = static_cast<S>(act);
      part[j] += static_cast<T>(dh[j]);  // read back: the rounded value
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      T act, g;
      vec::gelu_and_grad<T>(static_cast<T>(h[j]), kTanh, &act, &g);
      dh[j] = static_cast<S>(static_cast<T>(dh[j]) * g);
      a[j] = static_cast<S>(act);
    }
  }
}

#define GPTFAST_GELU_ROWS(S, CLONES)                                                                 \
  CLONES void gelu_backward_row(const S* h, S* dh, S* a, at::opmath_type<S>* part, int64_t n, bool t) { \
    t ? gelu_backward_row_impl<S, true>(h, dh, a, part, n)                                           \
      : gelu_backward_row_impl<S, false>(h, dh, a, part, n);                                         \
  }
GPTFAST_GELU_ROWS(float, GPTFAST_VEC_CLONES)
GPTFAST_GELU_ROWS(c10::BFloat16, GPTFAST_VEC_CLONES)
GPTFAST_GELU_ROWS(c10::Half, GPTFAST_VEC_CLONES)
GPTFAST_GELU_ROWS(double, )  // libm erf/tanh: scalar anyway (fp64 is for gradcheck, not speed)
#undef GPTFAST_GELU_ROWS
GPTFAST_VEC_CLONES void bias_gelu_row(float* h, const float* b, float* a, int64_t n, bool t) {
  t ? bias_gelu_row_impl<float, true>(h, b, a, n) : bias_gelu_row_impl<float, false>(h, b, a, n);
}
void bias_gelu_row(double* h, const double* b, double* a, int64_t n, bool t) {
  t ? bias_gelu_row_impl<double, true>(h, b, a, n) : bias_gelu_row_impl<double, false>(h, b, a, n);
}

// The bf16/fp16 forward pass looks GELU up: a 16-bit h has 65536 values, and a table of their
// GELUs, made once per type and form by the same cloned fp32 GELU as the rows (and the backward),
// gives exactly what computing gives, at 1.8x the speed (samples in the pass, bf16, M = 1024,
// H = 3072; as fast as eager's bf16 F.gelu, whose erf is cheaper and less accurate). Activations
// touch a few thousand entries, which stay in L1. The backward computes: GELU' needs a float table
// too, and the two lookups were 1.5x slower than computing both.
template <typename S, bool kTanh>
GPTFAST_VEC_CLONES void fill_gelu_table(uint16_t* tab) {
  for (uint32_t i = 0; i < 65536; ++i) {
    float act;
    const S h(static_cast<uint16_t>(i), S::from_bits());
    vec::gelu_and_grad<float>(static_cast<float>(h), kTanh, &act, nullptr);
    tab[i] = static_cast<S>(act).x;
  }
}

template <typename S, bool kTanh>
const uint16_t* gelu_table() {
  static const std::vector<uint16_t> tab = [] {
    std::vector<uint16_t> t(65536);
    fill_gelu_table<S, kTanh>(t.data());
    return t;
  }();
  return tab.data();
}

void gelu_lookup(const uint16_t* h, uint16_t* a, const uint16_t* tab, int64_t n) {
  for (int64_t j = 0; j < n; ++j) a[j] = tab[h[j]];
}

inline int64_t grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& x, const at::Tensor& w1,
                                                const std::optional<at::Tensor>& b1,
                                                const at::Tensor& w2,
                                                const std::optional<at::Tensor>& b2, bool tanh_approx) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;
  // fp32/fp64: the bias joins the GELU pass. Low precision: inside addmm, so that h is rounded
  // once, exactly as F.linear rounds it.
  const bool fuse_bias = b1.has_value() && kDirect;
  at::Tensor h = (b1.has_value() && !kDirect) ? at::addmm(*b1, x, w1.t()) : at::mm(x, w1.t());
  at::Tensor a = at::empty_like(h);
  const int64_t M = h.size(0), H = h.size(1);
  at::Tensor b1c = fuse_bias ? b1->contiguous() : at::Tensor();
  const scalar_t* bp = fuse_bias ? b1c.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* hp = h.data_ptr<scalar_t>();
  scalar_t* ap = a.data_ptr<scalar_t>();
  if constexpr (kDirect) {
    at::parallel_for(0, M, grain(H), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) bias_gelu_row(hp + r * H, bp, ap + r * H, H, tanh_approx);
    });
  } else {
    const uint16_t* tab = tanh_approx ? gelu_table<scalar_t, true>() : gelu_table<scalar_t, false>();
    // c10::BFloat16 / c10::Half are a uint16_t member each: their arrays are arrays of the bits
    const uint16_t* hb = reinterpret_cast<const uint16_t*>(hp);
    uint16_t* ab = reinterpret_cast<uint16_t*>(ap);
    at::parallel_for(0, M * H, 32768, [&](int64_t begin, int64_t end) {
      gelu_lookup(hb + begin, ab + begin, tab, end - begin);
    });
  }
  at::Tensor out = b2.has_value() ? at::addmm(*b2, a, w2.t()) : at::mm(a, w2.t());
  return {out, h};
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>, at::Tensor, std::optional<at::Tensor>>
backward_impl(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& h, const at::Tensor& w1,
              const at::Tensor& w2, bool has_b1, bool has_b2, bool tanh_approx) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t M = h.size(0), H = h.size(1);
  at::Tensor dh = at::mm(dout, w2);  // dA, turned into dh in place below
  at::Tensor a = at::empty_like(h);
  at::Tensor hc = h.contiguous();
  const scalar_t* hp = hc.const_data_ptr<scalar_t>();
  scalar_t* dhp = dh.data_ptr<scalar_t>();
  scalar_t* ap = a.data_ptr<scalar_t>();
  const int nthreads = at::get_num_threads();
  std::vector<acc_t> db1_part(has_b1 ? static_cast<size_t>(nthreads) * H : 0);
  at::parallel_for(0, M, grain(H), [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    acc_t* part = has_b1 ? db1_part.data() + static_cast<size_t>(tid) * H : nullptr;
    for (int64_t r = begin; r < end; ++r)
      gelu_backward_row(hp + r * H, dhp + r * H, ap + r * H, part, H, tanh_approx);
  });
  at::Tensor dw2 = at::mm(dout.t(), a);
  a.reset();  // free (M, H) before the next GEMMs allocate
  std::optional<at::Tensor> db2, db1;
  if (has_b2) db2 = at::sum(dout, {0}, false, acc_type).to(dout.scalar_type());
  at::Tensor dw1 = at::mm(dh.t(), x);
  at::Tensor dx = at::mm(dh, w1);
  if (has_b1) {
    at::Tensor t = at::empty({H}, x.options());
    scalar_t* o = t.data_ptr<scalar_t>();
    for (int64_t j = 0; j < H; ++j) {
      acc_t s = 0;
      for (int i = 0; i < nthreads; ++i) s += db1_part[static_cast<size_t>(i) * H + j];
      o[j] = static_cast<scalar_t>(s);
    }
    db1 = t;
  }
  return {dx, dw1, db1, dw2, db2};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gelu_ffn_forward(const at::Tensor& x, const at::Tensor& w1,
                                                    const std::optional<at::Tensor>& b1,
                                                    const at::Tensor& w2,
                                                    const std::optional<at::Tensor>& b2,
                                                    bool tanh_approx) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "gptfast_gelu_ffn_fwd",
      [&] { return forward_impl<scalar_t>(x, w1, b1, w2, b2, tanh_approx); });
}

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>, at::Tensor, std::optional<at::Tensor>>
gelu_ffn_backward(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& h,
                  const at::Tensor& w1, const at::Tensor& w2, bool has_b1, bool has_b2,
                  bool tanh_approx) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "gptfast_gelu_ffn_bwd", [&] {
        return backward_impl<scalar_t>(dout, x, h, w1, w2, has_b1, has_b2, tanh_approx);
      });
}

}  // namespace cpu
}  // namespace gptfast
