// ctypes entry points of the emulated csrc/cuda/gelu_ffn.cu (built by tests/test_cuda_emulated.py
// from the rewritten copy, see rewrite.py): the element-wise and column-sum kernels of the GELU
// feed-forward block through their own launch functions. The block's GEMMs (cuBLASLt,
// csrc/cuda/gelu_ffn.cpp) are not emulated. dtype: 0 fp32, 1 fp16, 2 bf16 (gptfast::cuda::DType).
#include "gelu_ffn.cu"

using namespace gptfast::cuda;

EMU_API int emu_gelu_forward(const void* h, void* a, int64_t numel, int dtype, int tanh_approx) {
  GeluForwardParams p{};
  p.h = h, p.a = a, p.numel = numel, p.dtype = static_cast<DType>(dtype), p.tanh_approx = tanh_approx != 0;
  return gelu_forward(p, nullptr);
}

EMU_API int emu_gelu_backward(const void* h, void* dh, void* a, void* dbias, float* workspace, int64_t rows,
                              int64_t cols, int dtype, int tanh_approx) {
  GeluBackwardParams p{};
  p.h = h, p.dh = dh, p.a = a, p.dbias = dbias, p.workspace = workspace;
  p.rows = rows, p.cols = cols, p.dtype = static_cast<DType>(dtype), p.tanh_approx = tanh_approx != 0;
  return gelu_backward(p, nullptr);
}

EMU_API int emu_column_sum(const void* x, void* out, float* workspace, int64_t rows, int64_t cols, int dtype) {
  ColumnSumParams p{};
  p.x = x, p.out = out, p.workspace = workspace, p.rows = rows, p.cols = cols, p.dtype = static_cast<DType>(dtype);
  return column_sum(p, nullptr);
}

// The header's split of the rows (workspace rows = chunk count).
EMU_API void emu_column_chunks(int64_t rows, int64_t* rows_per_chunk, int64_t* count) {
  const ColumnChunks c = column_chunks(rows);
  *rows_per_chunk = c.rows_per_chunk, *count = c.count;
}
