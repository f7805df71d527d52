"""FlashAttention 2.8's dense functions under their own module name, so that porting code is one
changed import: ``from gptfast.flash_attn_interface import flash_attn_func`` (for
``from flash_attn.flash_attn_interface import flash_attn_func``). Same arguments, order, defaults
and return values; see :func:`gptfast.ops.attention.flash_attn_func`."""
from .ops.attention import flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func

__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func"]
