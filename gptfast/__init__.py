"""gptfast: fused attention, LayerNorm and GELU-FFN kernels behind a small PyTorch GPT decoder.

    import gptfast
    out = gptfast.attention(q, k, v, causal=True)           # (batch, seqlen, nheads, headdim)
    y = gptfast.layer_norm(x, weight, bias)
    y = gptfast.rms_norm(x, weight, eps=1e-6)                # Llama's; offset=1.0 for Gemma's
    z = gptfast.gelu_ffn(x, w1, b1, w2, b2, approximate="tanh")
    z = gptfast.gated_ffn(x, w_gate, w_up, w_down, activation="silu")  # Llama's SwiGLU MLP
    loss = gptfast.linear_cross_entropy(h, lm_head.weight, targets)  # no (tokens, vocab) logits
    report = gptfast.patch(model)   # an existing nanoGPT / Hugging Face decoder, in place

Importing gptfast imports neither triton nor the native extension; backends load on first use.
"""
from .ops import (attention, attention_ref, attention_varlen, available_backends, backend_table,
                  flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func, flash_attn_varlen_func,
                  flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func, flash_attn_with_kvcache,
                  gated_ffn, gated_ffn_ref, gelu_ffn, gelu_ffn_ref, layer_norm, layer_norm_ref, linear_cross_entropy,
                  linear_cross_entropy_ref, pad_input, rms_norm, rms_norm_ref, unpad_input, use_backend)

from . import model, nn  # noqa: E402  (after the ops they build on)
from .model import GPT, GPTConfig  # noqa: E402
from .patch import PatchReport, patch, unpatch  # noqa: E402  (the functions shadow the submodule name)

__version__ = "0.1.0"

__all__ = [
    "attention", "flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
    "attention_varlen", "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func", "unpad_input", "pad_input", "flash_attn_with_kvcache",
    "layer_norm", "rms_norm", "gelu_ffn", "gated_ffn", "linear_cross_entropy",
    "attention_ref", "layer_norm_ref", "rms_norm_ref", "gelu_ffn_ref", "gated_ffn_ref", "linear_cross_entropy_ref",
    "available_backends", "backend_table", "use_backend", "GPT", "GPTConfig",
    "patch", "unpatch", "PatchReport", "__version__",
]
