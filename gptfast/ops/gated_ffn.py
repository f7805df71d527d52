"""The Llama-family gated feed-forward block (SwiGLU / GeGLU), weights in nn.Linear layout:

    out = (act(x w_gate^T + b_gate) * (x w_up^T + b_up)) w_down^T + b_down

act is SiLU (Llama, Mistral, Qwen: SwiGLU), the tanh GELU (Gemma: GeGLU) or the exact erf GELU.
With ``w_up=None``, ``w_gate`` is one fused (2H, K) gate_up weight (Phi-3): its first H rows are
the gate, its last H the up projection; the op splits it (and a (2H,) ``b_gate``) into row-slice
views, so autograd sums both halves' gradients into the fused weight.

Saved for backward: x and the two projections g = x w_gate^T + b_gate, u = x w_up^T + b_up; the
product a = act(g) * u -- as large as g -- is recomputed in the backward instead of stored, so the
block keeps two (M, H) tensors alive where eager PyTorch keeps four (g, u, act(g), a). With
da = dout w_down,

    dw_down = dout^T a,        db_down = sum_rows(dout),
    dg = da * u * act'(g),     du = da * act(g),
    dw_gate = dg^T x,          dw_up = du^T x,          db_gate, db_up = sum_rows(dg), sum_rows(du),
    dx = dg w_gate + du w_up.

Matmuls run in the input dtype (as ``F.linear`` does); act, act' and the products in fp32 (fp64
for fp64), each result rounded once. SiLU(g) = g sigmoid(g), SiLU'(g) = s (1 + g (1 - s)) with
s = sigmoid(g); the GELUs and their derivatives are gptfast.ops.gelu_ffn's ``gelu``/``gelu_grad``.
This file holds, in order: the ground truth ``gated_ffn_ref``, the activations and their
derivatives, the reference backend's launchers, input checks, the custom ops with their autograd
formula and the public function.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _backend
from ._common import (autocast_dtype, autocast_off, autograd_function, cast_floats, check_same, check_shape,
                      check_tensor, run_op, run_plain)
from .gelu_ffn import gelu, gelu_grad

__all__ = ["gated_ffn", "gated_ffn_ref", "gated_ffn_fwd_op", "gated_ffn_bwd_op", "activation", "activation_grad",
           "ACTIVATIONS"]

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")


def _torch_act(g: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return F.silu(g)
    return F.gelu(g, approximate="tanh" if act == "gelu_tanh" else "none")


def gated_ffn_ref(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor | None, w_down: torch.Tensor,
                  activation: str = "silu", b_gate: torch.Tensor | None = None, b_up: torch.Tensor | None = None,
                  b_down: torch.Tensor | None = None) -> torch.Tensor:
    """Ground truth from PyTorch built-ins, in the inputs' dtype (upcast the inputs for fp64 truth);
    ``w_up=None``: ``w_gate`` (and ``b_gate``) is the fused [gate; up] weight, split with ``chunk``."""
    if w_up is None:
        w_gate, w_up = w_gate.chunk(2, 0)
        if b_gate is not None:
            b_gate, b_up = b_gate.chunk(2, 0)
    return F.linear(_torch_act(F.linear(x, w_gate, b_gate), activation) * F.linear(x, w_up, b_up), w_down, b_down)


def activation(g: torch.Tensor, act: str) -> torch.Tensor:
    """act(g) by the formula every backend follows, evaluated in g's dtype (callers pass fp32/fp64)."""
    if act == "silu":
        return g * torch.sigmoid(g)
    return gelu(g, "tanh" if act == "gelu_tanh" else "none")


def activation_grad(g: torch.Tensor, act: str) -> torch.Tensor:
    """d act(g) / dg, evaluated in g's dtype."""
    if act == "silu":
        s = torch.sigmoid(g)
        return s * (1.0 + g * (1.0 - s))
    return gelu_grad(g, "tanh" if act == "gelu_tanh" else "none")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------ reference launchers
# act(g) and the dg product go through PyTorch's fused elementwise kernels (F.silu, F.gelu,
# aten.silu_backward / gelu_backward: the formulas of activation()/activation_grad() above, which
# the tests check they agree with) instead of ~10 temporaries each: the reference backend is what
# runs on a CPU without a native build, so its speed matters.

