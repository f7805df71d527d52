"""Triton gated feed-forward block (SwiGLU / GeGLU): out = (act(x @ w_gate.T + b_gate) * (x @ w_up.T
+ b_up)) @ w_down.T + b_down, forward and backward.

Algorithm: one tiled matmul kernel (grouped program order via ``tl.swizzle2d``, fp32 accumulators,
wrapped M/N indices so the K loop needs no M/N masks, ``EVEN_K`` drops the K masks) with a
constexpr ``MODE`` per GEMM of the block:
  forward   MODE 1  g = x @ w_gate.T + b_gate, u = x @ w_up.T + b_up: two accumulators for the
                    same output tile from one pass over x's K slices (each x tile loaded once);
                    epilogue: + biases, store g and u, a = act(g) * u (fp32 of the rounded g, u,
                    rounded once) -- the only place a exists
            (gelu_ffn)  out = a @ w_down.T + b_down (kernels/gelu_ffn.py's plain matmul)
  backward  MODE 2  da = dout @ w_down; epilogue: load g, u, write dg = da * u * act'(g) and
                    du = da * act(g) and the per-tile column sums of both (db_gate / db_up
                    partials: no extra pass over dg, du)
            MODE 0  dw_down = dout.T @ a with a = act(g) * u recomputed on each loaded B tile
            MODE 4  dw_gate = dg.T @ x, dw_up = du.T @ x: two accumulators sharing each x tile
            MODE 3  dx = dg @ w_gate + du @ w_up: one accumulator, two products per K slice
            db_down = column sums of dout (kernels/_reduce.py)
Saved for backward (by the caller): x, g and u; a is recomputed. Weights are read through their
strides (nn.Linear layout; transposes and the row halves of a fused (2H, K) gate_up weight are
views), never copied. Activations: SiLU (g * sigmoid(g)), GELU tanh and exact erf GELU (the
helpers of kernels/gelu_ffn.py: tanh is a sigmoid, libdevice is unavailable in the interpreter).
fp32 inputs use ``input_precision="ieee"`` dots (no TF32).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import _reduce
from . import gelu_ffn as _ffn
from .gelu_ffn import _gelu, _gelu_grad

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}

# Per MODE and target: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), chosen from the AOT
# check's stack column (`python -m gptfast.kernels.check --only gffn`; every entry 0 B there).
# The two-accumulator modes (1: forward, 4: dw_gate/dw_up) hold twice gelu_ffn's accumulator
# registers; da's epilogue (2) holds acc, g, u, dg and du at once: with gelu_ffn's 128x128/4-warp
# tiles it spilled 2-5 KB (sm_80) and 288 B even at 128x128/8 warps (sm_90), so at most 32 fp32
# values per thread per tile. On sm_80 the 128x128/4-warp and 128x256 tiles spilled 120-200 B in
# the forward and dw_down; fp32 dw_down spilled ~430 B at 64x64 (act on the loaded B tile).
_DUAL_90 = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 3), (128, 128, 32, 8, 4), (64, 64, 64, 4, 3)]
_DUAL_80 = [(128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (128, 128, 32, 8, 3), (64, 64, 32, 4, 3)]
_SAFE_80 = [(128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 3)]
_DUAL_FP32 = [(32, 64, 32, 4, 3), (64, 32, 32, 4, 3), (32, 32, 32, 4, 2)]
_CONFIGS = {  # MODE -> {90: sm_90+ 16-bit, 80: sm_80 16-bit, 4: fp32 (ieee dots on FMA units)}
    0: {90: _ffn._CONFIGS[90], 80: _SAFE_80 + [(128, 128, 64, 8, 3)], 4: _DUAL_FP32},
    1: {90: _DUAL_90, 80: _SAFE_80, 4: _DUAL_FP32},
    2: {90: [(128, 64, 64, 8, 4), (64, 128, 64, 8, 4), (64, 64, 64, 4, 3)],
        80: [(128, 64, 32, 8, 4), (64, 128, 32, 8, 4), (64, 64, 32, 4, 3)], 4: _ffn._FP32_CONFIGS},
    3: {90: _ffn._CONFIGS[90], 80: _ffn._CONFIGS[80], 4: _ffn._FP32_CONFIGS},
    4: {90: _DUAL_90, 80: _DUAL_80, 4: _DUAL_FP32},
}
# MODE -> (A tiles, B tiles) in shared memory per pipeline stage
_TILES = {0: (1, 2), 1: (1, 2), 2: (1, 1), 3: (2, 2), 4: (2, 1)}
_ROWS = [r for lists in _CONFIGS.values() for rows in lists.values() for r in rows]
MIN_BLOCK_M = min(r[0] for r in _ROWS + [_ffn._INTERPRET_CONFIG])  # sizes the db partial buffers


def matmul_configs(arch: int, esize: int, mode: int) -> list[triton.Config]:
    """The configs the autotuner may select on ``arch`` for an element size and a MODE."""
    rows = _CONFIGS[mode][4 if esize == 4 else (90 if arch >= 90 else 80)]
    n_a, n_b = _TILES[mode]
    limit = _ffn.SMEM_LIMIT.get(arch, 99 * 1024)
    return _ffn.as_configs((bm, bn, bk, w, s) for bm, bn, bk, w, s in rows
                           if esize * s * (n_a * bm * bk + n_b * bk * bn) <= limit)


def _all_configs() -> list[triton.Config]:
    return _ffn.as_configs([_ffn._INTERPRET_CONFIG] if _INTERPRET else dict.fromkeys(_ROWS))


_prune = _ffn.make_prune(lambda arch, esize, MODE, **kwargs: matmul_configs(arch, esize, MODE))


@triton.jit
def _act(g, ACT: tl.constexpr):
    """act(g) in fp32: 0 SiLU, 1 GELU tanh, 2 exact GELU."""
    if ACT == 0:
        out = g * tl.sigmoid(g)
    else:
        out = _gelu(g, ACT == 1)
    return out


@triton.jit
def _act_grad(g, ACT: tl.constexpr):
    """act'(g) in fp32; SiLU' = s (1 + g (1 - s)) with s = sigmoid(g)."""
    if ACT == 0:
        s = tl.sigmoid(g)
        out = s * (1.0 + g * (1.0 - s))
    else:
        out = _gelu_grad(g, ACT == 1)
    return out


@triton.jit
def _load_k(ptrs, offs_k, k_left, K_AXIS: tl.constexpr, EVEN_K: tl.constexpr):
    """A K slice of an operand tile whose K dimension is axis K_AXIS; zeros past the K tail."""
    if EVEN_K:
        t = tl.load(ptrs)
    elif K_AXIS == 1:
        t = tl.load(ptrs, mask=offs_k[None, :] < k_left, other=0.0)
    else:
        t = tl.load(ptrs, mask=offs_k[:, None] < k_left, other=0.0)
    return t


@triton.autotune(
    configs=_all_configs(),
    key=["M", "N", "K", "MODE"],
    prune_configs_by={"early_config_prune": _prune},
    # Configs with different BLOCK_M write different numbers of partial rows: zero the buffers
    # before each benchmarked config and after tuning (as gelu_ffn's db1 partials).
    reset_to_zero=["ColSum", "ColSum2"],
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _gated_ffn_matmul_kernel(
    A,  # (M, K) left operand, any strides
    A2,  # (M, K) second left operand, A's strides (MODE 3, 4; dummy otherwise)
    B,  # (K, N) right operand, any strides (a weight's transpose is a stride swap)
    B2,  # (K, N) second right operand, its own strides (MODE 0: u, MODE 1: w_up.T, MODE 3: w_up)
    C,  # (M, N) output: MODE 1 g, MODE 2 dg, MODE 4 dw_gate, else the product
    C2,  # (M, N) second output, C's strides: MODE 1 u, MODE 2 du, MODE 4 dw_up (dummy otherwise)
    C3,  # (M, N) MODE 1: a = act(g) * u, C's strides (dummy otherwise)
    Bias, Bias2,  # (N,) MODE 1 biases of g and u (dummies unless HAS_BIAS / HAS_BIAS2)
    Aux, Aux2,  # (M, N) MODE 2: the saved g and u
    ColSum, ColSum2,  # (cdiv(M, BLOCK_M), N) fp32 per-tile column sums of dg / du (MODE 2)
    M, N, K,  # problem size
    stride_am, stride_ak,
    stride_bk, stride_bn,
    stride_b2k, stride_b2n,
    stride_cm, stride_cn,
    stride_xm, stride_xn,  # Aux strides
    stride_x2m, stride_x2n,  # Aux2 strides
    MODE: tl.constexpr,  # 0 dw_down, 1 forward, 2 da epilogue, 3 dx, 4 dw_gate + dw_up (header)
    HAS_BIAS: tl.constexpr, HAS_BIAS2: tl.constexpr,
    COLSUM: tl.constexpr, COLSUM2: tl.constexpr,  # write ColSum / ColSum2
    ACT: tl.constexpr,  # 0 silu, 1 gelu_tanh, 2 gelu
    DOT_PREC: tl.constexpr,  # "ieee" for fp32 inputs
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K masks in the main loop
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    # groups of 8 row tiles walk the column tiles together, sharing B tiles in L2
    pid_m, pid_n = tl.swizzle2d(pid // num_pid_n, pid % num_pid_n, num_pid_m, num_pid_n, 8)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # rows/columns wrapped mod M, N stay in bounds; the duplicates are dropped by the masked stores
    a_off = (offs_m % M)[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    col = (offs_n % N)[None, :].to(tl.int64)
    a_ptrs = A + a_off
    a2_ptrs = A2 + a_off
    b_ptrs = B + offs_k[:, None] * stride_bk + col * stride_bn
    b2_ptrs = B2 + offs_k[:, None] * stride_b2k + col * stride_b2n
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = _load_k(a_ptrs, offs_k, K - k0, 1, EVEN_K)
        b = _load_k(b_ptrs, offs_k, K - k0, 0, EVEN_K)
        if MODE == 0:
            # the B tile is a = act(g) * u, formed and rounded as in the forward
            b2 = _load_k(b2_ptrs, offs_k, K - k0, 0, EVEN_K)
            b = (_act(b.to(tl.float32), ACT) * b2.to(tl.float32)).to(A.dtype.element_ty)
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        elif MODE == 1:
            b2 = _load_k(b2_ptrs, offs_k, K - k0, 0, EVEN_K)
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
            acc2 = tl.dot(a, b2, acc2, input_precision=DOT_PREC)
        elif MODE == 2:
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        elif MODE == 3:
            a2 = _load_k(a2_ptrs, offs_k, K - k0, 1, EVEN_K)
            b2 = _load_k(b2_ptrs, offs_k, K - k0, 0, EVEN_K)
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
            acc = tl.dot(a2, b2, acc, input_precision=DOT_PREC)
        else:
            a2 = _load_k(a2_ptrs, offs_k, K - k0, 1, EVEN_K)
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
            acc2 = tl.dot(a2, b, acc2, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
        if MODE == 3 or MODE == 4:
            a2_ptrs += BLOCK_K * stride_ak
        if MODE == 0 or MODE == 1 or MODE == 3:
            b2_ptrs += BLOCK_K * stride_b2k

    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    rows = offs_m[:, None].to(tl.int64)
    c_off = rows * stride_cm + offs_n[None, :] * stride_cn
    out_ty = C.dtype.element_ty
    if MODE == 1:
        if HAS_BIAS:
            acc += tl.load(Bias + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS2:
            acc2 += tl.load(Bias2 + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        g = acc.to(out_ty)
        u = acc2.to(out_ty)
        tl.store(C + c_off, g, mask=c_mask)
        tl.store(C2 + c_off, u, mask=c_mask)
        # from g and u as rounded (what the backward recomputes a from), rounded once
        tl.store(C3 + c_off, (_act(g.to(tl.float32), ACT) * u.to(tl.float32)).to(out_ty), mask=c_mask)
    elif MODE == 2:
        g = tl.load(Aux + rows * stride_xm + offs_n[None, :] * stride_xn, mask=c_mask, other=0.0).to(tl.float32)
        u = tl.load(Aux2 + rows * stride_x2m + offs_n[None, :] * stride_x2n, mask=c_mask, other=0.0).to(tl.float32)
        dg = (acc * u * _act_grad(g, ACT)).to(out_ty)
        du = (acc * _act(g, ACT)).to(out_ty)
        # partial bias gradients: column sums of dg, du as rounded (the contract's db = sum dg)
        if COLSUM:
            part = tl.sum(tl.where(c_mask, dg.to(tl.float32), 0.0), 0)
            tl.store(ColSum + pid_m.to(tl.int64) * N + offs_n, part, mask=offs_n < N)
        if COLSUM2:
            part2 = tl.sum(tl.where(c_mask, du.to(tl.float32), 0.0), 0)
            tl.store(ColSum2 + pid_m.to(tl.int64) * N + offs_n, part2, mask=offs_n < N)
        tl.store(C + c_off, dg, mask=c_mask)
        tl.store(C2 + c_off, du, mask=c_mask)
    elif MODE == 4:
        tl.store(C + c_off, acc.to(out_ty), mask=c_mask)
        tl.store(C2 + c_off, acc2.to(out_ty), mask=c_mask)
    else:
        tl.store(C + c_off, acc.to(out_ty), mask=c_mask)


# ----------------------------------------------------------------------------------------------
# Launchers (contract: gptfast/ops/_backend.py)
# ----------------------------------------------------------------------------------------------
def _gemm(mode: int, a: torch.Tensor, b: torch.Tensor, outs: list[torch.Tensor], activation: str, *,
          a2=None, b2=None, bias=None, bias2=None, aux=None, aux2=None, colsum=None, colsum2=None) -> None:
    """Runs MODE ``mode`` on 2-D views a (M, K), b (K, N) of any strides into the fresh (M, N)
    tensors ``outs`` (one to three, see the kernel's C, C2, C3)."""
    M, K = a.shape
    N = b.shape[1]
    c = outs[0]
    c2 = outs[1] if len(outs) > 1 else c
    c3 = outs[2] if len(outs) > 2 else c
    assert all(o.stride() == c.stride() for o in outs)
    if a2 is not None:
        assert a2.shape == a.shape and a2.stride() == a.stride()
    b2_t = b2 if b2 is not None else b
    aux_t = aux if aux is not None else c
    aux2_t = aux2 if aux2 is not None else c

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    # unused pointers are the output c: reset_to_zero may zero a dummy ColSum, never an input
    _gated_ffn_matmul_kernel[grid](
        a, a2 if a2 is not None else a, b, b2_t, c, c2, c3,
        bias if bias is not None else c, bias2 if bias2 is not None else c, aux_t, aux2_t,
        colsum if colsum is not None else c, colsum2 if colsum2 is not None else c,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b2_t.stride(0), b2_t.stride(1),
        c.stride(0), c.stride(1), aux_t.stride(0), aux_t.stride(1), aux2_t.stride(0), aux2_t.stride(1),
        MODE=mode, HAS_BIAS=bias is not None, HAS_BIAS2=bias2 is not None,
        COLSUM=colsum is not None, COLSUM2=colsum2 is not None, ACT=ACTIVATIONS[activation],
        DOT_PREC="ieee" if a.dtype == torch.float32 else "tf32",
    )


def gated_ffn_forward(x: torch.Tensor, w_gate: torch.Tensor, b_gate: torch.Tensor | None, w_up: torch.Tensor,
                      b_up: torch.Tensor | None, w_down: torch.Tensor, b_down: torch.Tensor | None,
                      activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    M = x.shape[0]
    H = w_gate.shape[0]
    g, u, a = (torch.empty((M, H), dtype=x.dtype, device=x.device) for _ in range(3))
    _gemm(1, x, w_gate.t(), [g, u, a], activation, b2=w_up.t(), bias=b_gate, bias2=b_up)
    out = _ffn._matmul(a, w_down.t(), bias=b_down)
    return out, g, u


def gated_ffn_backward(dout: torch.Tensor, x: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
                       w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, has_b_gate: bool,
                       has_b_up: bool, has_b_down: bool, activation: str):
    M, K = x.shape
    H = w_gate.shape[0]
    N = w_down.shape[0]
    new = lambda *shape: torch.empty(shape, dtype=x.dtype, device=x.device)  # noqa: E731
    # Zeroed: rows past cdiv(M, chosen BLOCK_M) are never written and must add nothing.
    parts = [torch.zeros((triton.cdiv(M, MIN_BLOCK_M), H), dtype=torch.float32, device=x.device) if has else None
             for has in (has_b_gate, has_b_up)]
    dg, du = new(M, H), new(M, H)
    _gemm(2, dout, w_down, [dg, du], activation, aux=g, aux2=u, colsum=parts[0], colsum2=parts[1])
    dw_down = new(N, H)
    _gemm(0, dout.t(), g, [dw_down], activation, b2=u)
    dw_gate, dw_up = new(H, K), new(H, K)
    _gemm(4, dg.t(), x, [dw_gate, dw_up], activation, a2=du.t())
    dx = new(M, K)
    _gemm(3, dg, w_gate, [dx], activation, a2=du, b2=w_up)
    db_gate = _reduce.colsum(parts[0], w_gate.dtype) if has_b_gate else None
    db_up = _reduce.colsum(parts[1], w_up.dtype) if has_b_up else None
    db_down = _reduce.colsum(dout, w_down.dtype) if has_b_down else None
    return dx, dw_gate, db_gate, dw_up, db_up, dw_down, db_down
