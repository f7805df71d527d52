// Argument checks shared by the bindings of every op (CPU now, CUDA later).
//
// Each macro throws a c10 error that pybind11 turns into a Python exception whose message names
// the op and the argument: TORCH_CHECK_TYPE -> TypeError (dtype), TORCH_CHECK_VALUE -> ValueError
// (device, shape, layout). They expect a `kOp` string ("gptfast.attention") in scope.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define CHECK_DEVICE(x, dev)                                                                     \
  TORCH_CHECK_VALUE((x).device() == (dev), kOp, ": ", #x, " must be on ", (dev), ", got ",      \
                    (x).device())

#define CHECK_CPU(x)                                                                             \
  TORCH_CHECK_VALUE((x).device().is_cpu(), kOp, ": ", #x,                                        \
                    " must be a CPU tensor for the cpu backend, got ", (x).device())

#define CHECK_DTYPE(x, dt)                                                                       \
  TORCH_CHECK_TYPE((x).scalar_type() == (dt), kOp, ": ", #x, " must have dtype ", (dt),         \
                   ", got ", (x).scalar_type())

// float16, bfloat16, float32 (the kernel dtypes) and float64 (for gradcheck-grade tests).
#define CHECK_FLOATING(x)                                                                        \
  TORCH_CHECK_TYPE((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kBFloat16 ||     \
                       (x).scalar_type() == at::kHalf || (x).scalar_type() == at::kDouble,       \
                   kOp, ": ", #x, " has unsupported dtype ", (x).scalar_type(),                  \
                   "; supported: float16, bfloat16, float32, float64")

#define CHECK_DIM(x, n)                                                                          \
  TORCH_CHECK_VALUE((x).dim() == (n), kOp, ": ", #x, " must have ", (n), " dimensions, got shape ", \
                    (x).sizes())

#define CHECK_SHAPE(x, ...)                                                                      \
  TORCH_CHECK_VALUE((x).sizes() == at::IntArrayRef({__VA_ARGS__}), kOp, ": ", #x,                \
                    " must have shape (" #__VA_ARGS__ ") = ", at::IntArrayRef({__VA_ARGS__}),   \
                    ", got ", (x).sizes())

#define CHECK_CONTIGUOUS(x)                                                                      \
  TORCH_CHECK_VALUE((x).is_contiguous(), kOp, ": ", #x, " must be contiguous, got strides ",    \
                    (x).strides())

#define CHECK_LAST_DIM_CONTIGUOUS(x)                                                             \
  TORCH_CHECK_VALUE((x).stride(-1) == 1, kOp, ": ", #x,                                          \
                    " must have stride 1 in its last dimension, got strides ", (x).strides())

// Row-major tiles go to BLAS with the seqlen stride as leading dimension, which must be >= the
// row length: broadcast (stride 0) or overlapping rows would be rejected by BLAS (silently, with
// garbage results), so they are refused here; the Python op copies such inputs first. At seqlen
// <= 1 the stride is never stepped, so any value is accepted: blas::call gives a one-row operand
// a valid pitch itself (and throws, rather than let BLAS skip a product, on any invalid one).
#define CHECK_ROWS_DISJOINT(x)                                                                   \
  TORCH_CHECK_VALUE((x).size(1) <= 1 || (x).stride(1) >= (x).size(-1), kOp, ": ", #x,             \
                    " must not have broadcast or overlapping rows (seqlen stride ", (x).stride(1),  \
                    " < headdim ", (x).size(-1), "); pass a contiguous tensor")

#define CHECK_SAME_DTYPE(x, y)                                                                   \
  TORCH_CHECK_TYPE((x).scalar_type() == (y).scalar_type(), kOp, ": ", #x, " has dtype ",        \
                   (x).scalar_type(), " but ", #y, " has ", (y).scalar_type())
