"""FlashAttention 2.8's functions under their own module name, so that porting code is one
changed import: ``from gptfast.flash_attn_interface import flash_attn_func`` (for
``from flash_attn.flash_attn_interface import flash_attn_func``). Same arguments, order, defaults
and return values: the dense functions (:func:`gptfast.ops.attention.flash_attn_func`), the
packed variable-length ones (:mod:`gptfast.ops.varlen`) and KV-cache decoding
(:func:`gptfast.ops.kvcache.flash_attn_with_kvcache`)."""
from .ops.attention import flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func
from .ops.kvcache import flash_attn_with_kvcache
from .ops.varlen import flash_attn_varlen_func, flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func

__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache"]
