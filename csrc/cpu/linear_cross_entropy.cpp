// The logits epilogue of gptfast.linear_cross_entropy on the CPU (the chunk driver and its GEMMs
// are gptfast/ops/linear_cross_entropy.py's): one fp32 (or fp64) chunk of logits z (C, V), rows in
// parallel, turned in place into the gradient of sum(row_scale * loss) and the per-row losses
//
//   z' = softcap * tanh(z / softcap) (or z),  lse = log sum_j exp(z'_j),
//   loss = lse - (1 - eps) z'_y - eps / V sum_j z'_j,
//   dz_j = scale * (exp(z'_j - lse) - eps / V - (1 - eps) [j == y]) * (1 - (z'_j / softcap)^2).
//
// Three sweeps over a row: max and sum of z' (softcapping in place), the exponentials (in place,
// or into a per-thread scratch row when softcap needs z' again), the gradient. Rows whose target
// is ignore_index get loss 0 and a zero gradient row.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../common/backend.h"
#include "../common/vec_math.h"

namespace gptfast {
namespace cpu {
namespace {

// One row; scratch (V values) is used only with softcap. Returns the loss.
template <typename T>
GPTFAST_INLINE T ce_row_impl(T* z, int64_t v, int64_t y, const T* scale, T eps, T softcap, T* scratch) {
  using V = typename vec::Vec<T>::type;
  constexpr int L = vec::Vec<T>::n;
  if (softcap > T(0)) {
    const T inv = T(1) / softcap;
    for (int64_t j = 0; j < v; ++j) z[j] = softcap * vec::softcap_tanh(z[j] * inv);
  }
  V vm = vec::vsplat<T>(-std::numeric_limits<T>::infinity()), vs = vec::vsplat<T>(0);
  int64_t j = 0;
  for (; j + L <= v; j += L) {
    const V x = vec::vload(z + j);
    vm = x > vm ? x : vm;
    vs += x;
  }
  T mx = vec::vmax<T>(vm), sz = vec::vsum<T>(vs);
  for (; j < v; ++j) {
    mx = z[j] > mx ? z[j] : mx;
    sz += z[j];
  }
  for (j = 0; j < v; ++j) mx = z[j] != z[j] ? z[j] : mx;  // NaN anywhere: a NaN loss, as torch
  const T zy = z[y];
  T* e = softcap > T(0) ? scratch : z;
  for (j = 0; j < v; ++j) e[j] = vec::exp_f(z[j] - mx);  // exp apart from the sums: it vectorises
  V ve = vec::vsplat<T>(0);
  for (j = 0; j + L <= v; j += L) ve += vec::vload(e + j);
  T se = vec::vsum<T>(ve);
  for (; j < v; ++j) se += e[j];
  const T lse = mx + std::log(se);
  const T loss = lse - (T(1) - eps) * zy - eps / T(v) * sz;
  if (scale == nullptr) return loss;
  const T a = *scale / se, b = *scale * eps / T(v);
  if (softcap > T(0)) {
    const T inv = T(1) / softcap;
    for (j = 0; j < v; ++j) {
      const T t = z[j] * inv;
      z[j] = (e[j] * a - b) * (T(1) - t * t);
    }
    const T ty = zy * inv;
    z[y] -= *scale * (T(1) - eps) * (T(1) - ty * ty);
  } else {
    for (j = 0; j < v; ++j) z[j] = z[j] * a - b;
    z[y] -= *scale * (T(1) - eps);
  }
  return loss;
}

GPTFAST_VEC_CLONES float ce_row(float* z, int64_t v, int64_t y, const float* scale, float eps, float softcap,
                                float* scratch) {
  return ce_row_impl<float>(z, v, y, scale, eps, softcap, scratch);
}
double ce_row(double* z, int64_t v, int64_t y, const double* scale, double eps, double softcap, double* scratch) {
  return ce_row_impl<double>(z, v, y, scale, eps, softcap, scratch);
}

template <typename T>
void ce_rows(T* z, int64_t c, int64_t v, const int64_t* targets, const T* row_scale, int64_t ignore_index,
             T eps, T softcap, T* losses) {
  // grain: a few rows per task (a row of GPT-2's vocabulary is 200 KB of work already)
  at::parallel_for(0, c, 4, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(softcap > T(0) ? v : 0);
    for (int64_t i = begin; i < end; ++i) {
      T* row = z + i * v;
      const int64_t y = targets[i];
      if (y == ignore_index) {
        losses[i] = T(0);
        if (row_scale) std::memset(row, 0, sizeof(T) * v);
        continue;
      }
      losses[i] = ce_row(row, v, y, row_scale ? row_scale + i : nullptr, eps, softcap, scratch.data());
    }
  });
}

}  // namespace

at::Tensor cross_entropy_logits_(at::Tensor& z, const at::Tensor& targets, const std::optional<at::Tensor>& row_scale,
                                 int64_t ignore_index, double label_smoothing, double softcap) {
  const int64_t c = z.size(0), v = z.size(1);
  at::Tensor losses = at::empty({c}, z.options());
  if (z.scalar_type() == at::kDouble) {
    ce_rows<double>(z.data_ptr<double>(), c, v, targets.data_ptr<int64_t>(),
                    row_scale ? row_scale->data_ptr<double>() : nullptr, ignore_index, label_smoothing, softcap,
                    losses.data_ptr<double>());
  } else {
    ce_rows<float>(z.data_ptr<float>(), c, v, targets.data_ptr<int64_t>(),
                   row_scale ? row_scale->data_ptr<float>() : nullptr, ignore_index,
                   static_cast<float>(label_smoothing), static_cast<float>(softcap), losses.data_ptr<float>());
  }
  return losses;
}

}  // namespace cpu
}  // namespace gptfast