def _act_backward(grad: torch.Tensor, g: torch.Tensor, act: str) -> torch.Tensor:
    """grad * act'(g)."""
    if act == "silu":
        return torch.ops.aten.silu_backward(grad, g)
    return torch.ops.aten.gelu_backward(grad, g, approximate="tanh" if act == "gelu_tanh" else "none")


def gated_ffn_forward_reference(x, w_gate, b_gate, w_up, b_up, w_down, b_down, activation: str):
    """Reference launcher: x (M, K) -> out (M, N), g (M, H), u (M, H), all in x.dtype."""
    acc = _acc_dtype(x.dtype)
    g = F.linear(x, w_gate, b_gate)
    u = F.linear(x, w_up, b_up)
    a = (_torch_act(g.to(acc), activation) * u.to(acc)).to(x.dtype)
    return F.linear(a, w_down, b_down), g, u


def gated_ffn_backward_reference(dout, x, g, u, w_gate, w_up, w_down, has_b_gate: bool, has_b_up: bool,
                                 has_b_down: bool, activation: str):
    """Reference launcher: returns dx, dw_gate, db_gate or None, dw_up, db_up or None, dw_down, db_down or None."""
    acc = _acc_dtype(x.dtype)
    ga, ua = g.to(acc), u.to(acc)
    act_g = _torch_act(ga, activation)
    a = (act_g * ua).to(x.dtype)                                    # recomputed, never saved
    dw_down = dout.t() @ a                                          # (N, H)
    del a
    db_down = dout.sum(0, dtype=acc).to(x.dtype) if has_b_down else None
    da = (dout @ w_down).to(acc)                                    # (M, H)
    du = (da * act_g).to(x.dtype)
    del act_g
    dg = _act_backward(da * ua, ga, activation).to(x.dtype)
    del da
    dw_gate = dg.t() @ x                                            # (H, K)
    dw_up = du.t() @ x
    db_gate = dg.sum(0, dtype=acc).to(x.dtype) if has_b_gate else None
    db_up = du.sum(0, dtype=acc).to(x.dtype) if has_b_up else None
    dx = torch.addmm(dg @ w_gate, du, w_up)                         # (M, K)
    return dx, dw_gate, db_gate, dw_up, db_up, dw_down, db_down


# ------------------------------------------------------------------ checks

def _check_inputs(x, w_gate, w_up, w_down, act, b_gate, b_up, b_down) -> None:
    op = "gated_ffn"
    check_tensor(op, "x", x, min_ndim=1)
    check_tensor(op, "w_gate", w_gate, ndim=2)
    check_tensor(op, "w_up", w_up, ndim=2, optional=True)
    check_tensor(op, "w_down", w_down, ndim=2)
    check_tensor(op, "b_gate", b_gate, ndim=1, optional=True)
    check_tensor(op, "b_up", b_up, ndim=1, optional=True)
    check_tensor(op, "b_down", b_down, ndim=1, optional=True)
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise ValueError(f"gptfast.{op}: activation must be one of {ACTIVATIONS}, got {act!r}")
    k, n = x.shape[-1], w_down.shape[0]
    if w_gate.shape[1] != k:
        raise ValueError(f"gptfast.{op}: w_gate must have shape ({'2*' if w_up is None else ''}hidden, in_features) "
                         f"= (..., {k}) in nn.Linear layout to match x.shape[-1]={k}, got {tuple(w_gate.shape)}")
    if w_up is None:  # one fused (2H, K) gate_up weight
        if w_gate.shape[0] % 2:
            raise ValueError(f"gptfast.{op}: with w_up=None, w_gate is the fused gate_up weight (2*hidden, "
                             f"in_features) and needs an even number of rows, got {tuple(w_gate.shape)}")
        if b_up is not None:
            raise ValueError(f"gptfast.{op}: b_up must be None when w_up is None (the fused gate_up weight's "
                             f"bias is b_gate, of shape (2*hidden,))")
        hidden = w_gate.shape[0] // 2
        check_shape(op, "b_gate", b_gate, (2 * hidden,), "2*hidden: the fused gate_up weight's rows")
    else:
        hidden = w_gate.shape[0]
        check_shape(op, "w_up", w_up, tuple(w_gate.shape), "w_gate's shape (hidden, in_features)")
        check_shape(op, "b_gate", b_gate, (hidden,), "w_gate.shape[0]")
        check_shape(op, "b_up", b_up, (hidden,), "w_up.shape[0]")
    if w_down.shape[1] != hidden:
        raise ValueError(f"gptfast.{op}: w_down must have shape (out_features, hidden) = (out, {hidden}) "
                         f"to match the gate's hidden size {hidden}, got {tuple(w_down.shape)}")
    check_shape(op, "b_down", b_down, (n,), "w_down.shape[0]")
    for name, t in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down), ("b_gate", b_gate), ("b_up", b_up),
                    ("b_down", b_down)):
        if t is not None and t.device != x.device:
            raise ValueError(f"gptfast.{op}: {name} is on {t.device} but x is on {x.device}")


