"""nn.Module wrappers around the gptfast ops, with GPT-2's parameter names.

``LayerNorm`` is a drop-in for ``nn.LayerNorm`` (same parameters and state-dict keys; it *is*
an ``nn.LayerNorm``). ``CausalSelfAttention`` and ``MLP`` carry nanoGPT / GPT-2 names
(``c_attn``, ``c_proj``, ``c_fc``), so GPT-2 checkpoints map onto them mechanically.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import attention, gelu_ffn, layer_norm

__all__ = ["LayerNorm", "CausalSelfAttention", "MLP"]


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        return layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: c_attn (C -> 3C), fused attention, c_proj (C -> C).

    Attention-probability dropout is not supported (the fused kernels do not implement it);
    ``resid_dropout`` applies to the output projection, as in GPT-2.
    """

    def __init__(self, n_embd: int, n_head: int, bias: bool = True, resid_dropout: float = 0.0,
                 backend: str | None = None):
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.n_head, self.n_embd = n_head, n_embd
        self.resid_dropout = resid_dropout
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape                                               # (B, T, C)
        qkv = self.c_attn(x).view(b, t, 3, self.n_head, c // self.n_head)  # (B, T, 3, H, D)
        q, k, v = qkv.unbind(2)  # strided views: the kernels take any batch/seq/head strides
        y = attention(q, k, v, causal=True, backend=self.backend)      # (B, T, H, D)
        y = self.c_proj(y.reshape(b, t, c))
        return F.dropout(y, self.resid_dropout, self.training) if self.resid_dropout else y


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
