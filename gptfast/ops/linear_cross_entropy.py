"""Fused linear + cross-entropy: ``F.cross_entropy(F.linear(x, weight, bias), targets, ...)``
without ever holding the (M, V) logits.

Rows are taken ``chunk_rows`` at a time. For one chunk the logits z = x_c W^T + b are one GEMM
into an fp32 (C, V) buffer; a backend's *logits epilogue* then turns that buffer, in place, into
its gradient and returns the per-row loss:

    z' = softcap * tanh(z / softcap)   (or z)
    loss = lse(z') - (1 - eps) z'_y - eps mean_j z'_j              (eps = label_smoothing)
    dz  = row_scale * (softmax(z') - (1 - eps) onehot(y) - eps / V) * (1 - (z'/softcap)^2)

(ignored rows, targets == ignore_index: loss 0, dz 0). Two more GEMMs finish the chunk:
dx_c = dz W, dW += dz^T x_c (fp32), db += sum dz. The GEMMs are torch's (MKL / cuBLAS) on every
backend; what the backends implement is the epilogue, one read and one write of the buffer
(``cross_entropy_logits_`` below, csrc/cpu, kernels/, csrc/cuda).

With reduction "mean" or "sum" the gradient of the reduced loss is computed in the forward (as
Liger-Kernel's fused linear cross-entropy does) and the backward only scales it by the incoming
gradient: peak extra memory is one chunk of logits plus dW in fp32, and the three GEMMs are the
ones eager PyTorch runs (logits forward, dx and dW backward). With "none" the forward computes
the losses only and the backward recomputes each chunk with every row's incoming gradient.

This file holds, in order: the ground truth, the reference epilogue, the chunk driver every
backend's launchers share, the reference launchers, input checks, the custom op with its
autograd formula, and the public function.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from . import _backend
from ._common import autocast_dtype, autocast_off, autograd_function, cast_floats, run_op, run_plain

__all__ = ["linear_cross_entropy", "linear_cross_entropy_ref", "cross_entropy_logits_reference", "make_launchers"]

REDUCTIONS = ("mean", "sum", "none")
_FLOATS = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
_TARGETS = frozenset((torch.int64, torch.int32))
# fp32 logits per chunk by default (2**25 elements = 128 MiB): large enough that the chunk GEMMs run
# at full speed, small against the (M, V) logits eager PyTorch keeps (8192 x 50304: 1.6 GB).
CHUNK_ELEMENTS = 1 << 25


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_cross_entropy_ref(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                             label_smoothing: float = 0.0, softcap: float | None = None) -> torch.Tensor:
    """Ground truth from plain differentiable ops: the full logits in fp32 (fp64 for fp64)."""
    acc = _acc_dtype(x.dtype)
    logits = F.linear(x.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction, label_smoothing=label_smoothing).view(
                               targets.shape if reduction == "none" else ())


# ------------------------------------------------------------------ the logits epilogue

def cross_entropy_logits_reference(z: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor | None,
                                   ignore_index: int, label_smoothing: float, softcap: float) -> torch.Tensor:
    """The epilogue contract every backend implements.

    z (C, V) fp32 (fp64 for fp64 inputs) contiguous logits, targets (C,) int64, row_scale (C,)
    of z's dtype or None; softcap 0.0 for none. Returns the losses (C,) in z's dtype (0 on rows
    whose target is ``ignore_index``); with ``row_scale``, z is overwritten by the gradient of
    sum(row_scale * losses) w.r.t. the raw logits (zero rows where ignored). Without it z's
    content afterwards is unspecified (a kernel may softcap it in place).
    """
    eps = label_smoothing
    valid = targets != ignore_index
    y = torch.where(valid, targets, torch.zeros_like(targets))[:, None]
    t = torch.tanh(z / softcap) if softcap else None
    zc = softcap * t if softcap else z
    lse = torch.logsumexp(zc, -1)
    loss = lse - (1 - eps) * zc.gather(1, y)[:, 0]
    if eps:
        loss = loss - eps * zc.mean(-1)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if row_scale is not None:
        g = torch.exp(zc - lse[:, None])
        g.scatter_add_(1, y, torch.full_like(loss[:, None], -(1 - eps)))
        if eps:
            g -= eps / z.shape[1]
        g *= torch.where(valid, row_scale, torch.zeros_like(row_scale))[:, None]
        if softcap:
            g *= 1 - t * t
        z.copy_(g)
    return loss


# ------------------------------------------------------------------ the chunk driver

def default_chunk_rows(m: int, v: int) -> int:
    return max(1, min(m, CHUNK_ELEMENTS // max(v, 1)))


def chunked_linear_cross_entropy(epilogue, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 targets: torch.Tensor, ignore_index: int, label_smoothing: float, softcap: float,
                                 row_scale: torch.Tensor | None, chunk_rows: int):
    """x (M, K), weight (V, K), bias (V,) or None, targets (M,) int64, row_scale (M,) or None ->
    losses (M,) fp32 (fp64 for fp64) and, with ``row_scale``, the gradients of sum(row_scale *
    losses): dx (M, K) in x.dtype, dweight (V, K) and dbias (V,) in weight's dtype (accumulated in
    fp32), else None for all three. One (chunk, V) fp32 buffer is live at a time."""
    m, v = x.shape[0], weight.shape[0]
    acc = _acc_dtype(x.dtype)
    chunk = chunk_rows if chunk_rows > 0 else default_chunk_rows(m, v)
    wide = x.dtype == acc  # fp32 / fp64: the GEMMs write straight into the fp32 buffers
    wt = weight.t()
    grads = row_scale is not None
    losses = torch.empty(m, dtype=acc, device=x.device)
    dx = torch.empty_like(x) if grads else None
    dw = torch.zeros((v, x.shape[1]), dtype=acc, device=x.device) if grads else None
    db = torch.zeros(v, dtype=acc, device=x.device) if grads and bias is not None else None
    buf = torch.empty((min(chunk, m), v), dtype=acc, device=x.device) if wide else None
    ba = None if bias is None else bias.to(acc)
    for start in range(0, m, chunk):
        end = min(m, start + chunk)
        xc = x[start:end]
        if wide:
            z = buf[:end - start]
            torch.mm(xc, wt, out=z)
        else:  # 16-bit: the GEMM in the inputs' dtype (as F.linear), the epilogue in fp32
            z = torch.mm(xc, wt).to(acc)
        if ba is not None:
            z += ba
        losses[start:end] = epilogue(z, targets[start:end], None if row_scale is None else row_scale[start:end],
                                     ignore_index, label_smoothing, softcap)
        if not grads:
            continue
        if wide:
            torch.mm(z, weight, out=dx[start:end])
            dw.addmm_(z.t(), xc)
        else:
            dz = z.to(x.dtype)
            torch.mm(dz, weight, out=dx[start:end])
            dw += torch.mm(dz.t(), xc)
        if db is not None:
            db += z.sum(0)
    if not grads:
        return losses, None, None, None
    return losses, dx, dw.to(weight.dtype), None if db is None else db.to(bias.dtype)


def make_launchers(epilogue):
    """(forward, backward) launchers of the linear_cross_entropy contract around ``epilogue``:

        linear_cross_entropy_forward(x, weight, bias, targets, ignore_index, label_smoothing,
                                     softcap, row_scale, chunk_rows)
            -> losses (M,), dx | None, dweight | None, dbias | None
        linear_cross_entropy_backward(row_scale, x, weight, bias, targets, ignore_index,
                                      label_smoothing, softcap, chunk_rows)
            -> dx, dweight, dbias | None
    """
    def forward(x, weight, bias, targets, ignore_index, label_smoothing, softcap, row_scale, chunk_rows):
        return chunked_linear_cross_entropy(epilogue, x, weight, bias, targets, ignore_index, label_smoothing,
                                            softcap, row_scale, chunk_rows)

    def backward(row_scale, x, weight, bias, targets, ignore_index, label_smoothing, softcap, chunk_rows):
        return chunked_linear_cross_entropy(epilogue, x, weight, bias, targets, ignore_index, label_smoothing,
                                            softcap, row_scale, chunk_rows)[1:]

    return forward, backward


linear_cross_entropy_forward_reference, linear_cross_entropy_backward_reference = make_launchers(
    cross_entropy_logits_reference)


# ------------------------------------------------------------------ checks

def _check_inputs(x, weight, targets, bias, ignore_index, reduction, label_smoothing, softcap) -> None:
    op = "linear_cross_entropy"
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS or x.dim() < 1:
        raise TypeError(f"gptfast.{op}: x must be a floating-point tensor (..., K), got "
                        f"{type(x).__name__ if not isinstance(x, torch.Tensor) else (x.dtype, tuple(x.shape))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.shape[0] < 1:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"gptfast.{op}: weight must be (V, {x.shape[-1]}) (V >= 1, x.shape[-1] columns, "
                         f"the lm_head's nn.Linear layout), got {shape}")
    v = weight.shape[0]
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (v,)):
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"gptfast.{op}: bias must be ({v},) (weight.shape[0]) or None, got {shape}")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in _TARGETS:
        what = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise TypeError(f"gptfast.{op}: targets must be an int64 (or int32) tensor of class indices, got {what}")
    if tuple(targets.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"gptfast.{op}: targets must have x's leading shape {tuple(x.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("targets", targets)):
        if t is not None and t.device != x.device:
            raise ValueError(f"gptfast.{op}: {name} is on {t.device} but x is on {x.device}")
    if autocast_dtype(x.device.type) is None:
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.dtype != x.dtype:
                raise TypeError(f"gptfast.{op}: {name} has dtype {t.dtype} but x has {x.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"gptfast.{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"gptfast.{op}: ignore_index must be an int, got {ignore_index!r}")
    if (isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real)
            or not 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"gptfast.{op}: label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, numbers.Real)
                                or not (softcap > 0 and math.isfinite(softcap))):
        raise ValueError(f"gptfast.{op}: softcap must be a positive finite number or None, got {softcap!r}")


def _check_target_range(targets: torch.Tensor, v: int, ignore_index: int) -> None:
    # Inside the op (not traced): one reduction over M integers, and on a GPU one sync per call,
    # in exchange for an error instead of an out-of-bounds read in a kernel.
    bad = ((targets < 0) | (targets >= v)) & (targets != ignore_index)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise IndexError(f"gptfast.linear_cross_entropy: targets[{i}] = {int(targets[i])} is outside [0, {v}) "
                         f"and is not ignore_index ({ignore_index})")


# ------------------------------------------------------------------ custom op

def _empty(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((0,))


def _lce_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
             ignore_index: int, reduction: str, label_smoothing: float, softcap: float, grads: bool,
             chunk_rows: int, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) contiguous, targets (M,) int64 -> loss ((M,) for "none", () otherwise; fp32, fp64
    for fp64) and, with ``grads`` (mean/sum only), the gradients of that loss w.r.t. x, weight and
    bias (empty tensors otherwise, and for an absent bias)."""
    m, v = x.shape[0], weight.shape[0]
    acc = _acc_dtype(x.dtype)
    _check_target_range(targets, v, ignore_index)
    valid = targets != ignore_index
    row_scale = None
    if grads:
        row_scale = valid.to(acc)
        if reduction == "mean":
            row_scale = row_scale / valid.sum()
    if m == 0:
        losses, dx, dw, db = (x.new_zeros((0,), dtype=acc), torch.zeros_like(x), torch.zeros_like(weight),
                              None if bias is None else torch.zeros_like(bias))
    else:
        launchers = _backend.resolve("linear_cross_entropy", x.device, x.dtype, backend or None)
        with autocast_off(x.device.type):
            losses, dx, dw, db = launchers.fwd(x, weight, bias, targets, ignore_index, label_smoothing, softcap,
                                               row_scale, chunk_rows)
    if reduction == "none":
        loss = losses
    else:
        loss = losses.sum()
        if reduction == "mean":
            loss = loss / valid.sum()
    if not grads:
        return loss, _empty(x), _empty(x), _empty(x)
    return loss, dx, dw, _empty(x) if db is None else db