# ------------------------------------------------------------------ custom ops
# See attention.py for why custom ops; absent bias gradients travel as empty tensors.

def _gated_ffn_fwd(x: torch.Tensor, w_gate: torch.Tensor, b_gate: torch.Tensor | None, w_up: torch.Tensor,
                   b_up: torch.Tensor | None, w_down: torch.Tensor, b_down: torch.Tensor | None, activation: str,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) contiguous -> out (M, N), g (M, H), u (M, H)."""
    if x.shape[0] == 0:
        return _gated_ffn_fwd_fake(x, w_gate, b_gate, w_up, b_up, w_down, b_down, activation, backend)
    launchers = _backend.resolve("gated_ffn", x.device, x.dtype, backend or None)
    with autocast_off(x.device.type):
        return launchers.fwd(x, w_gate, b_gate, w_up, b_up, w_down, b_down, activation)


gated_ffn_fwd_op = torch.library.custom_op("gptfast::gated_ffn_fwd", _gated_ffn_fwd, mutates_args=())


@gated_ffn_fwd_op.register_fake
def _gated_ffn_fwd_fake(x, w_gate, b_gate, w_up, b_up, w_down, b_down, activation, backend):
    m, hidden = x.shape[0], w_gate.shape[0]
    return x.new_empty((m, w_down.shape[0])), x.new_empty((m, hidden)), x.new_empty((m, hidden))


def _gated_ffn_bwd(dout: torch.Tensor, x: torch.Tensor, g: torch.Tensor, u: torch.Tensor, w_gate: torch.Tensor,
                   w_up: torch.Tensor, w_down: torch.Tensor, has_b_gate: bool, has_b_up: bool, has_b_down: bool,
                   activation: str, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                           torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx (M, K), dw_gate (H, K), db_gate (H,) or empty, dw_up (H, K), db_up (H,) or empty, dw_down (N, H),
    db_down (N,) or empty."""
    if x.shape[0] == 0:
        return tuple(t.zero_() for t in _gated_ffn_bwd_fake(dout, x, g, u, w_gate, w_up, w_down, has_b_gate,
                                                            has_b_up, has_b_down, activation, backend))
    launchers = _backend.resolve("gated_ffn", x.device, x.dtype, backend or None)
    with autocast_off(x.device.type):
        dx, dwg, dbg, dwu, dbu, dwd, dbd = launchers.bwd(dout, x, g, u, w_gate, w_up, w_down, has_b_gate,
                                                         has_b_up, has_b_down, activation)
    # one fresh empty tensor per absent gradient: custom-op outputs may not alias each other
    empty = lambda t: x.new_empty((0,)) if t is None else t  # noqa: E731
    return dx, dwg, empty(dbg), dwu, empty(dbu), dwd, empty(dbd)


gated_ffn_bwd_op = torch.library.custom_op("gptfast::gated_ffn_bwd", _gated_ffn_bwd, mutates_args=())


@gated_ffn_bwd_op.register_fake
def _gated_ffn_bwd_fake(dout, x, g, u, w_gate, w_up, w_down, has_b_gate, has_b_up, has_b_down, activation,
                        backend):
    hidden, n = w_gate.shape[0], w_down.shape[0]
    return (torch.empty_like(x), x.new_empty(w_gate.shape), x.new_empty((hidden,) if has_b_gate else (0,)),
            x.new_empty(w_up.shape), x.new_empty((hidden,) if has_b_up else (0,)),
            x.new_empty(w_down.shape), x.new_empty((n,) if has_b_down else (0,)))


def _gated_ffn_setup_context(ctx, inputs, output):
    x, w_gate, b_gate, w_up, b_up, w_down, b_down, activation, backend = inputs
    _, g, u = output
    ctx.save_for_backward(x, g, u, w_gate, w_up, w_down)  # act(g) * u is recomputed in the backward, not saved
    ctx.has_b_gate, ctx.has_b_up, ctx.has_b_down = b_gate is not None, b_up is not None, b_down is not None
    ctx.activation, ctx.backend = activation, backend
    # g and u are outputs only to be saved: no (M, H) zero gradients for them (see gelu_ffn.py)
    ctx.set_materialize_grads(False)


