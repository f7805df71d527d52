"""Scaled dot-product attention, causal or not, in FlashAttention's (batch, seqlen, nheads, headdim) layout.

    out_i = sum_j softmax_j(scale * q_i . k_j) v_j      (j <= i when causal, top-left aligned)

Saved for backward: q, k, v, out and the per-row logsumexp ``lse`` (fp32, O(T)) -- never the
T x T probability matrix. The backward recomputes P = exp(scale * q k^T - lse) and follows
FlashAttention-2 (Dao, 2023, Algorithm 2):

    dV = P^T dO,   dP = dO V^T,   delta_i = rowsum(dO_i * O_i),   dS = P * (dP - delta),
    dQ = scale * dS K,   dK = scale * dS^T Q.

This file holds, in order: the ground truth ``attention_ref``, the reference backend's launchers
(the model every kernel follows), input checks, the custom ops with their autograd formula, and
the public functions.
"""
from __future__ import annotations

import math

import torch

from . import _backend
from ._common import autocast_dtype, autocast_off, cast_floats, check_same, check_tensor

__all__ = ["attention", "flash_attn_func", "attention_ref", "attention_fwd_op", "attention_bwd_op"]

MAX_HEADDIM = 256


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _masked_scores(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """scale * q k^T as (batch, nheads, seqlen_q, seqlen_k), -inf above the causal diagonal."""
    s = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1)) * scale
    if causal:
        tq, tk = q.shape[1], k.shape[1]
        above = torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu_(1)
        s = s.masked_fill(above, float("-inf"))
    return s


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                  softmax_scale: float | None = None, upcast: bool = True) -> torch.Tensor:
    """Ground truth from plain, differentiable PyTorch ops (materialises the T x T matrix).

    With ``upcast`` the math runs in fp32 (fp64 for fp64 inputs) and the result is cast back to
    q's dtype; without it every op runs in the input dtype, as an eager model would.
    Fully-masked rows give 0.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    dtype = q.dtype
    if upcast:
        acc = _acc_dtype(dtype)
        q, k, v = q.to(acc), k.to(acc), v.to(acc)
    s = _masked_scores(q, k, causal, scale)
    # An all -inf row softmaxes to NaN; it means "no keys" and gives 0. Only those rows: a NaN
    # (or inf) in a visible score is the inputs' NaN and must reach exactly the rows that see it.
    no_keys = (s == float("-inf")).all(dim=-1, keepdim=True)
    p = torch.softmax(s, dim=-1).masked_fill(no_keys, 0.0)
    out = torch.matmul(p, v.transpose(1, 2)).transpose(1, 2)  # (B, T, H, D)
    return out.to(dtype)


def _probabilities(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    # Rows with lse = -inf have no unmasked key: their probabilities are 0, not exp(-inf + inf).
    # Only those: lse = NaN (a NaN score) or +inf (an infinite one) must give NaN probabilities,
    # as SDPA and every kernel do, so that the reference never hides a NaN.
    no_keys = (lse == float("-inf")).unsqueeze(-1)
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0).unsqueeze(-1))
    return p.masked_fill(no_keys, 0.0)


def attention_forward_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                                softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference launcher: returns out (B, T, H, D) in q.dtype and lse (B, H, T) in fp32."""
    acc = _acc_dtype(q.dtype)
    s = _masked_scores(q.to(acc), k.to(acc), causal, softmax_scale)
    lse = torch.logsumexp(s, dim=-1)  # (B, H, T); -inf for a row with no keys
    p = _probabilities(s, lse)
    out = torch.matmul(p, v.to(acc).transpose(1, 2)).transpose(1, 2)
    return out.to(q.dtype).contiguous(), lse  # lse stays fp64 for fp64 inputs (gradcheck)


