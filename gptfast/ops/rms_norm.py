"""RMSNorm over the last dimension: y = x * rstd * (offset + weight), rstd = 1/sqrt(mean(x^2) + eps).

The Llama family's norm (Llama, Mistral, Qwen2/3: offset 0; Gemma: the weight is stored as
w - 1, offset 1). Statistics and the scale are computed in fp32 and y is rounded once (Gemma's
order; Llama's HF module rounds x * rstd to the input dtype before the weight, one rounding more).
Saved for backward: x (or s = x + residual), weight and the per-row fp32 rstd. With
xhat = x * rstd, w' = offset + weight and g = dy * w', the backward is

    dx = rstd * (g - xhat * mean(g * xhat))       (mean over the row)
    dweight = sum_rows(dy * xhat).

With ``residual`` the op normalises s = x + residual (FlashAttention's ``rms_norm_fn(...,
residual=..., prenorm=True)``), as gptfast.layer_norm does: the stream s is returned too, and its
gradient is added to dx in the backward.

This file holds, in order: the ground truth ``rms_norm_ref``, the reference backend's launchers,
input checks, the custom ops with their autograd formula, and the public function.
"""
from __future__ import annotations

import math
import numbers

import torch

from . import _backend
from ._common import (SUPPORTED_DTYPES, autocast_dtype, autocast_off, autograd_function, cast_floats, check_same,
                      check_shape, check_tensor, run_op, run_plain)

_DTYPES = frozenset(SUPPORTED_DTYPES)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, offset: float = 0.0,
                 upcast: bool = True) -> torch.Tensor:
    """Ground truth from plain differentiable ops; fp32 math (fp64 for fp64) when ``upcast``."""
    dtype = x.dtype
    if upcast:
        x, weight = cast_floats(_acc_dtype(dtype), x, weight)
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * (offset + weight)
    return y.to(dtype)


# ------------------------------------------------------------------ reference launchers

