"""The GPT feed-forward block: out = GELU(x @ w1^T + b1) @ w2^T + b2, weights in nn.Linear layout.

GELU is the tanh approximation (GPT-2's ``gelu_new``, ``approximate="tanh"``) or the exact
erf form (``approximate="none"``). Saved for backward: x and the pre-activation h = x w1^T + b1;
the activation GELU(h) -- the largest tensor of the block besides h -- is recomputed in the
backward instead of stored, so the block keeps one (M, 4C) tensor alive where eager PyTorch keeps two.

    dw2 = dout^T GELU(h),  db2 = sum_rows(dout),  dh = (dout w2) * GELU'(h),
    dw1 = dh^T x,          db1 = sum_rows(dh),    dx = dh w1.

Matmuls run in the input dtype (as ``F.linear`` does); GELU and its derivative in fp32.
This file holds, in order: the ground truth ``gelu_ffn_ref``, GELU and its derivative, the
reference backend's launchers, input checks, the custom ops with their autograd formula and
the public function.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _backend
from ._common import (autocast_dtype, autocast_off, autograd_function, cast_floats, check_same, check_shape,
                      check_tensor, run_plain, run_op)

__all__ = ["gelu_ffn", "gelu_ffn_ref", "gelu_ffn_fwd_op", "gelu_ffn_bwd_op", "gelu", "gelu_grad"]

APPROXIMATIONS = ("tanh", "none")
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_CUBIC = 0.044715


def gelu_ffn_ref(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                 b2: torch.Tensor | None, approximate: str = "tanh") -> torch.Tensor:
    """Ground truth from PyTorch built-ins, in the inputs' dtype (upcast the inputs for fp64 truth)."""
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)


def gelu(h: torch.Tensor, approximate: str) -> torch.Tensor:
    """GELU(h), evaluated in h's dtype (callers pass fp32 or fp64)."""
    if approximate == "tanh":
        return 0.5 * h * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (h + _TANH_CUBIC * h * h * h)))
    return 0.5 * h * (1.0 + torch.erf(h * _INV_SQRT_2))


def gelu_grad(h: torch.Tensor, approximate: str) -> torch.Tensor:
    """d GELU(h) / dh, evaluated in h's dtype."""
    if approximate == "tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (h + _TANH_CUBIC * h * h * h))
        return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_CUBIC * h * h)
    return 0.5 * (1.0 + torch.erf(h * _INV_SQRT_2)) + h * torch.exp(-0.5 * h * h) * _INV_SQRT_2PI


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# The reference launchers evaluate GELU and GELU' with PyTorch's fused elementwise kernels
# (F.gelu, aten.gelu_backward), which compute the formulas of gelu()/gelu_grad() above (tests
# check they agree) in one pass instead of ~15 temporaries: the reference backend is what runs on
# a CPU with no native build, so its speed matters.

def gelu_ffn_forward_reference(x, w1, b1, w2, b2, approximate: str):
    """Reference launcher: x (M, K) -> out (M, N), h (M, H), both in x.dtype."""
    h = F.linear(x, w1, b1)
    a = F.gelu(h.to(_acc_dtype(x.dtype)), approximate=approximate).to(x.dtype)
    return F.linear(a, w2, b2), h


def gelu_ffn_backward_reference(dout, x, h, w1, w2, has_b1: bool, has_b2: bool, approximate: str):
    """Reference launcher: returns dx, dw1, db1 or None, dw2, db2 or None."""
    acc = _acc_dtype(x.dtype)
    ha = h.to(acc)
    a = F.gelu(ha, approximate=approximate).to(x.dtype)            # recomputed, never saved
    dw2 = dout.t() @ a                                             # (N, H)
    db2 = dout.sum(0, dtype=acc).to(x.dtype) if has_b2 else None
    dh = torch.ops.aten.gelu_backward((dout @ w2).to(acc), ha, approximate=approximate).to(x.dtype)  # (M, H)
    dw1 = dh.t() @ x                                               # (H, K)
    db1 = dh.sum(0, dtype=acc).to(x.dtype) if has_b1 else None
    dx = dh @ w1                                                   # (M, K)
    return dx, dw1, db1, dw2, db2


