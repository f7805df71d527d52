"""Triton GELU feed-forward block: out = GELU(x @ w1.T + b1) @ w2.T + b2, forward and backward.

Algorithm: one tiled matmul kernel (grouped program order for L2 reuse, fp32 accumulator,
masked tails, any operand strides) with constexpr prologue/epilogue variants:
  forward   h = x @ w1.T + b1         epilogue: + bias, store h (pre-activation), store GELU(h)
            out = a @ w2.T + b2       epilogue: + bias
  backward  dh = (dout @ w2) * GELU'(h)   epilogue: load h, multiply by GELU'(h), and write the
                                          per-tile column sums of dh (db1 partials: no extra pass)
            dx = dh @ w1,  dw1 = dh.T @ x,  dw2 = dout.T @ GELU(h)  (GELU recomputed on the
                                          B-operand tile after loading h: a = GELU(h) is never
                                          materialised in the backward)
            db2 = column sums of dout (small column-reduction kernel, one read of dout)
Saved for backward (by the caller): x and the pre-activation h. The activation GELU(h) exists
only between the two forward matmuls. Weights are read through their strides (nn.Linear layout,
transposes are stride swaps), never copied. GELU is "tanh" (GPT-2) or exact erf ("none"); tanh
is written with a sigmoid (tanh(u) = 2*sigmoid(2u) - 1) because libdevice is unavailable in the
interpreter. fp32 inputs use ``input_precision="ieee"`` dots (no TF32).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import _reduce

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). sm_90: 128-row tiles with 8 warps are two
# wgmma warpgroups; 3-4 stages hide HBM latency within 227 KB. sm_80: 4-stage cp.async pipelines
# of 32-deep K slices fit its 163 KB.
_CONFIGS = {
    90: [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
         (128, 128, 32, 4, 4), (64, 64, 64, 4, 3)],
    80: [(128, 128, 32, 4, 4), (128, 256, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
         (64, 64, 32, 4, 3), (128, 128, 64, 8, 3)],
}
# fp32 (ieee dots on FMA units): the 16-bit tiles spill hundreds of bytes (AOT check), so smaller.
_FP32_CONFIGS = [(64, 64, 32, 4, 3), (64, 32, 32, 4, 3), (32, 32, 32, 4, 2)]
_INTERPRET_CONFIG = (32, 32, 32, 4, 1)
MIN_BLOCK_M = 32  # smallest BLOCK_M of any config: sizes the db1 partial buffer


def _device_arch(device: torch.device) -> int:
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _smem(bm, bn, bk, stages, esize):
    return esize * stages * (bm * bk + bk * bn)


def as_configs(rows) -> list[triton.Config]:
    """One triton.Config per (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) row (also used by
    kernels/gated_ffn.py)."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in rows]


def matmul_configs(arch: int, esize: int) -> list[triton.Config]:
    """The configs the autotuner may select on ``arch`` for an element size."""
    rows = _FP32_CONFIGS if esize == 4 else _CONFIGS[90 if arch >= 90 else 80]
    return as_configs((bm, bn, bk, w, s) for bm, bn, bk, w, s in rows
                      if _smem(bm, bn, bk, s, esize) <= SMEM_LIMIT.get(arch, 99 * 1024))


def _all_configs():
    return as_configs([_INTERPRET_CONFIG] if _INTERPRET
                      else dict.fromkeys(_CONFIGS[90] + _CONFIGS[80] + _FP32_CONFIGS))


def _config_key(c: triton.Config) -> tuple:
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)


def make_prune(allowed_configs):
    """An ``early_config_prune`` keeping the configs ``allowed_configs(arch, element size, **kwargs)``
    lists for operand A's device and dtype (kwargs: the launch's constexprs), or only its first under
    GPTFAST_TRITON_AUTOTUNE=0 (tests: no benchmarking); all of them in the interpreter. Also used
    by kernels/gated_ffn.py."""
    def prune(configs, named_args, **kwargs):
        if _INTERPRET:
            return configs
        a = named_args["A"]
        allowed = allowed_configs(_device_arch(a.device), a.element_size(), **kwargs)
        if os.environ.get("GPTFAST_TRITON_AUTOTUNE") == "0":
            allowed = allowed[:1]
        keys = {_config_key(c) for c in allowed}
        return [c for c in configs if _config_key(c) in keys] or configs[-1:]
    return prune


_prune = make_prune(lambda arch, esize, **kwargs: matmul_configs(arch, esize))


@triton.jit
def _gelu(h, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        # 0.5*h*(1 + tanh(u)) == h * sigmoid(2u)
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        out = h * tl.sigmoid(2.0 * u)
    else:
        out = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    return out


@triton.jit
def _gelu_grad(h, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        s = tl.sigmoid(2.0 * u)
        du = 0.7978845608028654 * (1.0 + 0.134145 * h * h)
        out = s + 2.0 * h * s * (1.0 - s) * du
    else:
        out = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476)) + h * tl.exp(-0.5 * h * h) * 0.3989422804014327
    return out


