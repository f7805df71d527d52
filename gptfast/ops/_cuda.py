"""Launchers of the ``cuda`` backend: the CUDA C++ kernels in ``csrc/cuda/``.

Same signatures and return values as the reference launchers (the contract in
``gptfast/ops/_backend.py``). The CUDA extension is built on first use by :mod:`gptfast._build`
(about a minute of nvcc; ``gptfast build --cuda`` does it ahead of time); importing this module builds
it. Argument checks run again in C++ (``csrc/<op>.cpp``), so the extension is also safe to call
directly: CPU tensors, float64, or a float32 attention raise there with the argument's name.

Attention runs on tensor cores in float16/bfloat16 only; LayerNorm and the GELU-FFN also take
float32. The attention backward adds dQ with fp32 atomics unless ``deterministic=True`` or
``torch.use_deterministic_algorithms(True)`` is in effect, which select a second dQ kernel that
sums in a fixed order (bitwise reproducible, one more pass over K and V).
"""
from __future__ import annotations

import torch

from .. import _build

_ext = _build.load("cuda")

__all__ = ["attention_forward", "attention_backward", "layer_norm_forward", "layer_norm_backward",
           "gelu_ffn_forward", "gelu_ffn_backward"]


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                      softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, T, H, D) in q.dtype, lse (B, H, T) fp32."""
    return _ext.attention_forward(q, k, v, bool(causal), float(softmax_scale))


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, causal: bool, softmax_scale: float,
                       deterministic: bool = False) -> tuple[torch.Tensor, ...]:
    """dq, dk, dv; dQ by atomics unless deterministic (argument or torch's global flag)."""
    deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    return _ext.attention_backward(dout, q, k, v, out, lse, bool(causal), float(softmax_scale), deterministic)


def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (M, N) in x.dtype, mean (M,), rstd (M,) in fp32."""
    return _ext.layer_norm_forward(x, weight, bias, float(eps))


def layer_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                        mean: torch.Tensor, rstd: torch.Tensor, has_bias: bool):
    """dx (M, N), dweight (N,) or None, dbias (N,) or None; dW/dB reduced without atomics."""
    return _ext.layer_norm_backward(dy, x, weight, mean, rstd, bool(has_bias))


def gelu_ffn_forward(x, w1, b1, w2, b2, approximate: str):
    """out (M, N), h (M, H) = x @ w1.T + b1, both in x.dtype."""
    return _ext.gelu_ffn_forward(x, w1, b1, w2, b2, approximate)


def gelu_ffn_backward(dout, x, h, w1, w2, has_b1: bool, has_b2: bool, approximate: str):
    """dx, dw1, db1 or None, dw2, db2 or None."""
    return _ext.gelu_ffn_backward(dout, x, h, w1, w2, bool(has_b1), bool(has_b2), approximate)