def _check_inputs(x, w1, b1, w2, b2, approximate) -> None:
    op = "gelu_ffn"
    check_tensor(op, "x", x, min_ndim=1)
    check_tensor(op, "w1", w1, ndim=2)
    check_tensor(op, "w2", w2, ndim=2)
    check_tensor(op, "b1", b1, ndim=1, optional=True)
    check_tensor(op, "b2", b2, ndim=1, optional=True)
    k, hidden, n = x.shape[-1], w1.shape[0], w2.shape[0]
    if w1.shape[1] != k:
        raise ValueError(f"gptfast.{op}: w1 must have shape (hidden, in_features) = (hidden, {k}) "
                         f"in nn.Linear layout to match x.shape[-1]={k}, got {tuple(w1.shape)}")
    if w2.shape[1] != hidden:
        raise ValueError(f"gptfast.{op}: w2 must have shape (out_features, hidden) = (out, {hidden}) "
                         f"to match w1's hidden size {hidden}, got {tuple(w2.shape)}")
    check_shape(op, "b1", b1, (hidden,), "w1.shape[0]")
    check_shape(op, "b2", b2, (n,), "w2.shape[0]")
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t is not None and t.device != x.device:
            raise ValueError(f"gptfast.{op}: {name} is on {t.device} but x is on {x.device}")
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"gptfast.{op}: approximate must be one of {APPROXIMATIONS}, got {approximate!r}")


# Custom ops (see attention.py for why); absent bias gradients travel as empty tensors.
def _gelu_ffn_fwd(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                  b2: torch.Tensor | None, approximate: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) contiguous -> out (M, N), h (M, H)."""
    if x.shape[0] == 0:
        return _gelu_ffn_fwd_fake(x, w1, b1, w2, b2, approximate, backend)
    launchers = _backend.resolve("gelu_ffn", x.device, x.dtype, backend or None)
    with autocast_off(x.device.type):
        return launchers.fwd(x, w1, b1, w2, b2, approximate)


gelu_ffn_fwd_op = torch.library.custom_op("gptfast::gelu_ffn_fwd", _gelu_ffn_fwd, mutates_args=())


@gelu_ffn_fwd_op.register_fake
def _gelu_ffn_fwd_fake(x, w1, b1, w2, b2, approximate, backend):
    return x.new_empty((x.shape[0], w2.shape[0])), x.new_empty((x.shape[0], w1.shape[0]))


def _gelu_ffn_bwd(dout: torch.Tensor, x: torch.Tensor, h: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                  has_b1: bool, has_b2: bool, approximate: str, backend: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx (M, K), dw1 (H, K), db1 (H,) or empty, dw2 (N, H), db2 (N,) or empty."""
    if x.shape[0] == 0:
        return tuple(t.zero_() for t in _gelu_ffn_bwd_fake(dout, x, h, w1, w2, has_b1, has_b2, approximate, backend))
    launchers = _backend.resolve("gelu_ffn", x.device, x.dtype, backend or None)
    with autocast_off(x.device.type):
        dx, dw1, db1, dw2, db2 = launchers.bwd(dout, x, h, w1, w2, has_b1, has_b2, approximate)
    # one fresh empty tensor per absent gradient: custom-op outputs may not alias each other
    return (dx, dw1, x.new_empty((0,)) if db1 is None else db1, dw2,
            x.new_empty((0,)) if db2 is None else db2)


gelu_ffn_bwd_op = torch.library.custom_op("gptfast::gelu_ffn_bwd", _gelu_ffn_bwd, mutates_args=())


