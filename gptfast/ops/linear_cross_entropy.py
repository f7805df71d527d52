"""Fused linear + cross-entropy: ``F.cross_entropy(F.linear(x, weight, bias), targets, ...)``
without ever holding the (M, V) logits (issue 16, item 3). WORK IN PROGRESS: the reference math
and a plain autograd.Function; not yet a registered op, no kernel backends.

Rows are taken ``chunk_rows`` at a time: logits z = x_c W^T + b for the chunk (fp32), the
optional softcap z' = softcap * tanh(z / softcap), the per-row loss

    loss = lse(z') - (1 - eps) z'_y - eps mean_j z'_j          (eps = label_smoothing)

and, in the same pass, the gradient of the summed loss: dz' = softmax(z') - (1 - eps) onehot(y)
- eps / V (times 1 - tanh^2 through the softcap), dx_c = dz W, dW += dz^T x_c, db += sum dz.
Ignored rows (targets == ignore_index) have loss 0 and no gradient. For reduction "mean"/"sum"
the gradient is computed in the forward (as Liger-Kernel's fused linear cross-entropy does) and
only scaled in the backward: extra memory O(chunk_rows x V), one GEMM pass more than the loss
alone, none in the backward. For "none" the backward recomputes the chunks with each row's
incoming gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy_ref(x, weight, targets, bias=None, ignore_index=-100, reduction="mean",
                             label_smoothing=0.0, softcap=None):
    """Ground truth from plain differentiable ops (the full logits, in fp32; fp64 for fp64)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    logits = F.linear(x.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)


def _default_chunk(m: int, v: int) -> int:
    # ~64 MiB of fp32 logits per chunk (2 such buffers live at once), at least 1 row
    return max(1, min(m, (16 << 20) // max(v, 1)))


def linear_cross_entropy_chunks(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                targets: torch.Tensor, ignore_index: int, label_smoothing: float,
                                softcap: float | None, *, row_scale: torch.Tensor | None = None,
                                grads: bool = True, chunk_rows: int | None = None):
    """x (M, K), weight (V, K), bias (V,) or None, targets (M,) int64 -> losses (M,) fp32 and, with
    ``grads``, (dx (M, K), dweight (V, K), dbias (V,) or None) of sum(row_scale * losses) in the
    inputs' dtypes (accumulated in fp32). row_scale (M,) or None (ones)."""
    m, v = x.shape[0], weight.shape[0]
    chunk = chunk_rows or _default_chunk(m, v)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    wa = weight.to(acc)
    ba = None if bias is None else bias.to(acc)
    losses = torch.zeros(m, dtype=acc, device=x.device)
    dx = torch.empty((m, x.shape[1]), dtype=x.dtype, device=x.device) if grads else None
    dw = torch.zeros_like(wa) if grads else None
    db = torch.zeros_like(ba) if grads and ba is not None else None
    eps = float(label_smoothing)
    for start in range(0, m, chunk):
        end = min(m, start + chunk)
        xc = x[start:end].to(acc)
        y = targets[start:end]
        valid = y != ignore_index
        yc = torch.where(valid, y, torch.zeros_like(y))
        z = xc @ wa.T
        if ba is not None:
            z += ba
        if softcap is not None:
            t = torch.tanh(z / softcap)
            z = softcap * t
        lse = torch.logsumexp(z, -1)
        zy = z.gather(1, yc[:, None])[:, 0]
        loss = lse - (1 - eps) * zy
        if eps:
            loss = loss - eps * z.mean(-1)
        losses[start:end] = torch.where(valid, loss, torch.zeros_like(loss))
        if not grads:
            continue
        dz = torch.softmax(z, -1)  # z's buffer is reused: p overwrites nothing we still need
        dz.scatter_add_(1, yc[:, None], torch.full_like(zy[:, None], -(1 - eps)))
        if eps:
            dz -= eps / v
        scale = valid.to(acc)
        if row_scale is not None:
            scale = scale * row_scale[start:end].to(acc)
        dz *= scale[:, None]
        if softcap is not None:
            dz *= 1 - t * t
        dx[start:end] = (dz @ wa).to(x.dtype)
        dw.addmm_(dz.T, xc)
        if db is not None:
            db += dz.sum(0)
    return losses, (dx, dw.to(weight.dtype) if grads else None,
                    None if db is None else db.to(bias.dtype))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, targets, ignore_index, reduction, label_smoothing, softcap, chunk_rows):
        need = any(ctx.needs_input_grad[:3]) and reduction != "none"
        losses, (dx, dw, db) = linear_cross_entropy_chunks(x, weight, bias, targets, ignore_index, label_smoothing,
                                                           softcap, grads=need, chunk_rows=chunk_rows)
        n_valid = (targets != ignore_index).sum()
        ctx.reduction, ctx.args = reduction, (ignore_index, label_smoothing, softcap, chunk_rows)
        if reduction == "none":
            ctx.save_for_backward(x, weight, bias, targets)
            return losses.to(x.dtype)
        ctx.save_for_backward(dx, dw, db, n_valid)
        total = losses.sum()
        return (total / n_valid if reduction == "mean" else total).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        if ctx.reduction == "none":
            x, weight, bias, targets = ctx.saved_tensors
            ignore_index, eps, softcap, chunk_rows = ctx.args
            _, (dx, dw, db) = linear_cross_entropy_chunks(x, weight, bias, targets, ignore_index, eps, softcap,
                                                          row_scale=g, chunk_rows=chunk_rows)
            return dx, dw, db, None, None, None, None, None, None
        dx, dw, db, n_valid = ctx.saved_tensors
        s = g / n_valid if ctx.reduction == "mean" else g
        scaled = [None if t is None else (t * s).to(t.dtype) for t in (dx, dw, db)]
        return (*scaled, None, None, None, None, None, None)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, softcap: float | None = None, *,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(x, weight, bias), targets, ignore_index=..., reduction=...,
    label_smoothing=...)`` (logits softcapped first when ``softcap``) without the full logits.

    Args:
        x: (..., K) hidden states; weight: (V, K) (nn.Linear / lm_head layout); bias: (V,) or None.
        targets: x's leading shape, int64 class indices (``ignore_index`` rows do not count).
        reduction: "mean" (over the rows that count), "sum" or "none" (x's leading shape).
        chunk_rows: rows per chunk (default: ~64 MiB of fp32 logits).

    Returns the loss in x's dtype (fp32 accumulation).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"gptfast.linear_cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError("gptfast.linear_cross_entropy: x must be a tensor (..., K)")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"gptfast.linear_cross_entropy: weight must be (V, {x.shape[-1]}) (x.shape[-1]), "
                         f"got {tuple(weight.shape)}")
    if targets.shape != x.shape[:-1]:
        raise ValueError(f"gptfast.linear_cross_entropy: targets must have x's leading shape {tuple(x.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"gptfast.linear_cross_entropy: targets must be int64 class indices, got {targets.dtype}")
    lead = x.shape[:-1]
    out = _LinearCrossEntropy.apply(x.reshape(-1, x.shape[-1]), weight, bias, targets.reshape(-1).long(),
                                    int(ignore_index), reduction, float(label_smoothing),
                                    None if softcap is None else float(softcap), chunk_rows)
    return out.view(lead) if reduction == "none" else out
