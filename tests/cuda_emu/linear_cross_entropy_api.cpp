// ctypes entry point of the emulated csrc/cuda/linear_cross_entropy.cu (built by
// tests/test_cuda_emulated.py from the rewritten copy, see rewrite.py): the logits epilogue on a
// (rows, vocab) fp32 chunk z, in place; row_scale nullptr: losses only.
#include "linear_cross_entropy.cu"

using namespace gptfast::cuda;

EMU_API int emu_ce_logits(float* z, const int64_t* targets, const float* row_scale, float* losses, int64_t rows,
                          int64_t vocab, int64_t ignore_index, float label_smoothing, float softcap) {
  CrossEntropyParams p{};
  p.z = z, p.targets = targets, p.row_scale = row_scale, p.losses = losses;
  p.rows = rows, p.vocab = vocab, p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing, p.softcap = softcap;
  return cross_entropy_logits_launch(p, nullptr);
}