@gelu_ffn_bwd_op.register_fake
def _gelu_ffn_bwd_fake(dout, x, h, w1, w2, has_b1, has_b2, approximate, backend):
    hidden, n = w1.shape[0], w2.shape[0]
    return (torch.empty_like(x), x.new_empty(w1.shape), x.new_empty((hidden,) if has_b1 else (0,)),
            x.new_empty(w2.shape), x.new_empty((n,) if has_b2 else (0,)))


def _gelu_ffn_setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, approximate, backend = inputs
    _, h = output
    ctx.save_for_backward(x, h, w1, w2)  # GELU(h) is recomputed in the backward, not saved
    ctx.has_b1, ctx.has_b2, ctx.approximate, ctx.backend = b1 is not None, b2 is not None, approximate, backend
    # h is an output only to be saved: autograd would fill an (M, H) zero gradient for it on every
    # backward (a pass as long as the GELU's, ~2% of the tiny preset's CPU train step)
    ctx.set_materialize_grads(False)


def _gelu_ffn_backward(ctx, dout, _dh):
    x, h, w1, w2 = ctx.saved_tensors
    if dout is None:  # (not materialised) out does not reach the loss: the gradients are zero
        dout = x.new_zeros((x.shape[0], w2.shape[0]))
    dx, dw1, db1, dw2, db2 = run_plain(gelu_ffn_bwd_op, _gelu_ffn_bwd, dout.contiguous(), x, h, w1, w2, ctx.has_b1,
                                       ctx.has_b2, ctx.approximate, ctx.backend)
    return (dx, dw1, db1 if ctx.has_b1 else None, dw2, db2 if ctx.has_b2 else None, None, None)


gelu_ffn_fwd_op.register_autograd(_gelu_ffn_backward, setup_context=_gelu_ffn_setup_context)
_GeluFFNFunction = autograd_function("_GeluFFNFunction", _gelu_ffn_fwd, _gelu_ffn_setup_context, _gelu_ffn_backward)


def gelu_ffn(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
             b2: torch.Tensor | None, approximate: str = "tanh", backend: str | None = None) -> torch.Tensor:
    """Fused feed-forward block: ``F.linear(F.gelu(F.linear(x, w1, b1), approximate), w2, b2)``.

    Args:
        x: (..., K) input, float16 / bfloat16 / float32 (float64 on the reference backend).
        w1: (H, K) first weight, nn.Linear layout (a transposed view of a (K, H) Conv1D weight works
            without a copy). b1: (H,) or None.
        w2: (N, H) second weight, nn.Linear layout. b2: (N,) or None.
        approximate: "tanh" (GPT-2's gelu_new) or "none" (exact erf GELU).
        backend: see :func:`gptfast.attention`.

    Returns:
        (..., N) in x's dtype; under ``torch.autocast`` every input is cast to the autocast dtype
        first, as ``nn.Linear`` would be. Saves x and the (..., H) pre-activation for backward.
    """
    _check_inputs(x, w1, b1, w2, b2, approximate)
    amp = autocast_dtype(x.device.type)
    if amp is not None:
        x, w1, b1, w2, b2 = cast_floats(amp, x, w1, b1, w2, b2)
    check_same("gelu_ffn", "x", x, w1=w1, b1=b1, w2=w2, b2=b2)
    lead = x.shape[:-1]
    x2d = x.reshape(math.prod(lead), x.shape[-1]).contiguous()
    # Kernels read the biases as dense vectors (the triton epilogue read a strided b2 as if dense,
    # found by tests/test_fuzz.py); .contiguous() is free when they already are.
    b1, b2 = (None if t is None else t.contiguous() for t in (b1, b2))
    out, _ = run_op(gelu_ffn_fwd_op, _GeluFFNFunction, _gelu_ffn_fwd, x2d, w1, b1, w2, b2, approximate,
                    _backend.checked_name(backend))
    return out.view(*lead, w2.shape[0])
