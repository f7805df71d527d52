"""Launchers of the ``cpu`` backend: the native C++ kernels in ``csrc/cpu/`` (OpenMP, vectorised).

Same signatures and return values as the reference launchers (the contract in
``gptfast/ops/_backend.py``). The extension is built on first use by :mod:`gptfast._build`;
importing this module builds it. Argument checks run again in C++ (``csrc/<op>.cpp``), so the
extension is also safe to call directly.
"""
from __future__ import annotations

import torch

from .. import _build

_ext = _build.load()

__all__ = ["attention_forward", "attention_backward", "layer_norm_forward", "layer_norm_backward",
           "gelu_ffn_forward", "gelu_ffn_backward"]


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                      softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, T, H, D) in q.dtype, lse (B, H, T) fp32 (fp64 for fp64 inputs)."""
    return _ext.attention_forward(q, k, v, bool(causal), float(softmax_scale))


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, causal: bool, softmax_scale: float,
                       deterministic: bool = False) -> tuple[torch.Tensor, ...]:
    """dq, dk, dv. Always deterministic: one task per (batch, head), no atomics."""
    return _ext.attention_backward(dout, q, k, v, out, lse, bool(causal), float(softmax_scale), True)


def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (M, N) in x.dtype, mean (M,), rstd (M,) in fp32 (fp64 for fp64 inputs)."""
    return _ext.layer_norm_forward(x, weight, bias, float(eps))


def layer_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                        mean: torch.Tensor, rstd: torch.Tensor, has_bias: bool):
    """dx (M, N), dweight (N,) or None, dbias (N,) or None."""
    return _ext.layer_norm_backward(dy, x, weight, mean, rstd, bool(has_bias))


def gelu_ffn_forward(x, w1, b1, w2, b2, approximate: str):
    """out (M, N), h (M, H) = x @ w1.T + b1, both in x.dtype."""
    return _ext.gelu_ffn_forward(x, w1, b1, w2, b2, approximate)


def gelu_ffn_backward(dout, x, h, w1, w2, has_b1: bool, has_b2: bool, approximate: str):
    """dx, dw1, db1 or None, dw2, db2 or None."""
    return _ext.gelu_ffn_backward(dout, x, h, w1, w2, bool(has_b1), bool(has_b2), approximate)
