"""Column sums in Triton: the bias/affine-gradient reductions of the LayerNorm and GELU-FFN
backwards (per-program fp32 partial rows summed once, or dout summed over its rows).

One program per BLOCK_N columns walks all rows, accumulating in fp32: no atomics, so the sums
are deterministic.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _colsum_kernel(
    X,  # (R, N) input, unit column stride
    Out,  # (N,) output
    R, N,  # rows, columns
    stride_r,  # row stride of X
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for start in range(0, R, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows[:, None] < R) & (cols[None, :] < N)
        acc += tl.load(X + rows[:, None].to(tl.int64) * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + cols, tl.sum(acc, 0).to(Out.dtype.element_ty), mask=cols < N)


def colsum(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (R, N) with x.stride(1) == 1 -> (N,) column sums in ``dtype``, accumulated in fp32."""
    R, N = x.shape
    out = torch.empty((N,), dtype=dtype, device=x.device)
    block_n = 32 if _INTERPRET else 128
    _colsum_kernel[(triton.cdiv(N, block_n),)](x, out, R, N, x.stride(0), BLOCK_R=32, BLOCK_N=block_n)
    return out