lce_fwd_op = torch.library.custom_op("gptfast::linear_cross_entropy_fwd", _lce_fwd, mutates_args=())


@lce_fwd_op.register_fake
def _lce_fwd_fake(x, weight, bias, targets, ignore_index, reduction, label_smoothing, softcap, grads,
                  chunk_rows, backend):
    acc = _acc_dtype(x.dtype)
    loss = x.new_empty((x.shape[0],) if reduction == "none" else (), dtype=acc)
    if not grads:
        return loss, _empty(x), _empty(x), _empty(x)
    return loss, torch.empty_like(x), torch.empty_like(weight), _empty(x) if bias is None else torch.empty_like(bias)


def _lce_bwd(row_scale: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             targets: torch.Tensor, ignore_index: int, label_smoothing: float, softcap: float, chunk_rows: int,
             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduction "none": the gradients of sum(row_scale * losses); dbias empty without a bias."""
    if x.shape[0] == 0:
        return torch.zeros_like(x), torch.zeros_like(weight), _empty(x) if bias is None else torch.zeros_like(bias)
    launchers = _backend.resolve("linear_cross_entropy", x.device, x.dtype, backend or None)
    with autocast_off(x.device.type):
        dx, dw, db = launchers.bwd(row_scale, x, weight, bias, targets, ignore_index, label_smoothing, softcap,
                                   chunk_rows)
    return dx, dw, _empty(x) if db is None else db


lce_bwd_op = torch.library.custom_op("gptfast::linear_cross_entropy_bwd", _lce_bwd, mutates_args=())


@lce_bwd_op.register_fake
def _lce_bwd_fake(row_scale, x, weight, bias, targets, ignore_index, label_smoothing, softcap, chunk_rows, backend):
    return torch.empty_like(x), torch.empty_like(weight), _empty(x) if bias is None else torch.empty_like(bias)


def _lce_setup_context(ctx, inputs, output):
    x, weight, bias, targets, ignore_index, reduction, label_smoothing, softcap, grads, chunk_rows, backend = inputs
    ctx.reduction, ctx.has_bias = reduction, bias is not None
    ctx.args = (ignore_index, label_smoothing, softcap, chunk_rows, backend)
    if reduction == "none":
        ctx.save_for_backward(x, weight, bias, targets)
    else:  # the gradients were computed in the forward; only they are kept
        ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _lce_backward(ctx, dloss, *_):
    if dloss is None:
        return (None,) * 11
    if ctx.reduction == "none":
        x, weight, bias, targets = ctx.saved_tensors
        ignore_index, label_smoothing, softcap, chunk_rows, backend = ctx.args
        row_scale = dloss.to(_acc_dtype(x.dtype)).contiguous()
        dx, dw, db = run_plain(lce_bwd_op, _lce_bwd, row_scale, x, weight, bias, targets, ignore_index,
                               label_smoothing, softcap, chunk_rows, backend)
    else:
        dx, dw, db = ctx.saved_tensors
        if dx.numel() == 0 and dw.numel() == 0:
            raise RuntimeError("gptfast.linear_cross_entropy: the forward ran without gradients (no input "
                               "required grad then) but a backward was asked for")
        dx, dw, db = ((t * dloss).to(t.dtype) for t in (dx, dw, db))
    return dx, dw, db if ctx.has_bias else None, None, None, None, None, None, None, None, None


lce_fwd_op.register_autograd(_lce_backward, setup_context=_lce_setup_context)
_LinearCrossEntropyFunction = autograd_function("_LinearCrossEntropyFunction", _lce_fwd, _lce_setup_context,
                                                _lce_backward)


# ------------------------------------------------------------------ public function

def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, softcap: float | None = None, *,
                         chunk_rows: int | None = None, backend: str | None = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(x, weight, bias), targets, ignore_index=..., reduction=...,
    label_smoothing=...)`` (the logits softcapped first, ``softcap * tanh(logits / softcap)``, when
    ``softcap`` is given: Gemma-2's final_logit_softcapping) without the (M, V) logits: rows are
    processed ``chunk_rows`` at a time and, for "mean" / "sum", the gradients are computed chunk by
    chunk in the forward (see the module docstring).

    Args:
        x: (..., K) hidden states, float16 / bfloat16 / float32 (float64 on the reference and cpu
            backends), any strides.
        weight: (V, K), the lm_head's weight in nn.Linear layout, x's dtype and device.
        targets: x's leading shape, int64 (or int32) class indices in [0, V) or ``ignore_index``.
        bias: (V,) or None.
        ignore_index: rows with this target contribute no loss and no gradient.
        reduction: "mean" (over the rows that count; NaN when none does, as F.cross_entropy),
            "sum", or "none" (x's leading shape, 0 on ignored rows).
        label_smoothing: in [0, 1], F.cross_entropy's.
        softcap: a positive number, or None.
        chunk_rows: rows per chunk; default: 2**25 / V (128 MiB of fp32 logits).
        backend: see :func:`gptfast.attention`.

    Returns:
        The loss in fp32 (fp64 for fp64 inputs; also under autocast, where the GEMMs run in the
        autocast dtype as F.linear's would): a 0-d tensor, or x's leading shape for "none".
    """
    _check_inputs(x, weight, targets, bias, ignore_index, reduction, label_smoothing, softcap)
    if isinstance(chunk_rows, bool) or not (chunk_rows is None or (isinstance(chunk_rows, int) and chunk_rows > 0)):
        raise ValueError(f"gptfast.linear_cross_entropy: chunk_rows must be a positive int or None, got {chunk_rows!r}")
    cast = autocast_dtype(x.device.type)
    if cast is not None:
        x, weight, bias = cast_floats(cast, x, weight, bias)
    name = "" if backend is None else _backend.checked_name(backend)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    t = targets.reshape(-1).to(torch.int64).contiguous()
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    grads = reduction != "none" and torch.is_grad_enabled() and any(
        p is not None and p.requires_grad for p in (x, weight, bias))
    loss = run_op(lce_fwd_op, _LinearCrossEntropyFunction, _lce_fwd, x2, weight, bias, t, int(ignore_index),
                  reduction, float(label_smoothing), float(softcap or 0.0), grads, int(chunk_rows or 0), name)[0]
    return loss.view(lead) if reduction == "none" else loss
