// What the feed-forward blocks' host code (gelu_ffn.cpp, gated_ffn.cpp) shares around cuBLASLt:
// status checks naming the op, the call and the GEMM, the descriptors' RAII, the dtype code, the
// operands' real alignments, PyTorch's cuBLASLt workspace, the heuristic query, and the cuda
// backend's dtype/device check of x. Host only (torch and cuBLASLt headers).
#pragma once

#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <cublasLt.h>
#include <torch/version.h>

#include <cstdint>
#include <string>

// at::cuda::getCUDABlasLtWorkspace{,Size} exist from torch 2.9 (pytorch/pytorch#156495).
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
#define GPTFAST_TORCH_HAS_LT_WORKSPACE 1
#else
#define GPTFAST_TORCH_HAS_LT_WORKSPACE 0
#endif

namespace gptfast {
namespace cuda {

// Who calls cuBLASLt, for the error messages: the op ("gptfast.gelu_ffn (cuda)") and the GEMM.
struct LtWhat {
  const char* op;
  const char* gemm;
};

// Every cuBLASLt status is checked: `call` names the function (and attribute), `what` the GEMM.
inline void check_lt(cublasStatus_t status, const char* call, const LtWhat& what, int attribute = -1) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, what.op, ": ", call,
              attribute >= 0 ? " (attribute " + std::to_string(attribute) + ")" : std::string(),
              " failed for ", what.gemm, " with status ", static_cast<int>(status), " (",
              cublasLtGetStatusString(status), ")");
}

template <typename V>
void set_attribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attribute, const V& value,
                   const LtWhat& what) {
  check_lt(cublasLtMatmulDescSetAttribute(desc, attribute, &value, sizeof(value)),
           "cublasLtMatmulDescSetAttribute", what, static_cast<int>(attribute));
}

template <typename V>
void set_attribute(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attribute,
                   const V& value, const LtWhat& what) {
  check_lt(cublasLtMatmulPreferenceSetAttribute(pref, attribute, &value, sizeof(value)),
           "cublasLtMatmulPreferenceSetAttribute", what, static_cast<int>(attribute));
}

inline cudaDataType_t cuda_data_type(const char* op, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CUDA_R_32F;
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: TORCH_CHECK_TYPE(false, op, ": unsupported dtype ", t);
  }
  return CUDA_R_32F;  // unreachable
}

// Largest power of two (<= 256) dividing the address: the alignment cuBLASLt may assume. Its default
// (256) promises more than a view into a larger tensor (a row slice of a fused weight) may have.
inline uint32_t alignment_of(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  uint32_t alignment = 1;
  while (alignment < 256 && address % (alignment * 2) == 0) alignment *= 2;
  return alignment;
}

// RAII for the cuBLASLt descriptors.
template <typename T, cublasStatus_t (*Destroy)(T)>
struct LtDescriptor {
  T handle = nullptr;
  LtDescriptor() = default;
  LtDescriptor(const LtDescriptor&) = delete;
  LtDescriptor& operator=(const LtDescriptor&) = delete;
  ~LtDescriptor() {
    if (handle != nullptr) Destroy(handle);
  }
};
using MatmulDesc = LtDescriptor<cublasLtMatmulDesc_t, cublasLtMatmulDescDestroy>;
using LayoutDesc = LtDescriptor<cublasLtMatrixLayout_t, cublasLtMatrixLayoutDestroy>;
using PreferenceDesc = LtDescriptor<cublasLtMatmulPreference_t, cublasLtMatmulPreferenceDestroy>;

// The workspace a cuBLASLt call may use; keep it alive until the call has been launched.
struct LtWorkspace {
  void* ptr;
  size_t size;
  at::Tensor buffer;  // owns ptr on older torch
};
// `device`: where the GEMM runs (the current device).
inline LtWorkspace lt_workspace(const at::TensorOptions& device) {
#if GPTFAST_TORCH_HAS_LT_WORKSPACE
  // PyTorch's own cuBLASLt workspace for this stream (what its addmm uses): no allocation here.
  (void)device;
  return {at::cuda::getCUDABlasLtWorkspace(), at::cuda::getCUDABlasLtWorkspaceSize(), at::Tensor()};
#else
  // Older torch has no accessor: 4 MiB from the caching allocator, alive until the caller
  // returns, after the launch (stream-ordered reuse makes that safe).
  const size_t size = size_t{4} << 20;
  at::Tensor buffer = at::empty({static_cast<int64_t>(size)}, device.dtype(at::kByte));
  return {buffer.data_ptr(), size, buffer};
#endif
}

// The heuristic's first kernel for `desc` and the layouts (D in C's layout) within `workspace`,
// told the real alignments of cuBLASLt's A, B and C/D. false: none (the heuristic's status in
// *status), and the caller falls back.
inline bool lt_heuristic(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a_layout,
                         cublasLtMatrixLayout_t b_layout, cublasLtMatrixLayout_t c_layout, const void* a,
                         const void* b, const void* c, const LtWorkspace& workspace, const LtWhat& what,
                         cublasLtMatmulHeuristicResult_t* heuristic, cublasStatus_t* status) {
  PreferenceDesc pref;
  check_lt(cublasLtMatmulPreferenceCreate(&pref.handle), "cublasLtMatmulPreferenceCreate", what);
  set_attribute(pref.handle, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, static_cast<uint64_t>(workspace.size),
                what);
  const uint32_t align_c = alignment_of(c);
  set_attribute(pref.handle, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment_of(a), what);
  set_attribute(pref.handle, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment_of(b), what);
  set_attribute(pref.handle, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_c, what);
  set_attribute(pref.handle, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_c, what);
  *heuristic = {};
  int found = 0;
  *status = cublasLtMatmulAlgoGetHeuristic(handle, desc, a_layout, b_layout, c_layout, c_layout, pref.handle, 1,
                                           heuristic, &found);
  return *status == CUBLAS_STATUS_SUCCESS && found != 0 && heuristic->state == CUBLAS_STATUS_SUCCESS;
}

// The cuda backend's dtype and device requirements on x (the other tensors are checked against x
// by the caller).
inline void check_dtype_and_device(const char* op, const at::Tensor& x) {
  TORCH_CHECK_TYPE(x.scalar_type() != at::kDouble, op,
                   ": float64 is not supported by the cuda backend (use float32, float16 or bfloat16, "
                   "or the reference backend for float64)");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                       x.scalar_type() == at::kBFloat16,
                   op, ": x has unsupported dtype ", x.scalar_type(), "; supported: float16, bfloat16, float32");
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
}

}  // namespace cuda
}  // namespace gptfast
