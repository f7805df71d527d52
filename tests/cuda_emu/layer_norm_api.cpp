// ctypes entry points of the emulated csrc/cuda/layer_norm.cu (built by
// tests/test_cuda_emulated.py from the rewritten copy, see rewrite.py). dtype: 0 fp32, 1 fp16,
// 2 bf16 (gptfast::cuda::DType). residual/s (forward) and dresidual (backward) are nullptr
// without the fused residual add.
#include "layer_norm.cu"

using namespace gptfast::cuda;

EMU_API int emu_ln_forward(const void* x, const void* w, const void* b, const void* residual, void* y, void* s,
                           float* mean, float* rstd, int64_t rows, int cols, float eps, int dtype) {
  LayerNormFwdParams p{};
  p.x = x, p.weight = w, p.bias = b, p.residual = residual, p.y = y, p.residual_out = s;
  p.mean = mean, p.rstd = rstd;
  p.rows = rows, p.cols = cols, p.eps = eps, p.dtype = static_cast<DType>(dtype);
  return layer_norm_forward_launch(p, nullptr);
}

static LayerNormBwdParams bwd_params(const void* dy, const void* x, const void* w, const float* mean,
                                     const float* rstd, const void* dres, void* dx, void* dw, void* db, int64_t rows,
                                     int cols, int dtype) {
  LayerNormBwdParams p{};
  p.dy = dy, p.x = x, p.weight = w, p.mean = mean, p.rstd = rstd, p.dresidual = dres, p.dx = dx, p.dweight = dw;
  p.dbias = db, p.rows = rows, p.cols = cols, p.dtype = static_cast<DType>(dtype);
  return p;
}

// Rows of the dW/dB partial workspaces the backward wants (csrc/cuda/layer_norm.cpp's order of calls).
EMU_API int emu_ln_backward_num_blocks(const void* dy, const void* x, const void* w, const float* mean,
                                       const float* rstd, const void* dres, void* dx, void* dw, void* db, int64_t rows,
                                       int cols, int dtype, int* num_blocks) {
  const LayerNormBwdParams p = bwd_params(dy, x, w, mean, rstd, dres, dx, dw, db, rows, cols, dtype);
  return layer_norm_backward_num_blocks(p, num_blocks);
}

EMU_API int emu_ln_backward(const void* dy, const void* x, const void* w, const float* mean, const float* rstd,
                            const void* dres, void* dx, void* dw, void* db, float* dw_partial, float* db_partial,
                            int64_t rows, int cols, int num_blocks, int dtype) {
  LayerNormBwdParams p = bwd_params(dy, x, w, mean, rstd, dres, dx, dw, db, rows, cols, dtype);
  p.dweight_partial = dw_partial, p.dbias_partial = db_partial, p.num_blocks = num_blocks;
  return layer_norm_backward_launch(p, nullptr);
}
