"""Triton RMSNorm over the last dim, forward and backward, with the fused residual add.

Algorithm (Zhang & Sennrich, 2019; the Llama family's norm, Gemma's with offset 1): one program
per row computes the fp32 mean square, rstd = 1/sqrt(mean(x^2) + eps), and y = x * rstd *
(offset + w) in fp32, rounded once to x's dtype. The backward is the closed form
    dx = rstd * (g - xhat * mean(g * xhat)),   xhat = x * rstd,  g = dy * (offset + w),
in one pass over each row, and dW = sum_rows dy * xhat accumulated as per-program fp32 partial
rows of a (G, N) buffer that kernels/_reduce.py sums over G: no atomics, bitwise reproducible.
Saved for backward (by the caller): x (s with a residual), weight and rstd (fp32, one per row).

The structure is kernels/layer_norm.py's, whose helpers it shares (tile settings, the number of
backward programs, the row load that forms s): rows up to ``MAX_TILE`` elements stay in registers,
wider ones are walked in chunks (two passes in the forward, sum of squares then normalise; two in
the backward). No shift is needed: there is no mean to subtract, so no cancellation.

Fused residual add (``HAS_RESIDUAL``): s = x + r summed in fp32 and rounded once to x's dtype, is
stored and normalised as rounded (the exact sum correctly rounded, as layer_norm.py explains); the
chunked forward re-forms s in each pass rather than reading back its own store. ``HAS_DRESIDUAL``
adds the gradient of the returned s to dx in fp32 before dx's one rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _reduce
from .layer_norm import _load_row, _num_partials, _settings


@triton.jit
def _rms_norm_fwd_kernel(
    X,  # input (M, N), row stride stride_x, unit column stride
    Y,  # output (M, N), dtype of X
    W,  # weight (N,) or a dummy pointer without HAS_WEIGHT
    Rstd,  # (M,) fp32 output
    R, S,  # residual in, sum s = x + r out (M, N), dtype of X; dummy pointers without HAS_RESIDUAL
    stride_x, stride_y, stride_r, stride_s,  # row strides (elements)
    N,  # row length
    eps,  # added to the mean square
    offset,  # added to the weight (Gemma: 1.0)
    HAS_WEIGHT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,  # normalise s = x + r (and store it) instead of x
    BLOCK_N: tl.constexpr,  # tile width (power of two)
    ONE_TILE: tl.constexpr,  # N <= BLOCK_N: keep the row in registers
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    y_row = Y + row * stride_y
    r_row = R + row * stride_r
    s_row = S + row * stride_s
    cols = tl.arange(0, BLOCK_N)
    if ONE_TILE:
        mask = cols < N
        x = _load_row(x_row + cols, r_row + cols, mask, HAS_RESIDUAL)  # masked lanes are 0
        if HAS_RESIDUAL:
            tl.store(s_row + cols, x.to(S.dtype.element_ty), mask=mask)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
        y = x * rstd
        if HAS_WEIGHT:
            y = y * (offset + tl.load(W + cols, mask=mask, other=0.0).to(tl.float32))
        tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            x = _load_row(x_row + c, r_row + c, c < N, HAS_RESIDUAL)
            if HAS_RESIDUAL:
                tl.store(s_row + c, x.to(S.dtype.element_ty), mask=c < N)
            acc += x * x
        rstd = 1.0 / tl.sqrt(tl.sum(acc, 0) / N + eps)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = c < N
            y = _load_row(x_row + c, r_row + c, mask, HAS_RESIDUAL) * rstd
            if HAS_WEIGHT:
                y = y * (offset + tl.load(W + c, mask=mask, other=0.0).to(tl.float32))
            tl.store(y_row + c, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Rstd + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    X, W, DY,  # input (M, N), weight (N,) or dummy, upstream gradient (M, N)
    DX,  # output (M, N), dtype of X
    Rstd,  # (M,) fp32 from the forward
    DW_partial,  # (G, N) fp32 per-program partial sums (dummy without HAS_WEIGHT)
    DRES,  # (M, N) gradient of the forward's s, added to dx (dummy without HAS_DRESIDUAL)
    stride_x, stride_dy, stride_dx, stride_dres,  # row strides
    M, N,  # rows, row length
    offset,  # added to the weight
    rows_per_program,  # each program owns rows [pid*rows_per_program, ...) -- contiguous for locality
    HAS_WEIGHT: tl.constexpr,  # compute dW (and scale dy by offset + w)
    HAS_DRESIDUAL: tl.constexpr,  # dx += dres, in fp32 before dx's one rounding
    BLOCK_N: tl.constexpr, ONE_TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    part_row = pid.to(tl.int64) * N
    # int64 row pointers advanced by a stride per row (layer_norm.py's backward says why)
    x_row = X + row_start.to(tl.int64) * stride_x
    dy_row = DY + row_start.to(tl.int64) * stride_dy
    dx_row = DX + row_start.to(tl.int64) * stride_dx
    dres_row = DRES + row_start.to(tl.int64) * stride_dres
    if ONE_TILE:
        mask = cols < N
        if HAS_WEIGHT:
            w = offset + tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in range(row_start, row_end):
            rstd = tl.load(Rstd + row)
            xhat = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32) * rstd
            dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                g = dy * w
                dw_acc += dy * xhat  # before dx, so that dy is dead by then (as layer_norm.py)
            else:
                g = dy
            c1 = tl.sum(xhat * g, 0) / N
            dx = (g - xhat * c1) * rstd
            if HAS_DRESIDUAL:
                dx += tl.load(dres_row + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_row + cols, dx.to(DX.dtype.element_ty), mask=mask)
            x_row += stride_x
            dy_row += stride_dy
            dx_row += stride_dx
            dres_row += stride_dres
        if HAS_WEIGHT:
            tl.store(DW_partial + part_row + cols, dw_acc, mask=mask)
    else:
        # Wide rows: the partial sums live in this program's (zero-initialised) row of the
        # partial buffer; only this program touches that row.
        for row in range(row_start, row_end):
            rstd = tl.load(Rstd + row)
            a1 = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = c < N
                xhat = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32) * rstd
                g = tl.load(dy_row + c, mask=mask, other=0.0).to(tl.float32)
                if HAS_WEIGHT:
                    g = g * (offset + tl.load(W + c, mask=mask, other=0.0).to(tl.float32))
                a1 += xhat * g
            c1 = tl.sum(a1, 0) / N
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = c < N
                xhat = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32) * rstd
                dy = tl.load(dy_row + c, mask=mask, other=0.0).to(tl.float32)
                if HAS_WEIGHT:
                    g = dy * (offset + tl.load(W + c, mask=mask, other=0.0).to(tl.float32))
                else:
                    g = dy
                dx = (g - xhat * c1) * rstd
                if HAS_DRESIDUAL:
                    dx += tl.load(dres_row + c, mask=mask, other=0.0).to(tl.float32)
                tl.store(dx_row + c, dx.to(DX.dtype.element_ty), mask=mask)
                if HAS_WEIGHT:
                    p = DW_partial + part_row + c
                    tl.store(p, tl.load(p, mask=mask, other=0.0) + dy * xhat, mask=mask)
            x_row += stride_x
            dy_row += stride_dy
            dx_row += stride_dx
            dres_row += stride_dres


# ----------------------------------------------------------------------------------------------
# Launchers (contract: gptfast/ops/_backend.py)
# ----------------------------------------------------------------------------------------------
def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float,
                     residual: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """(y, rstd), or with ``residual`` (y, rstd, s): s = x + residual, the row RMSNorm normalises
    (see the module docstring). x (..., N) contiguous: its leading dimensions are the rows."""
    N = x.shape[-1]
    M = x.numel() // N
    y = torch.empty_like(x)
    rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
    has_res = residual is not None
    s = torch.empty_like(x) if has_res else None
    block, one_tile, warps = _settings(N)
    # x, y, s are contiguous (..., N): row stride N whatever the leading dimensions
    _rms_norm_fwd_kernel[(M,)](
        x, y, weight if weight is not None else x, rstd, residual if has_res else x, s if has_res else y,
        N, N, N if has_res else 0, N if has_res else 0, N, eps, offset,
        HAS_WEIGHT=weight is not None, HAS_RESIDUAL=has_res,
        BLOCK_N=block, ONE_TILE=one_tile, num_warps=warps,
    )
    return (y, rstd, s) if has_res else (y, rstd)


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor,
                      offset: float, dresidual: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dx, dweight (None without weight); x is the forward's s when it had a residual, and
    ``dresidual`` (the gradient of the returned s) is then added to dx. dy, x, dresidual (..., N)
    contiguous: the leading dimensions are the rows."""
    N = x.shape[-1]
    M = x.numel() // N
    dx = torch.empty_like(x)
    block, one_tile, warps = _settings(N)
    G = _num_partials(M, x.device)
    has_weight = weight is not None
    alloc = torch.empty if one_tile else torch.zeros
    dw_part = alloc((G, N), dtype=torch.float32, device=x.device) if has_weight else rstd
    has_dres = dresidual is not None
    _rms_norm_bwd_kernel[(G,)](
        x, weight if has_weight else x, dy, dx, rstd, dw_part, dresidual if has_dres else dy,
        N, N, N, N if has_dres else 0, M, N, offset, triton.cdiv(M, G),
        HAS_WEIGHT=has_weight, HAS_DRESIDUAL=has_dres,
        BLOCK_N=block, ONE_TILE=one_tile, num_warps=warps,
    )
    return dx, _reduce.colsum(dw_part, weight.dtype) if has_weight else None
