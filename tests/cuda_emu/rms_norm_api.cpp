// ctypes entry points of the emulated csrc/cuda/rms_norm.cu (built by tests/test_cuda_emulated.py
// from the rewritten copy, see rewrite.py). dtype: 0 fp32, 1 fp16, 2 bf16 (gptfast::cuda::DType).
// residual/s (forward) and dresidual (backward) are nullptr without the fused residual add; w and
// dw (with its partial workspace) are nullptr without a weight.
#include "rms_norm.cu"

using namespace gptfast::cuda;

EMU_API int emu_rms_forward(const void* x, const void* w, const void* residual, void* y, void* s, float* rstd,
                            int64_t rows, int cols, float eps, float offset, int dtype) {
  RmsNormFwdParams p{};
  p.x = x, p.weight = w, p.residual = residual, p.y = y, p.residual_out = s, p.rstd = rstd;
  p.rows = rows, p.cols = cols, p.eps = eps, p.offset = offset, p.dtype = static_cast<DType>(dtype);
  return rms_norm_forward_launch(p, nullptr);
}

static RmsNormBwdParams bwd_params(const void* dy, const void* x, const void* w, const float* rstd, const void* dres,
                                   void* dx, void* dw, int64_t rows, int cols, float offset, int dtype) {
  RmsNormBwdParams p{};
  p.dy = dy, p.x = x, p.weight = w, p.rstd = rstd, p.dresidual = dres, p.dx = dx, p.dweight = dw;
  p.rows = rows, p.cols = cols, p.offset = offset, p.dtype = static_cast<DType>(dtype);
  return p;
}

// Rows of the dW partial workspace the backward wants (csrc/cuda/rms_norm.cpp's order of calls).
EMU_API int emu_rms_backward_num_blocks(const void* dy, const void* x, const void* w, const float* rstd,
                                        const void* dres, void* dx, void* dw, int64_t rows, int cols, float offset,
                                        int dtype, int* num_blocks) {
  return rms_norm_backward_num_blocks(bwd_params(dy, x, w, rstd, dres, dx, dw, rows, cols, offset, dtype),
                                      num_blocks);
}

EMU_API int emu_rms_backward(const void* dy, const void* x, const void* w, const float* rstd, const void* dres,
                             void* dx, void* dw, float* dw_partial, int64_t rows, int cols, int num_blocks,
                             float offset, int dtype) {
  RmsNormBwdParams p = bwd_params(dy, x, w, rstd, dres, dx, dw, rows, cols, offset, dtype);
  p.dweight_partial = dw_partial, p.num_blocks = num_blocks;
  return rms_norm_backward_launch(p, nullptr);
}