def rms_norm_forward_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float,
                               residual: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Reference launcher: x (..., N) -> y (..., N) in x.dtype, rstd (M,) in fp32 (fp64 for fp64),
    M the rows of x; with ``residual`` (x's shape), of s = x + residual rounded to x.dtype, and s
    as a third output."""
    acc = _acc_dtype(x.dtype)
    if residual is not None:
        s = (x.to(acc) + residual.to(acc)).to(x.dtype)
        return (*rms_norm_forward_reference(s, weight, eps, offset), s)
    xa = x.reshape(-1, x.shape[-1]).to(acc)
    rstd = torch.rsqrt(xa.pow(2).mean(-1) + eps)
    y = xa * rstd[:, None]
    if weight is not None:
        y = y * (offset + weight.to(acc))
    return y.to(x.dtype).view(x.shape), rstd


def rms_norm_backward_reference(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                                rstd: torch.Tensor, offset: float, dresidual: torch.Tensor | None = None):
    """Reference launcher: dx (x's shape), dweight (N,) or None; dx includes ``dresidual`` (x's
    shape, the gradient of the forward's s, which is then ``x``) when given."""
    acc, n = _acc_dtype(x.dtype), x.shape[-1]
    dya = dy.reshape(-1, n).to(acc)
    xhat = x.reshape(-1, n).to(acc) * rstd[:, None]
    g = dya * (offset + weight.to(acc)) if weight is not None else dya
    dx = rstd[:, None] * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    if dresidual is not None:
        dx = dx + dresidual.reshape(-1, n).to(acc)
    dweight = (dya * xhat).sum(0).to(weight.dtype) if weight is not None else None
    return dx.to(x.dtype).view(x.shape), dweight


# ------------------------------------------------------------------ checks

def _valid_weight(t, n: int, x: torch.Tensor) -> bool:
    return t is None or (isinstance(t, torch.Tensor) and t.dtype == x.dtype and t.shape == (n,) and t.device == x.device)


def _check_inputs(x, weight, eps, offset, residual) -> None:
    # A valid call passes the few reads below (DESIGN.md "Host cost"); anything else goes through
    # the checks that name what is wrong.
    if (isinstance(x, torch.Tensor) and x.dtype in _DTYPES and x.dim() and x.shape[-1] and type(eps) is float
            and eps >= 0 and type(offset) is float and math.isfinite(offset) and _valid_weight(weight, x.shape[-1], x)
            and (residual is None or (isinstance(residual, torch.Tensor) and residual.shape == x.shape
                                      and residual.device == x.device and residual.dtype in (x.dtype, torch.float32)))):
        return
    op = "rms_norm"
    check_tensor(op, "x", x, min_ndim=1)
    check_tensor(op, "weight", weight, ndim=1, optional=True)
    check_tensor(op, "residual", residual, optional=True)
    n = x.shape[-1]
    if n == 0:
        raise ValueError(f"gptfast.{op}: the normalised dimension x.shape[-1] must be > 0, got shape {tuple(x.shape)}")
    check_shape(op, "weight", weight, (n,), "x.shape[-1]")
    check_shape(op, "residual", residual, tuple(x.shape), "x.shape")
    for name, t in (("weight", weight), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise ValueError(f"gptfast.{op}: {name} is on {t.device} but x is on {x.device}")
    if residual is not None and residual.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"gptfast.{op}: residual has dtype {residual.dtype}; it must be x's ({x.dtype}) "
                        "or float32 (a residual stream kept in fp32)")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"gptfast.{op}: eps must be a non-negative number (or None: x's dtype's machine "
                         f"epsilon), got {eps!r}")
    if isinstance(offset, bool) or not isinstance(offset, numbers.Real) or not math.isfinite(offset):
        raise ValueError(f"gptfast.{op}: offset must be a finite number (Gemma: 1.0), got {offset!r}")
    if autocast_dtype(x.device.type) is None:  # under autocast every float is cast to float32 first
        check_same(op, "x", x, weight=weight)


# ------------------------------------------------------------------ custom ops
# torch.library outputs cannot be None: an absent weight gradient travels as an empty tensor.

def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float, backend: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., N) contiguous -> y (x's shape), rstd (M,) for its M rows."""
    if x.numel() == 0:
        return _rms_norm_fwd_fake(x, weight, eps, offset, backend)
    launchers = _backend.resolve("rms_norm", x.device, x.dtype, backend or None)
    with autocast_off(x.device.type):
        return launchers.fwd(x, weight, eps, offset)


rms_norm_fwd_op = torch.library.custom_op("gptfast::rms_norm_fwd", _rms_norm_fwd, mutates_args=())


@rms_norm_fwd_op.register_fake
def _rms_norm_fwd_fake(x, weight, eps, offset, backend):
    return torch.empty_like(x), x.new_empty((math.prod(x.shape[:-1]),), dtype=_acc_dtype(x.dtype))


def _rms_norm_residual_fwd(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float,
                           offset: float, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual (..., N) contiguous, one dtype -> y, rstd of s = x + residual, and s (x's shape)."""
    if x.numel() == 0:
        return _rms_norm_residual_fwd_fake(x, residual, weight, eps, offset, backend)
    launchers = _backend.resolve("rms_norm", x.device, x.dtype, backend or None)
    with autocast_off(x.device.type):
        return launchers.fwd(x, weight, eps, offset, residual=residual)


rms_norm_residual_fwd_op = torch.library.custom_op("gptfast::rms_norm_residual_fwd", _rms_norm_residual_fwd,
                                                   mutates_args=())


@rms_norm_residual_fwd_op.register_fake
def _rms_norm_residual_fwd_fake(x, residual, weight, eps, offset, backend):
    return (*_rms_norm_fwd_fake(x, weight, eps, offset, backend), torch.empty_like(x))


def _rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor,
                  offset: float, dresidual: torch.Tensor | None, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """dx (x's shape, plus ``dresidual`` when given), dweight (N,) or empty."""
    if x.numel() == 0:
        dx, dw = _rms_norm_bwd_fake(dy, x, weight, rstd, offset, dresidual, backend)
        return dx, dw.zero_()
    launchers = _backend.resolve("rms_norm", x.device, x.dtype, backend or None)
    extra = {} if dresidual is None else {"dresidual": dresidual}
    with autocast_off(x.device.type):
        dx, dw = launchers.bwd(dy, x, weight, rstd, offset, **extra)
    return dx, x.new_empty((0,)) if dw is None else dw


rms_norm_bwd_op = torch.library.custom_op("gptfast::rms_norm_bwd", _rms_norm_bwd, mutates_args=())


@rms_norm_bwd_op.register_fake
def _rms_norm_bwd_fake(dy, x, weight, rstd, offset, dresidual, backend):
    return torch.empty_like(x), torch.empty_like(weight) if weight is not None else x.new_empty((0,))


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, eps, offset, backend = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.offset, ctx.backend = offset, backend
    ctx.set_materialize_grads(False)  # rstd's gradient is never used: no zero tensor for it


def _rms_norm_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dy = torch.zeros_like(x) if dy is None else dy.contiguous()
    dx, dw = run_plain(rms_norm_bwd_op, _rms_norm_bwd, dy, x, weight, rstd, ctx.offset, None, ctx.backend)
    return dx, dw if weight is not None else None, None, None, None


def _rms_norm_residual_setup_context(ctx, inputs, output):
    x, residual, weight, eps, offset, backend = inputs
    _, rstd, s = output
    ctx.save_for_backward(s, weight, rstd)  # the normalised input is s: x and r are not kept
    ctx.offset, ctx.backend = offset, backend
    ctx.set_materialize_grads(False)  # an unused s (prenorm=False) costs no zero tensor


def _rms_norm_residual_backward(ctx, dy, _drstd, ds):
    s, weight, rstd = ctx.saved_tensors
    dy = torch.zeros_like(s) if dy is None else dy.contiguous()
    ds = None if ds is None else ds.contiguous()
    dx, dw = run_plain(rms_norm_bwd_op, _rms_norm_bwd, dy, s, weight, rstd, ctx.offset, ds, ctx.backend)
    return dx, dx, dw if weight is not None else None, None, None, None  # s = x + r: both get ds


rms_norm_fwd_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup_context)
rms_norm_residual_fwd_op.register_autograd(_rms_norm_residual_backward, setup_context=_rms_norm_residual_setup_context)
_RMSNormFunction = autograd_function("_RMSNormFunction", _rms_norm_fwd, _rms_norm_setup_context, _rms_norm_backward)
_RMSNormResidualFunction = autograd_function("_RMSNormResidualFunction", _rms_norm_residual_fwd,
                                             _rms_norm_residual_setup_context, _rms_norm_residual_backward)


# ------------------------------------------------------------------ public function

def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float | None = 1e-6, *, offset: float = 0.0,
             residual: torch.Tensor | None = None, prenorm: bool = False, residual_in_fp32: bool = False,
             backend: str | None = None):
    """Fused RMSNorm over the last dimension: ``x / sqrt(mean(x^2) + eps) * (offset + weight)``, the
    same function as ``F.rms_norm(x, (x.shape[-1],), weight, eps)`` (offset 0) and as the HF Llama /
    Mistral / Qwen2 (offset 0) and Gemma (offset 1) RMSNorm modules; with ``residual``, of
    ``x + residual`` in one pass (FlashAttention's ``rms_norm_fn(x, weight, None, residual=...)``).

    Args:
        x: (..., N), float16 / bfloat16 / float32 (float64 on the reference and cpu backends), any
            strides.
        weight: (N,) in x's dtype and device, or None (no scale).
        eps: added to the mean square, >= 0; None: ``torch.finfo(x.dtype).eps`` (torch.nn.RMSNorm's
            default).
        offset: added to the weight (Gemma stores its scale as weight - 1: offset 1.0).
        residual: x's shape, in x's dtype or float32, or None: normalise s = x + residual (rounded
            to the stream's dtype) instead of x. A pre-norm block's ``h = x + attn(norm(x))`` then
            ``norm2(h)`` becomes ``y, h = rms_norm(a, w, residual=x, prenorm=True)``.
        prenorm: also return the residual stream s (x itself when ``residual`` is None).
        residual_in_fp32: keep the stream s in float32 when x is 16-bit (s is then float32 and y is
            still x's dtype).
        backend: see :func:`gptfast.attention`.

    Returns:
        y (..., N) in x's dtype, or ``(y, s)`` with ``prenorm``. Under ``torch.autocast`` the op runs
        and returns in float32, as gptfast.layer_norm does. The statistic is accumulated in fp32.
    """
    if eps is None and isinstance(x, torch.Tensor) and x.is_floating_point():
        eps = torch.finfo(x.dtype).eps
    if type(eps) is int:
        eps = float(eps)
    if type(offset) is int:
        offset = float(offset)
    _check_inputs(x, weight, eps, offset, residual)
    if autocast_dtype(x.device.type) is not None:
        x, weight, residual = cast_floats(torch.float32, x, weight, residual)
    name = "" if backend is None else _backend.checked_name(backend)
    weight = None if weight is None else weight.contiguous()
    if residual is None:
        y = run_op(rms_norm_fwd_op, _RMSNormFunction, _rms_norm_fwd, x.contiguous(), weight, float(eps),
                   float(offset), name)[0]
        if not prenorm:
            return y
        return y, x.to(torch.float32) if residual_in_fp32 else x
    out_dtype = x.dtype
    stream = torch.float32 if residual_in_fp32 or residual.dtype == torch.float32 else x.dtype
    if stream != x.dtype:  # a 16-bit x on a float32 stream: the kernels take one dtype
        x, weight, residual = cast_floats(stream, x, weight, residual)
    elif residual.dtype != stream:
        residual = residual.to(stream)
    y, _, s = run_op(rms_norm_residual_fwd_op, _RMSNormResidualFunction, _rms_norm_residual_fwd, x.contiguous(),
                     residual.contiguous(), weight, float(eps), float(offset), name)
    y = y.to(out_dtype)
    return (y, s) if prenorm else y