@triton.autotune(
    configs=_all_configs(),
    key=["M", "N", "K", "EPILOGUE", "B_GELU"],
    prune_configs_by={"early_config_prune": _prune},
    # Configs with different BLOCK_M write different numbers of ColSum rows: zero the buffer before
    # each benchmarked config and after tuning, so rows left by a losing config never reach db1.
    reset_to_zero=["ColSum"],
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _ffn_matmul_kernel(
    A,  # (M, K) left operand, any strides
    B,  # (K, N) right operand, any strides (a weight's transpose is a stride swap)
    C,  # (M, N) output, dtype of A
    Bias,  # (N,) bias added in the epilogue (dummy unless HAS_BIAS)
    Aux,  # (M, N) pre-activation: written when EPILOGUE == 1, read when EPILOGUE == 2
    ColSum,  # (cdiv(M, BLOCK_M), N) fp32 per-tile column sums of the result (dummy unless COLSUM)
    M, N, K,  # problem size
    stride_am, stride_ak,
    stride_bk, stride_bn,
    stride_cm, stride_cn,
    stride_xm, stride_xn,  # Aux strides
    HAS_BIAS: tl.constexpr,
    EPILOGUE: tl.constexpr,  # 0: plain, 1: store Aux = acc and C = GELU(acc), 2: C = acc * GELU'(Aux)
    B_GELU: tl.constexpr,  # apply GELU to each loaded B tile (dw2 = dout.T @ GELU(h))
    COLSUM: tl.constexpr,  # write column sums of C's tile (bias gradient partials)
    APPROX_TANH: tl.constexpr,  # GELU flavour
    DOT_PREC: tl.constexpr,  # "ieee" for fp32 inputs
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K masks in the main loop
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Grouped ordering: 8 row-tiles share each B column-tile while it is hot in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = 8 * num_pid_n
    first_m = (pid // group) * 8
    group_size = tl.minimum(num_pid_m - first_m, 8)
    pid_m = first_m + (pid % group) % group_size
    pid_n = (pid % group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Wrapped rows/cols (mod M, N) are in bounds, so the main loop needs no M/N masks; the
    # duplicated rows are discarded by the masked store.
    am = offs_m % M
    bn = offs_n % N
    a_ptrs = A + am[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_k[:, None] * stride_bk + bn[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k0, other=0.0)
        if B_GELU:
            b = _gelu(b.to(tl.float32), APPROX_TANH).to(A.dtype.element_ty)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    aux_ptrs = Aux + offs_m[:, None].to(tl.int64) * stride_xm + offs_n[None, :] * stride_xn
    if EPILOGUE == 1:
        tl.store(aux_ptrs, acc.to(Aux.dtype.element_ty), mask=c_mask)
        # GELU of the fp32 accumulator (not of the rounded h): one rounding fewer.
        acc = _gelu(acc, APPROX_TANH)
    elif EPILOGUE == 2:
        h = tl.load(aux_ptrs, mask=c_mask, other=0.0).to(tl.float32)
        acc = acc * _gelu_grad(h, APPROX_TANH)
    if COLSUM:
        part = tl.sum(tl.where(c_mask, acc, 0.0), 0)
        tl.store(ColSum + pid_m.to(tl.int64) * N + offs_n, part, mask=offs_n < N)
    c_ptrs = C + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=c_mask)


# ----------------------------------------------------------------------------------------------
# Launchers (contract: gptfast/ops/_backend.py)
# ----------------------------------------------------------------------------------------------
def _matmul(a: torch.Tensor, b: torch.Tensor, *, bias=None, aux=None, epilogue=0, b_gelu=False,
            colsum=None, approximate="tanh") -> torch.Tensor:
    """C = epilogue(a @ b + bias) for 2-D views a (M, K), b (K, N) of any strides."""
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    aux_t = aux if aux is not None else c

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _ffn_matmul_kernel[grid](
        a, b, c, bias if bias is not None else c, aux_t, colsum if colsum is not None else c,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        aux_t.stride(0), aux_t.stride(1),
        HAS_BIAS=bias is not None, EPILOGUE=epilogue, B_GELU=b_gelu, COLSUM=colsum is not None,
        APPROX_TANH=approximate == "tanh", DOT_PREC="ieee" if a.dtype == torch.float32 else "tf32",
    )
    return c


def gelu_ffn_forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                     b2: torch.Tensor | None, approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    M = x.shape[0]
    h = torch.empty((M, w1.shape[0]), dtype=x.dtype, device=x.device)
    a = _matmul(x, w1.t(), bias=b1, aux=h, epilogue=1, approximate=approximate)
    out = _matmul(a, w2.t(), bias=b2)
    return out, h


def gelu_ffn_backward(dout: torch.Tensor, x: torch.Tensor, h: torch.Tensor, w1: torch.Tensor,
                      w2: torch.Tensor, has_b1: bool, has_b2: bool, approximate: str):
    M = x.shape[0]
    hidden = w1.shape[0]
    # Zeroed: rows past cdiv(M, chosen BLOCK_M) are never written and must add nothing.
    part = (torch.zeros((triton.cdiv(M, MIN_BLOCK_M), hidden), dtype=torch.float32, device=x.device)
            if has_b1 else None)
    dh = _matmul(dout, w2, aux=h, epilogue=2, colsum=part, approximate=approximate)
    dx = _matmul(dh, w1)
    dw1 = _matmul(dh.t(), x)
    dw2 = _matmul(dout.t(), h, b_gelu=True, approximate=approximate)
    db1 = _reduce.colsum(part, w1.dtype) if has_b1 else None
    db2 = _reduce.colsum(dout, w2.dtype) if has_b2 else None
    return dx, dw1, db1, dw2, db2
