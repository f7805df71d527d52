"""Triton LayerNorm over the last dim, forward and backward.

Algorithm: the textbook two-pass LayerNorm (Ba et al., 2016) with fp32 statistics; the backward
is the standard closed form
    dx = rstd * (w*dy - mean(w*dy * xhat) * xhat - mean(w*dy)),   xhat = (x - mean) * rstd,
computed in one pass over each row, and dW = sum_rows dy*xhat, dB = sum_rows dy accumulated as
per-program fp32 partial sums (one row of a (G, N) buffer per program) that a second small kernel
reduces over G. No atomics, so the result is bitwise reproducible. Saved for backward (by the
caller): x (s with a residual), weight, mean and rstd (fp32, one per row).

Fused residual add (``HAS_RESIDUAL``, FlashAttention's prenorm ``layer_norm_fn``): the forward
reads x and r, stores s = x + r summed in fp32 and rounded once to x's dtype, and normalises the
rounded s with the very operations the unfused kernel applies to a loaded s (in the interpreter
the results are bitwise equal). fp32 has 2p + 2 bits or more for fp16's and bf16's p, so this s is
the exact sum correctly rounded (double rounding through fp32 is innocuous): the same as
``(x.double() + r.double()).to(dtype)``. The backward's ``HAS_DRESIDUAL`` adds the gradient of the
returned s (the residual stream's) to dx in fp32 before dx's one rounding.

Rows up to ``MAX_TILE`` elements live in registers (one load per element); wider rows (up to the
contract's 65536) are walked in ``MAX_TILE`` chunks: three passes in the forward (mean, variance,
normalise: the re-reads hit L2, a row is at most 256 KB) and two in the backward.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import _reduce

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# 8192 fp32 values over 16 warps is 16 registers per thread per live row tile; wider tiles spill.
MAX_TILE = 8192


def _settings(n: int) -> tuple[int, bool, int]:
    block = min(triton.next_power_of_2(n), MAX_TILE)
    # ~512 elements per warp keeps each thread at 16 fp32 values of the row.
    warps = min(max(block // 512, 4), 16)
    return block, n <= block, warps


@triton.jit
def _load_row(x_ptrs, r_ptrs, mask, HAS_RESIDUAL: tl.constexpr):
    # fp32 values of x, or of s = x + r rounded to x's dtype first: the statistics must be those of
    # the s that is stored and saved for the backward, not of the unrounded fp32 sum.
    x = tl.load(x_ptrs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
    return x.to(tl.float32)


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # input (M, N), row stride stride_x, unit column stride
    Y,  # output (M, N), dtype of X
    W, B,  # weight, bias (N,) or dummy pointers when absent
    Mean, Rstd,  # (M,) fp32 outputs
    R, S,  # residual in, sum s = x + r out (M, N), dtype of X; dummy pointers without HAS_RESIDUAL
    stride_x, stride_y, stride_r, stride_s,  # row strides (elements)
    N,  # row length
    eps,  # added to the variance
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
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
    # Shifted data: summing x - x[0] instead of x keeps the mean's rounding error relative to the
    # spread of the row, not its offset (measured, N=768, x ~ 1e3 + 2*randn, fp32: max error 1.1e-6
    # vs 1.5e-4 unshifted; PyTorch CPU 7.5e-5). With a residual the shift is s[0] as rounded, the
    # value the unfused kernel would load, so the fused result stays bitwise the unfused one.
    shift = tl.load(x_row)
    if HAS_RESIDUAL:
        shift = (shift.to(tl.float32) + tl.load(r_row).to(tl.float32)).to(X.dtype.element_ty)
    shift = shift.to(tl.float32)
    if ONE_TILE:
        mask = cols < N
        x = _load_row(x_row + cols, r_row + cols, mask, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(s_row + cols, x.to(S.dtype.element_ty), mask=mask)
        d = tl.where(mask, x - shift, 0.0)
        mean_d = tl.sum(d, 0) / N
        xc = tl.where(mask, d - mean_d, 0.0)
        mean = shift + mean_d
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / N + eps)
        y = xc * rstd
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # With a residual every pass re-reads x and r and re-forms s instead of reading back the s
        # stored in the first pass: no barrier orders that store before a later pass's load, which
        # may run on another thread of the program (the compiler maps elements to threads), and
        # the re-reads hit L2 like the unfused kernel's.
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            x = _load_row(x_row + c, r_row + c, c < N, HAS_RESIDUAL)
            if HAS_RESIDUAL:
                tl.store(s_row + c, x.to(S.dtype.element_ty), mask=c < N)
            acc += tl.where(c < N, x - shift, 0.0)
        mean_d = tl.sum(acc, 0) / N
        mean = shift + mean_d
        # Second pass over (x - mean): E[x^2] - mean^2 would cancel catastrophically in fp32.
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            x = _load_row(x_row + c, r_row + c, c < N, HAS_RESIDUAL)
            xc = tl.where(c < N, (x - shift) - mean_d, 0.0)
            acc += xc * xc
        rstd = 1.0 / tl.sqrt(tl.sum(acc, 0) / N + eps)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = c < N
            y = ((_load_row(x_row + c, r_row + c, mask, HAS_RESIDUAL) - shift) - mean_d) * rstd
            if HAS_WEIGHT:
                y = y * tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y = y + tl.load(B + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + c, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(
    X, W, DY,  # input (M, N), weight (N,) or dummy, upstream gradient (M, N)
    DX,  # output (M, N), dtype of X
    Mean, Rstd,  # (M,) fp32 from the forward
    DW_partial, DB_partial,  # (G, N) fp32 per-program partial sums (dummy when not needed)
    DRES,  # (M, N) gradient of the forward's s, added to dx (dummy without HAS_DRESIDUAL)
    stride_x, stride_dy, stride_dx, stride_dres,  # row strides
    M, N,  # rows, row length
    rows_per_program,  # each program owns rows [pid*rows_per_program, ...) -- contiguous for locality
    HAS_WEIGHT: tl.constexpr,  # compute dW (and scale dy by w)
    HAS_DBIAS: tl.constexpr,  # compute dB
    HAS_DRESIDUAL: tl.constexpr,  # dx += dres, in fp32 before dx's one rounding
    BLOCK_N: tl.constexpr, ONE_TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    part_row = pid.to(tl.int64) * N
    # Row pointers advance by a stride per row: int64 from the start, and no per-row int64 cast
    # of the loop index (which the interpreter's plain-int range would not accept).
    x_row = X + row_start.to(tl.int64) * stride_x
    dy_row = DY + row_start.to(tl.int64) * stride_dy
    dx_row = DX + row_start.to(tl.int64) * stride_dx
    dres_row = DRES + row_start.to(tl.int64) * stride_dres
    if ONE_TILE:
        mask = cols < N
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in range(row_start, row_end):
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(Mean + row)
            rstd = tl.load(Rstd + row)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            if HAS_WEIGHT:
                wdy = dy * w
            else:
                wdy = dy
            # Accumulated before dx so that dy is dead by then (AOT, bf16 N=8192 w16: stack 32 -> 24 B,
            # with dresidual 88 -> 40 B on sm_80, 32 B on sm_90); dx does not depend on them.
            if HAS_WEIGHT:
                dw_acc += dy * xhat
            if HAS_DBIAS:
                db_acc += dy
            c1 = tl.sum(xhat * wdy, 0) / N
            c2 = tl.sum(wdy, 0) / N
            dx = (wdy - (xhat * c1 + c2)) * rstd
            if HAS_DRESIDUAL:
                dx += tl.load(dres_row + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_row + cols, dx.to(DX.dtype.element_ty), mask=mask)
            x_row += stride_x
            dy_row += stride_dy
            dx_row += stride_dx
            dres_row += stride_dres
        if HAS_WEIGHT:
            tl.store(DW_partial + part_row + cols, dw_acc, mask=mask)
        if HAS_DBIAS:
            tl.store(DB_partial + part_row + cols, db_acc, mask=mask)
    else:
        # Wide rows: the partial sums live in this program's (zero-initialised) row of the
        # partial buffers instead of registers; only this program touches that row.
        for row in range(row_start, row_end):
            mean = tl.load(Mean + row)
            rstd = tl.load(Rstd + row)
            a1 = tl.zeros([BLOCK_N], dtype=tl.float32)
            a2 = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = c < N
                x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_row + c, mask=mask, other=0.0).to(tl.float32)
                if HAS_WEIGHT:
                    dy = dy * tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
                a1 += tl.where(mask, (x - mean) * rstd, 0.0) * dy
                a2 += dy
            c1 = tl.sum(a1, 0) / N
            c2 = tl.sum(a2, 0) / N
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = c < N
                x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_row + c, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                if HAS_WEIGHT:
                    wdy = dy * tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
                else:
                    wdy = dy
                dx = (wdy - (xhat * c1 + c2)) * rstd
                if HAS_DRESIDUAL:
                    dx += tl.load(dres_row + c, mask=mask, other=0.0).to(tl.float32)
                tl.store(dx_row + c, dx.to(DX.dtype.element_ty), mask=mask)
                if HAS_WEIGHT:
                    p = DW_partial + part_row + c
                    tl.store(p, tl.load(p, mask=mask, other=0.0) + dy * xhat, mask=mask)
                if HAS_DBIAS:
                    p = DB_partial + part_row + c
                    tl.store(p, tl.load(p, mask=mask, other=0.0) + dy, mask=mask)
            x_row += stride_x
            dy_row += stride_dy
            dx_row += stride_dx
            dres_row += stride_dres


# ----------------------------------------------------------------------------------------------
# Launchers (contract: gptfast/ops/_backend.py)
# ----------------------------------------------------------------------------------------------
def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       eps: float, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """(y, mean, rstd), or with ``residual`` (y, mean, rstd, s): s = x + residual, the row LayerNorm
    normalises (see the module docstring). x (..., N): its leading dimensions are the rows."""
    if x.dim() != 2:
        n = x.shape[-1]
        out = layer_norm_forward(x.view(-1, n), weight, bias, eps, None if residual is None else residual.view(-1, n))
        return tuple(t.view(x.shape) if t.dim() == 2 else t for t in out)
    M, N = x.shape
    y = torch.empty_like(x)
    mean = torch.empty((M,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
    has_res = residual is not None
    s = torch.empty_like(x) if has_res else None
    block, one_tile, warps = _settings(N)
    _layer_norm_fwd_kernel[(M,)](
        x, y, weight if weight is not None else x, bias if bias is not None else x, mean, rstd,
        residual if has_res else x, s if has_res else y,
        x.stride(0), y.stride(0), residual.stride(0) if has_res else 0, s.stride(0) if has_res else 0,
        N, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=has_res,
        BLOCK_N=block, ONE_TILE=one_tile, num_warps=warps,
    )
    return (y, mean, rstd, s) if has_res else (y, mean, rstd)


def _num_partials(m: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(m, 4 * sms))  # a few programs per SM hide the row latency
    return max(1, min(m, 4))


def layer_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                        mean: torch.Tensor, rstd: torch.Tensor, has_bias: bool,
                        dresidual: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """dx, dweight, dbias; x is the forward's s when it had a residual, and ``dresidual`` (the
    gradient of the returned s) is then added to dx. x (..., N): its leading dimensions are the rows."""
    if x.dim() != 2:
        n = x.shape[-1]
        dx, dw, db = layer_norm_backward(dy.view(-1, n), x.view(-1, n), weight, mean, rstd, has_bias,
                                         None if dresidual is None else dresidual.view(-1, n))
        return dx.view(x.shape), dw, db
    M, N = x.shape
    dx = torch.empty_like(x)
    block, one_tile, warps = _settings(N)
    G = _num_partials(M, x.device)
    alloc = torch.empty if one_tile else torch.zeros
    has_weight = weight is not None
    dw_part = alloc((G, N), dtype=torch.float32, device=x.device) if has_weight else mean
    db_part = alloc((G, N), dtype=torch.float32, device=x.device) if has_bias else mean
    has_dres = dresidual is not None
    _layer_norm_bwd_kernel[(G,)](
        x, weight if has_weight else x, dy, dx, mean, rstd, dw_part, db_part,
        dresidual if has_dres else dy,
        x.stride(0), dy.stride(0), dx.stride(0), dresidual.stride(0) if has_dres else 0,
        M, N, triton.cdiv(M, G),
        HAS_WEIGHT=has_weight, HAS_DBIAS=bool(has_bias), HAS_DRESIDUAL=has_dres,
        BLOCK_N=block, ONE_TILE=one_tile, num_warps=warps,
    )
    dw = _reduce.colsum(dw_part, weight.dtype) if has_weight else None
    db = _reduce.colsum(db_part, x.dtype) if has_bias else None
    return dx, dw, db