def attention_backward_reference(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 out: torch.Tensor, lse: torch.Tensor, causal: bool, softmax_scale: float,
                                 deterministic: bool = False) -> tuple[torch.Tensor, ...]:
    """Reference launcher for the FlashAttention-2 backward, untiled. Always deterministic."""
    acc = _acc_dtype(q.dtype)
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    do = dout.to(acc).transpose(1, 2)                    # (B, H, T, D)
    s = _masked_scores(qa, ka, causal, softmax_scale)    # (B, H, Tq, Tk)
    p = _probabilities(s, lse.to(acc))
    dv = torch.matmul(p.transpose(-1, -2), do)           # (B, H, Tk, D)
    dp = torch.matmul(do, va.permute(0, 2, 3, 1))        # (B, H, Tq, Tk)
    delta = (do * out.to(acc).transpose(1, 2)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, ka.transpose(1, 2)) * softmax_scale
    dk = torch.matmul(ds.transpose(-1, -2), qa.transpose(1, 2)) * softmax_scale
    back = lambda t, like: t.transpose(1, 2).to(like.dtype).contiguous()  # noqa: E731
    return back(dq, q), back(dk, k), back(dv, v)


def _check_inputs(q, k, v, causal, softmax_scale) -> None:
    op = "attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t, ndim=4)
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"gptfast.{op}: {name} is on {t.device} but q is on {q.device}")
    b, tq, h, d = q.shape
    if not 1 <= d <= MAX_HEADDIM:
        raise ValueError(f"gptfast.{op}: head dim (q.shape[3]) must be in 1..{MAX_HEADDIM}, got {d}")
    if k.shape[0] != b or k.shape[2] != h or k.shape[3] != d:
        raise ValueError(f"gptfast.{op}: k must have shape (batch, seqlen, nheads, headdim) = "
                         f"({b}, seqlen, {h}, {d}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"gptfast.{op}: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[1] != tq:
        raise NotImplementedError(
            f"gptfast.{op}: seqlen_q ({tq}) != seqlen_k ({k.shape[1]}) is not supported yet; "
            "only self-attention (equal lengths) is")
    if not isinstance(causal, bool):
        raise TypeError(f"gptfast.{op}: causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float))
                                          and math.isfinite(softmax_scale)):
        raise ValueError(f"gptfast.{op}: softmax_scale must be a finite number or None, got {softmax_scale!r}")


def _kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim has stride 1 and its seqlen rows are disjoint, else a copy.

    Kernels read (seqlen, headdim) tiles with the seqlen stride as row pitch (BLAS's leading
    dimension on the CPU), so broadcast (``expand``) or overlapping rows must be materialised.
    ``.contiguous()`` is not enough: it keeps a size-1 last dim's odd stride.
    """
    if t.stride(-1) == 1 and (t.shape[1] <= 1 or t.stride(1) >= t.shape[-1]):
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# The op and its backward are torch.library custom ops so that torch.compile(fullgraph=True)
# traces models through them (the fake implementations give output metadata without running a
# kernel). The backend is resolved when the op runs, not when it is traced: a compiled model still
# follows ``gptfast.use_backend`` / GPTFAST_BACKEND at run time, and tracing never imports triton.
@torch.library.custom_op("gptfast::attention_fwd", mutates_args=())
def attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float,
                     deterministic: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, T, H, D) contiguous, lse (B, H, T) fp32 -- see the launcher contract in _backend.py."""
    b, t, h, _ = q.shape
    if q.numel() == 0:
        return _attention_fwd_fake(q, k, v, causal, softmax_scale, deterministic, backend)
    launchers = _backend.resolve("attention", q.device, q.dtype, backend or None)
    with autocast_off(q.device.type):
        return launchers.fwd(q, k, v, causal, softmax_scale)


@attention_fwd_op.register_fake
def _attention_fwd_fake(q, k, v, causal, softmax_scale, deterministic, backend):
    b, t, h, _ = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((b, h, t), dtype=_lse_dtype(q.dtype)))