def _gated_ffn_backward(ctx, dout, _dg, _du):
    x, g, u, w_gate, w_up, w_down = ctx.saved_tensors
    if dout is None:  # (not materialised) out does not reach the loss: the gradients are zero
        dout = x.new_zeros((x.shape[0], w_down.shape[0]))
    dx, dwg, dbg, dwu, dbu, dwd, dbd = run_plain(
        gated_ffn_bwd_op, _gated_ffn_bwd, dout.contiguous(), x, g, u, w_gate, w_up, w_down, ctx.has_b_gate,
        ctx.has_b_up, ctx.has_b_down, ctx.activation, ctx.backend)
    return (dx, dwg, dbg if ctx.has_b_gate else None, dwu, dbu if ctx.has_b_up else None, dwd,
            dbd if ctx.has_b_down else None, None, None)


gated_ffn_fwd_op.register_autograd(_gated_ffn_backward, setup_context=_gated_ffn_setup_context)
_GatedFFNFunction = autograd_function("_GatedFFNFunction", _gated_ffn_fwd, _gated_ffn_setup_context,
                                      _gated_ffn_backward)


# ------------------------------------------------------------------ public function

def gated_ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor | None, w_down: torch.Tensor,
              activation: str = "silu", b_gate: torch.Tensor | None = None, b_up: torch.Tensor | None = None,
              b_down: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """Fused gated feed-forward block (SwiGLU / GeGLU):
    ``F.linear(act(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up), w_down, b_down)``.

    Args:
        x: (..., K) input, float16 / bfloat16 / float32 (float64 on the reference and cpu backends).
        w_gate: (H, K) gate weight, nn.Linear layout, any strides; or, with ``w_up=None``, the fused
            (2H, K) gate_up weight (Phi-3: rows [0, H) the gate, [H, 2H) the up projection).
        w_up: (H, K) up weight, or None (fused ``w_gate``).
        w_down: (N, H) down weight, nn.Linear layout.
        activation: "silu" (SwiGLU: Llama, Mistral, Qwen), "gelu_tanh" (GeGLU: Gemma's
            ``gelu_pytorch_tanh``) or "gelu" (exact erf GELU).
        b_gate: (H,) or None; (2H,) with a fused ``w_gate`` (split like it). b_up: (H,) or None (must
            be None with a fused ``w_gate``). b_down: (N,) or None.
        backend: see :func:`gptfast.attention`.

    Returns:
        (..., N) in x's dtype; under ``torch.autocast`` every input is cast to the autocast dtype
        first, as ``nn.Linear`` would be. Saves x and the two (..., H) projections for backward;
        act(g) * u is recomputed there.
    """
    _check_inputs(x, w_gate, w_up, w_down, activation, b_gate, b_up, b_down)
    amp = autocast_dtype(x.device.type)
    if amp is not None:
        x, w_gate, w_up, w_down, b_gate, b_up, b_down = cast_floats(amp, x, w_gate, w_up, w_down, b_gate, b_up,
                                                                     b_down)
    check_same("gated_ffn", "x", x, w_gate=w_gate, w_up=w_up, w_down=w_down, b_gate=b_gate, b_up=b_up,
               b_down=b_down)
    if w_up is None:  # row-slice views of the fused weight: autograd sums both into it
        hidden = w_gate.shape[0] // 2
        w_gate, w_up = w_gate[:hidden], w_gate[hidden:]
        if b_gate is not None:
            b_gate, b_up = b_gate[:hidden], b_gate[hidden:]
    lead = x.shape[:-1]
    x2d = x.reshape(math.prod(lead), x.shape[-1]).contiguous()
    # kernels read the biases as dense vectors; .contiguous() is free when they already are
    b_gate, b_up, b_down = (None if t is None else t.contiguous() for t in (b_gate, b_up, b_down))
    out = run_op(gated_ffn_fwd_op, _GatedFFNFunction, _gated_ffn_fwd, x2d, w_gate, b_gate, w_up, b_up, w_down,
                 b_down, activation, _backend.checked_name(backend))[0]
    return out.view(*lead, w_down.shape[0])
