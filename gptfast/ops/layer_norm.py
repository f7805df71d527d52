"""LayerNorm over the last dimension: y = (x - mean) * rstd * weight + bias, rstd = 1/sqrt(var + eps).

Statistics are computed in fp32 (biased variance, as ``F.layer_norm``). Saved for backward:
x, weight, and the per-row fp32 mean and rstd. With xhat = (x - mean) * rstd and
g = dy * weight, the backward is

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))       (means over the row)
    dweight = sum_rows(dy * xhat),   dbias = sum_rows(dy).

This file holds, in order: the ground truth ``layer_norm_ref``, the reference backend's launchers,
input checks, the custom ops with their autograd formula, and the public function.
"""
from __future__ import annotations

import math
import numbers

import torch

from . import _backend
from ._common import (SUPPORTED_DTYPES, autocast_dtype, autocast_off, autograd_function, cast_floats, check_same,
                      check_shape, check_tensor, run_plain, run_op)

__all__ = ["layer_norm", "layer_norm_ref", "layer_norm_fwd_op", "layer_norm_residual_fwd_op", "layer_norm_bwd_op"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float = 1e-5, upcast: bool = True) -> torch.Tensor:
    """Ground truth from plain differentiable ops; fp32 math (fp64 for fp64) when ``upcast``."""
    dtype = x.dtype
    if upcast:
        x, weight, bias = cast_floats(_acc_dtype(dtype), x, weight, bias)
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(dtype)


