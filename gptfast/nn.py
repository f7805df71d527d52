"""nn.Module wrappers around the gptfast ops, with GPT-2's parameter names.

``LayerNorm`` is a drop-in for ``nn.LayerNorm`` (same parameters and state-dict keys; it *is*
an ``nn.LayerNorm``), ``RMSNorm`` likewise for ``nn.RMSNorm`` (with Gemma's ``offset``). ``CausalSelfAttention`` and ``MLP`` carry nanoGPT / GPT-2 names
(``c_attn``, ``c_proj``, ``c_fc``), so GPT-2 checkpoints map onto them mechanically;
``GatedFFN`` carries Hugging Face's Llama / Phi-3 MLP names (``gate_proj``, ``up_proj``,
``down_proj``, or the fused ``gate_up_proj``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import attention, attention_varlen, gated_ffn, gelu_ffn, layer_norm, rms_norm

__all__ = ["LayerNorm", "RMSNorm", "CausalSelfAttention", "MLP", "GatedFFN"]


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dimension, computed by :func:`gptfast.layer_norm`.

    Only a single normalised dimension is supported (an int or a 1-tuple), which is what
    transformers use. ``backend`` pins this module to one backend (default: selection rules).
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, backend: str | None = None):
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if len(shape) != 1:
            raise ValueError(f"gptfast.nn.LayerNorm normalises the last dimension only; "
                             f"normalized_shape must be an int or 1-tuple, got {normalized_shape!r}")
        super().__init__(shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, prenorm: bool = False,
                residual_in_fp32: bool = False):
        """x (..., C) -> (..., C); with ``residual``, of the stream x + residual, and with ``prenorm``
        the pair (y, stream): :func:`gptfast.layer_norm`'s fused residual add."""
        if residual is None and not prenorm:
            return layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)
        return layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend, residual=residual,
                          prenorm=prenorm, residual_in_fp32=residual_in_fp32)


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` over the last dimension, computed by :func:`gptfast.rms_norm`:
    ``x / sqrt(mean(x^2) + eps) * (offset + weight)``.

    ``offset`` 1.0 gives Gemma's RMSNorm (its weight stores scale - 1; initialise it to zeros for an
    identity start: ``nn.init.zeros_(norm.weight)``). ``eps=None`` is x's machine epsilon, as in
    ``nn.RMSNorm``. Only a single normalised dimension is supported. ``backend`` pins this module
    to one backend (default: selection rules).
    """

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True,
                 device=None, dtype=None, offset: float = 0.0, backend: str | None = None):
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if len(shape) != 1:
            raise ValueError(f"gptfast.nn.RMSNorm normalises the last dimension only; "
                             f"normalized_shape must be an int or 1-tuple, got {normalized_shape!r}")
        super().__init__(shape, eps=eps, elementwise_affine=elementwise_affine, device=device, dtype=dtype)
        self.offset = float(offset)
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, prenorm: bool = False,
                residual_in_fp32: bool = False):
        """x (..., C) -> (..., C); with ``residual``, of the stream x + residual, and with ``prenorm``
        the pair (y, stream): :func:`gptfast.rms_norm`'s fused residual add."""
        return rms_norm(x, self.weight, self.eps, offset=self.offset, residual=residual, prenorm=prenorm,
                        residual_in_fp32=residual_in_fp32, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", offset={self.offset:g}" if self.offset else "")


class CausalSelfAttention(nn.Module):
    """Causal self-attention: c_attn (C -> (H + 2 Hk) D), fused attention, c_proj (C -> C).

    ``n_kv_head`` (default ``n_head``) < ``n_head`` is grouped-query attention (1: multi-query):
    c_attn then emits H query heads and Hk key and value heads, laid out [q | k | v], and the
    kernels read each kv head for its group without repeating it. With ``n_kv_head == n_head``
    c_attn is GPT-2's C -> 3C. ``attn_dropout`` drops attention probabilities in training (the
    mask is regenerated in backward, never stored); ``resid_dropout`` applies to the output
    projection, as in GPT-2.
    """

    def __init__(self, n_embd: int, n_head: int, bias: bool = True, resid_dropout: float = 0.0,
                 backend: str | None = None, *, n_kv_head: int | None = None, attn_dropout: float = 0.0):
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        if n_kv_head < 1 or n_head % n_kv_head:
            raise ValueError(f"n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head})")
        if not 0.0 <= attn_dropout < 1.0:
            raise ValueError(f"attn_dropout must be in [0, 1), got {attn_dropout}")
        head_dim = n_embd // n_head
        self.c_attn = nn.Linear(n_embd, (n_head + 2 * n_kv_head) * head_dim, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.n_head, self.n_kv_head, self.n_embd = n_head, n_kv_head, n_embd
        self.resid_dropout, self.attn_dropout = resid_dropout, attn_dropout
        self.backend = backend

    def forward(self, x: torch.Tensor, segments=None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). ``segments`` (gptfast.model.Segments): attend within packed
        documents only (gptfast.attention_varlen over the B * T tokens)."""
        b, t, c = x.shape                                               # (B, T, C)
        h, hk, d = self.n_head, self.n_kv_head, c // self.n_head
        qkv = self.c_attn(x)
        if hk == h:
            q, k, v = qkv.view(b, t, 3, h, d).unbind(2)  # strided views: the kernels take any strides
        else:
            q, k, v = qkv.split([h * d, hk * d, hk * d], dim=-1)
            q, k, v = q.view(b, t, h, d), k.view(b, t, hk, d), v.view(b, t, hk, d)
        drop = self.attn_dropout if self.training else 0.0
        if segments is None:
            y = attention(q, k, v, causal=True, backend=self.backend, dropout_p=drop)  # (B, T, H, D)
        else:
            n = segments.max_seqlen
            y = attention_varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), segments.cu_seqlens,
                                 segments.cu_seqlens, n, n, causal=True, backend=self.backend, dropout_p=drop)
        y = self.c_proj(y.reshape(b, t, c))
        return F.dropout(y, self.resid_dropout, self.training) if self.resid_dropout else y

    def forward_cached(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       cache_len: int) -> torch.Tensor:
        """Decoding: x (B, T, C) holds the tokens after the ``cache_len`` already in k_cache/v_cache
        (B, T_max, Hk, D); their keys and values are written into the caches in place
        (gptfast.flash_attn_with_kvcache) and each token attends to the cache up to itself."""
        from .ops.kvcache import flash_attn_with_kvcache
        b, t, c = x.shape
        h, hk, d = self.n_head, self.n_kv_head, c // self.n_head
        q, k, v = self.c_attn(x).split([h * d, hk * d, hk * d], dim=-1)
        y = flash_attn_with_kvcache(q.view(b, t, h, d), k_cache, v_cache, k.reshape(b, t, hk, d),
                                    v.reshape(b, t, hk, d), cache_seqlens=cache_len, causal=True)
        return self.c_proj(y.reshape(b, t, c))


class MLP(nn.Module):
    """GPT feed-forward block c_fc (C -> 4C), GELU, c_proj (4C -> C), run as one fused op."""

    def __init__(self, n_embd: int, hidden: int | None = None, bias: bool = True,
                 approximate: str = "tanh", resid_dropout: float = 0.0, backend: str | None = None):
        super().__init__()
        hidden = 4 * n_embd if hidden is None else hidden
        self.c_fc = nn.Linear(n_embd, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, n_embd, bias=bias)
        self.approximate = approximate
        self.resid_dropout = resid_dropout
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        y = gelu_ffn(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias,
                     approximate=self.approximate, backend=self.backend)
        return F.dropout(y, self.resid_dropout, self.training) if self.resid_dropout else y


class GatedFFN(nn.Module):
    """The Llama-family gated MLP, ``down_proj(act(gate_proj(x)) * up_proj(x))``, run as one fused
    op (:func:`gptfast.gated_ffn`): SwiGLU with ``activation="silu"`` (Llama, Mistral, Qwen),
    GeGLU with ``"gelu_tanh"`` (Gemma) or ``"gelu"`` (exact erf).

    x (..., in_features) -> (..., out_features). The weights are ``nn.Linear`` modules with
    Hugging Face's names, so a ``LlamaMLP`` state dict loads as is: ``gate_proj``, ``up_proj``
    (hidden_features x in_features each) and ``down_proj`` (out_features x hidden_features); with
    ``fused=True`` one ``gate_up_proj`` (2 hidden_features x in_features: gate rows first, then up;
    Phi-3's layout) replaces the first two. ``out_features`` defaults to ``in_features``; ``bias``
    gives every projection a bias (Llama has none). ``backend`` pins this module to one backend
    (default: selection rules).
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 activation: str = "silu", bias: bool = False, fused: bool = False, device=None, dtype=None,
                 backend: str | None = None):
        super().__init__()
        from .ops.gated_ffn import ACTIVATIONS
        if activation not in ACTIVATIONS:
            raise ValueError(f"gptfast.nn.GatedFFN: activation must be one of {ACTIVATIONS}, got {activation!r}")
        out_features = in_features if out_features is None else out_features
        kw = dict(bias=bias, device=device, dtype=dtype)
        if fused:
            self.gate_up_proj = nn.Linear(in_features, 2 * hidden_features, **kw)
        else:
            self.gate_proj = nn.Linear(in_features, hidden_features, **kw)
            self.up_proj = nn.Linear(in_features, hidden_features, **kw)
        self.down_proj = nn.Linear(hidden_features, out_features, **kw)
        self.in_features, self.hidden_features, self.out_features = in_features, hidden_features, out_features
        self.activation, self.fused, self.backend = activation, fused, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in_features) -> (..., out_features)
        if self.fused:
            gu = self.gate_up_proj
            return gated_ffn(x, gu.weight, None, self.down_proj.weight, self.activation, gu.bias, None,
                             self.down_proj.bias, backend=self.backend)
        return gated_ffn(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, self.activation,
                         self.gate_proj.bias, self.up_proj.bias, self.down_proj.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, hidden_features={self.hidden_features}, "
                f"out_features={self.out_features}, activation={self.activation!r}"
                + (", fused=True" if self.fused else ""))
