"""Public functional ops; each dispatches to a backend chosen by ``gptfast.ops._backend``."""
from ._backend import available_backends, backend_table, use_backend
from .attention import (attention, attention_ref, flash_attn_func, flash_attn_kvpacked_func,
                        flash_attn_qkvpacked_func)
from .gated_ffn import gated_ffn, gated_ffn_ref
from .gelu_ffn import gelu_ffn, gelu_ffn_ref
from .layer_norm import layer_norm, layer_norm_ref
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from .rms_norm import rms_norm, rms_norm_ref
from .kvcache import flash_attn_with_kvcache
from .varlen import (attention_varlen, flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                     flash_attn_varlen_qkvpacked_func, pad_input, unpad_input)

__all__ = [
    "attention", "flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
    "attention_varlen", "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func", "unpad_input", "pad_input", "flash_attn_with_kvcache",
    "layer_norm", "rms_norm", "gelu_ffn", "gated_ffn", "linear_cross_entropy",
    "attention_ref", "layer_norm_ref", "rms_norm_ref", "gelu_ffn_ref", "gated_ffn_ref", "linear_cross_entropy_ref",
    "available_backends", "backend_table", "use_backend",
]