@torch.library.custom_op("gptfast::attention_bwd", mutates_args=())
def attention_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, causal: bool, softmax_scale: float, deterministic: bool,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (contiguous, dtypes of q, k, v)."""
    if q.numel() == 0:
        return tuple(torch.zeros_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    launchers = _backend.resolve("attention", q.device, q.dtype, backend or None)
    kwargs = {"deterministic": True} if deterministic else {}
    with autocast_off(q.device.type):
        return launchers.bwd(dout, q, k, v, out, lse, causal, softmax_scale, **kwargs)


@attention_bwd_op.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, causal, softmax_scale, deterministic, backend):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _attention_setup_context(ctx, inputs, output):
    q, k, v, causal, softmax_scale, deterministic, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)  # O(T): never the T x T probabilities
    ctx.mark_non_differentiable(lse)
    ctx.causal, ctx.softmax_scale, ctx.deterministic, ctx.backend = causal, softmax_scale, deterministic, backend


def _attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd_op(_kernel_layout(dout), q, k, v, out, lse, ctx.causal, ctx.softmax_scale,
                                  ctx.deterministic, ctx.backend)
    return dq, dk, dv, None, None, None, None


attention_fwd_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              softmax_scale: float | None = None, backend: str | None = None, *,
              deterministic: bool = False) -> torch.Tensor:
    """Fused scaled dot-product attention (FlashAttention-2 algorithm on the kernel backends).

    Args:
        q, k, v: (batch, seqlen, nheads, headdim) -- FlashAttention's layout, *not* SDPA's
            (batch, nheads, seqlen, headdim). One dtype among float16, bfloat16, float32 (float64
            on the reference backend), one device. headdim in 1..256. Any strides; the last
            dimension is made contiguous if it is not. seqlen_q must equal seqlen_k.
        causal: mask key j > query i (top-left aligned).
        softmax_scale: multiplies q.k before the softmax; default 1/sqrt(headdim).
        backend: "auto", "reference", "triton", "cuda" or "cpu"; None defers to
            ``gptfast.use_backend`` / ``GPTFAST_BACKEND`` / auto.
        deterministic: ask kernel backends for a bitwise-reproducible backward (no atomics).

    Returns:
        (batch, seqlen, nheads, headdim) in q's dtype (the autocast dtype under ``torch.autocast``).
        Memory saved for backward is O(seqlen): q, k, v, out and an fp32 logsumexp per row.
    """
    _check_inputs(q, k, v, causal, softmax_scale)
    amp = autocast_dtype(q.device.type)
    if amp is not None:
        q, k, v = cast_floats(amp, q, k, v)
    check_same("attention", "q", q, k=k, v=v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    q, k, v = (_kernel_layout(t) for t in (q, k, v))
    out, _ = attention_fwd_op(q, k, v, causal, scale, bool(deterministic), _backend.checked_name(backend))
    return out


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    softmax_scale: float | None = None, causal: bool = False,
                    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                    return_attn_probs: bool = False) -> torch.Tensor:
    """Drop-in for ``flash_attn.flash_attn_func``: same arguments, same (batch, seqlen, nheads,
    headdim) layout, same default (``causal=False``). Runs :func:`attention`.

    Options FlashAttention has and gptfast does not yet (dropout, sliding windows, softcapping,
    ALiBi, returning probabilities) raise ``NotImplementedError`` instead of being ignored.
    """
    if dropout_p != 0.0:
        raise NotImplementedError(f"gptfast.flash_attn_func: dropout_p={dropout_p} is not supported "
                                  "(attention dropout is not implemented); pass dropout_p=0.0")
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError(f"gptfast.flash_attn_func: window_size={window_size} (local attention) "
                                  "is not supported")
    if softcap != 0.0:
        raise NotImplementedError("gptfast.flash_attn_func: softcap is not supported")
    if alibi_slopes is not None:
        raise NotImplementedError("gptfast.flash_attn_func: alibi_slopes is not supported")
    if return_attn_probs:
        raise NotImplementedError("gptfast.flash_attn_func: return_attn_probs is not supported")
    return attention(q, k, v, causal=causal, softmax_scale=softmax_scale, deterministic=deterministic)