def layer_norm_forward_reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                                 eps: float, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Reference launcher: x (..., N) -> y (..., N) in x.dtype, mean (M,), rstd (M,) in fp32, M the
    rows of x; with ``residual`` (x's shape), of s = x + residual rounded to x.dtype, and s as a
    fourth output."""
    if x.dim() != 2:
        out = _forward_reference_2d(x.reshape(-1, x.shape[-1]), weight, bias, eps,
                                    None if residual is None else residual.reshape(-1, x.shape[-1]))
        return tuple(t.view(x.shape) if t.dim() == 2 else t for t in out)
    return _forward_reference_2d(x, weight, bias, eps, residual)


def _forward_reference_2d(x, weight, bias, eps, residual):
    if residual is not None:
        s = (x.to(_acc_dtype(x.dtype)) + residual.to(_acc_dtype(x.dtype))).to(x.dtype)
        return (*_normalise_reference(s, weight, bias, eps), s)
    return _normalise_reference(x, weight, bias, eps)


def _normalise_reference(x, weight, bias, eps):
    acc = _acc_dtype(x.dtype)
    xa = x.to(acc)
    mean = xa.mean(-1)
    rstd = torch.rsqrt((xa - mean[:, None]).pow(2).mean(-1) + eps)
    y = (xa - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), mean, rstd


def layer_norm_backward_reference(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                                  mean: torch.Tensor, rstd: torch.Tensor, has_bias: bool,
                                  dresidual: torch.Tensor | None = None):
    """Reference launcher: returns dx (x's shape (..., N)), dweight (N,) or None, dbias (N,) or
    None; dx includes ``dresidual`` (x's shape), the residual stream's gradient, when given."""
    if x.dim() != 2:
        n = x.shape[-1]
        dx, dw, db = layer_norm_backward_reference(dy.reshape(-1, n), x.reshape(-1, n), weight, mean, rstd,
                                                   has_bias, None if dresidual is None else dresidual.reshape(-1, n))
        return dx.view(x.shape), dw, db
    acc = _acc_dtype(x.dtype)
    dya = dy.to(acc)
    xhat = (x.to(acc) - mean[:, None]) * rstd[:, None]
    g = dya * weight.to(acc) if weight is not None else dya
    dx = rstd[:, None] * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    if dresidual is not None:
        dx = dx + dresidual.to(acc)
    dweight = (dya * xhat).sum(0).to(weight.dtype) if weight is not None else None
    dbias = dya.sum(0).to(x.dtype) if has_bias else None
    return dx.to(x.dtype), dweight, dbias


_DTYPES = frozenset(SUPPORTED_DTYPES)


def _valid_vector(t, n: int, x: torch.Tensor) -> bool:
    return t is None or (isinstance(t, torch.Tensor) and t.dtype == x.dtype and t.shape == (n,) and t.device == x.device)


def _check_inputs(x, weight, bias, eps, residual) -> None:
    # A valid call passes the few reads below (this runs on every call: DESIGN.md "Host cost");
    # anything else goes through the checks that name what is wrong.
    if (isinstance(x, torch.Tensor) and x.dtype in _DTYPES and x.dim() and x.shape[-1] and type(eps) is float
            and eps >= 0 and _valid_vector(weight, x.shape[-1], x) and _valid_vector(bias, x.shape[-1], x)
            and (residual is None or (isinstance(residual, torch.Tensor) and residual.shape == x.shape
                                      and residual.device == x.device and residual.dtype in (x.dtype, torch.float32)))):
        return
    op = "layer_norm"
    check_tensor(op, "x", x, min_ndim=1)
    check_tensor(op, "weight", weight, ndim=1, optional=True)
    check_tensor(op, "bias", bias, ndim=1, optional=True)
    check_tensor(op, "residual", residual, optional=True)
    n = x.shape[-1]
    if n == 0:
        raise ValueError(f"gptfast.{op}: the normalised dimension x.shape[-1] must be > 0, got shape {tuple(x.shape)}")
    check_shape(op, "weight", weight, (n,), "x.shape[-1]")
    check_shape(op, "bias", bias, (n,), "x.shape[-1]")
    check_shape(op, "residual", residual, tuple(x.shape), "x.shape")
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise ValueError(f"gptfast.{op}: {name} is on {t.device} but x is on {x.device}")
    if residual is not None and residual.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"gptfast.{op}: residual has dtype {residual.dtype}; it must be x's ({x.dtype}) "
                        "or float32 (a residual stream kept in fp32)")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"gptfast.{op}: eps must be a non-negative number, got {eps!r}")
    if autocast_dtype(x.device.type) is None:  # under autocast every float is cast to float32 first
        check_same(op, "x", x, weight=weight, bias=bias)


# Custom ops (see attention.py for why). torch.library outputs cannot be None, so an absent
# weight/bias gradient travels as an empty tensor and becomes None in the autograd formula.
def _layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., N) contiguous -> y (..., N), mean (M,), rstd (M,) for its M rows (the launchers take
    the leading dimensions: no Python view before or after the kernel, DESIGN.md "Host cost")."""
    if x.numel() == 0:
        return _layer_norm_fwd_fake(x, weight, bias, eps, backend)
    launchers = _backend.resolve("layer_norm", x.device, x.dtype, backend or None)
    with autocast_off(x.device.type):
        return launchers.fwd(x, weight, bias, eps)


layer_norm_fwd_op = torch.library.custom_op("gptfast::layer_norm_fwd", _layer_norm_fwd, mutates_args=())


@layer_norm_fwd_op.register_fake
def _layer_norm_fwd_fake(x, weight, bias, eps, backend):
    stats = x.new_empty((math.prod(x.shape[:-1]),), dtype=_acc_dtype(x.dtype))
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _layer_norm_residual_fwd(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                             bias: torch.Tensor | None, eps: float, backend: str
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual (..., N) contiguous, one dtype -> y, mean, rstd of s = x + residual, and s (x's shape)."""
    if x.numel() == 0:
        return _layer_norm_residual_fwd_fake(x, residual, weight, bias, eps, backend)
    launchers = _backend.resolve("layer_norm", x.device, x.dtype, backend or None)
    with autocast_off(x.device.type):
        return launchers.fwd(x, weight, bias, eps, residual=residual)


layer_norm_residual_fwd_op = torch.library.custom_op("gptfast::layer_norm_residual_fwd", _layer_norm_residual_fwd,
                                                     mutates_args=())


@layer_norm_residual_fwd_op.register_fake
def _layer_norm_residual_fwd_fake(x, residual, weight, bias, eps, backend):
    return (*_layer_norm_fwd_fake(x, weight, bias, eps, backend), torch.empty_like(x))


def _layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                    rstd: torch.Tensor, has_bias: bool, dresidual: torch.Tensor | None, backend: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx (x's shape, plus ``dresidual`` when given), dweight (N,) or empty, dbias (N,) or empty."""
    if x.numel() == 0:
        dx, dw, db = _layer_norm_bwd_fake(dy, x, weight, mean, rstd, has_bias, dresidual, backend)
        return dx, dw.zero_(), db.zero_()
    launchers = _backend.resolve("layer_norm", x.device, x.dtype, backend or None)
    # the keyword only when used: the plain form's launch is the same as without a residual
    extra = {} if dresidual is None else {"dresidual": dresidual}
    with autocast_off(x.device.type):
        dx, dw, db = launchers.bwd(dy, x, weight, mean, rstd, has_bias, **extra)
    return dx, _or_empty(dw, x), _or_empty(db, x)


def _or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,)) if t is None else t


layer_norm_bwd_op = torch.library.custom_op("gptfast::layer_norm_bwd", _layer_norm_bwd, mutates_args=())


@layer_norm_bwd_op.register_fake
def _layer_norm_bwd_fake(dy, x, weight, mean, rstd, has_bias, dresidual, backend):
    n = x.shape[-1]
    dw = torch.empty_like(weight) if weight is not None else x.new_empty((0,))
    return torch.empty_like(x), dw, x.new_empty((n,) if has_bias else (0,))


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, bias, eps, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias, ctx.backend = bias is not None, backend


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = run_plain(layer_norm_bwd_op, _layer_norm_bwd, dy.contiguous(), x, weight, mean, rstd, ctx.has_bias,
                           None, ctx.backend)
    return dx, dw if weight is not None else None, db if ctx.has_bias else None, None, None


def _layer_norm_residual_setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, backend = inputs
    _, mean, rstd, s = output
    ctx.save_for_backward(s, weight, mean, rstd)  # the normalised input is s: x and r are not kept
    ctx.has_bias, ctx.backend = bias is not None, backend
    ctx.set_materialize_grads(False)  # an unused s (prenorm=False) costs no zero tensor


def _layer_norm_residual_backward(ctx, dy, _dmean, _drstd, ds):
    s, weight, mean, rstd = ctx.saved_tensors
    dy = torch.zeros_like(s) if dy is None else dy.contiguous()
    ds = None if ds is None else ds.contiguous()
    dx, dw, db = run_plain(layer_norm_bwd_op, _layer_norm_bwd, dy, s, weight, mean, rstd, ctx.has_bias, ds,
                           ctx.backend)
    # s = x + r: both get the gradient of s
    return dx, dx, dw if weight is not None else None, db if ctx.has_bias else None, None, None


layer_norm_fwd_op.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup_context)
layer_norm_residual_fwd_op.register_autograd(_layer_norm_residual_backward,
                                             setup_context=_layer_norm_residual_setup_context)
_LayerNormFunction = autograd_function("_LayerNormFunction", _layer_norm_fwd, _layer_norm_setup_context,
                                       _layer_norm_backward)
_LayerNormResidualFunction = autograd_function("_LayerNormResidualFunction", _layer_norm_residual_fwd,
                                               _layer_norm_residual_setup_context, _layer_norm_residual_backward)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5, backend: str | None = None, *, residual: torch.Tensor | None = None,
               prenorm: bool = False, residual_in_fp32: bool = False):
    """Fused LayerNorm over the last dimension, the same function as
    ``F.layer_norm(x, (x.shape[-1],), weight, bias, eps)``; with ``residual``, of ``x + residual``
    in one pass (FlashAttention's ``layer_norm_fn(x, weight, bias, residual=...)``).

    Args:
        x: (..., N), float16 / bfloat16 / float32 (float64 on the reference backend), any strides.
        weight, bias: (N,) in x's dtype and device, or None (no scale / no shift).
        eps: added to the variance, >= 0.
        backend: see :func:`gptfast.attention`.
        residual: x's shape, in x's dtype or float32, or None: normalise the residual stream
            s = x + residual (rounded to the stream's dtype) instead of x. A pre-norm block's
            ``h = x + attn(ln(x))`` then ``ln2(h)`` becomes ``y, h = layer_norm(a, w, b,
            residual=x, prenorm=True)``: the add is fused into the LayerNorm's read and write.
        prenorm: also return the residual stream s (x itself when ``residual`` is None).
        residual_in_fp32: keep the stream s in float32 when x is 16-bit (s is then float32 and
            y is still x's dtype; the 16-bit inputs are upcast, an extra pass each).

    Returns:
        y (..., N) in x's dtype, or ``(y, s)`` with ``prenorm``: s (..., N) in the stream's dtype
        (float32 with ``residual_in_fp32`` or a float32 ``residual``, else x's). Under
        ``torch.autocast`` the op runs and returns in float32, as PyTorch's LayerNorm does.
        Statistics are always accumulated in fp32.
    """
    _check_inputs(x, weight, bias, eps, residual)
    if autocast_dtype(x.device.type) is not None:
        x, weight, bias, residual = cast_floats(torch.float32, x, weight, bias, residual)
    if residual is None:
        y = _layer_norm(x, weight, bias, eps, backend)
        if not prenorm:
            return y
        return y, x.to(torch.float32) if residual_in_fp32 else x
    out_dtype = x.dtype
    stream = torch.float32 if residual_in_fp32 or residual.dtype == torch.float32 else x.dtype
    if stream != x.dtype:  # a 16-bit x on a float32 stream: the kernels take one dtype
        x, weight, bias, residual = cast_floats(stream, x, weight, bias, residual)
    elif residual.dtype != stream:
        residual = residual.to(stream)
    y, _, _, s = run_op(layer_norm_residual_fwd_op, _LayerNormResidualFunction, _layer_norm_residual_fwd,
                        x.contiguous(), residual.contiguous(), _dense(weight), _dense(bias), float(eps),
                        _backend.checked_name(backend))
    y = y.to(out_dtype)
    return (y, s) if prenorm else y


def _dense(t: torch.Tensor | None) -> torch.Tensor | None:
    # Kernels read weight and bias as dense vectors (a strided or expanded one was read as if
    # dense: found by tests/test_fuzz.py); .contiguous() is free when they already are.
    return None if t is None else t.contiguous()


def _layer_norm(x, weight, bias, eps, backend) -> torch.Tensor:
    return run_op(layer_norm_fwd_op, _LayerNormFunction, _layer_norm_fwd, x.contiguous(), _dense(weight),
                  _dense(bias), float(eps), "" if backend is None else _backend.checked_name(backend))[0]
