"""Triton flash-attention (FlashAttention-2), forward and backward.

Algorithm: Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning"
(2023). Forward: one program per (query block, batch*head); it streams key/value blocks through
an online softmax with fp32 accumulators, working in base 2 (scores pre-multiplied by
``softmax_scale * log2(e)`` so the hot loop uses ``exp2``). Causal blocks above the diagonal are
never loaded; blocks strictly below it run without masks, only the diagonal and the key tail mask.
Saved for backward (by the caller): q, k, v, out and the per-row logsumexp (natural log, fp32) --
O(T) memory, never the T x T matrix.

Backward (FA-2 split, no atomics, hence always deterministic):
  1. ``_attention_bwd_preprocess_kernel``: delta_i = rowsum(dO_i * O_i) in fp32.
  2. ``_attention_bwd_dkdv_kernel``: one program per key block; recomputes P^T from K, Q and lse,
     accumulates dV += P^T dO and dK += dS^T Q over the query blocks that can see it.
  3. ``_attention_bwd_dq_kernel``: one program per query block; dQ += dS K over the visible keys.
P is recomputed twice (steps 2 and 3) instead of accumulating dQ with atomics; this costs one
extra QK^T per block but makes ``deterministic=True`` free.

Layout: (batch, seqlen, nheads, headdim), any batch/seq/head strides, stride(-1) == 1. Head dims
that are not a power of two are padded to ``BLOCK_D`` (next power of two, >= 16) by masked loads;
the padding columns are zeros, so they change neither QK^T nor the stored output.

fp32 inputs use ``input_precision="ieee"`` dots (no TF32), matching PyTorch's default fp32 matmul.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634

# Shared memory per block (bytes) usable by one program, by compute capability major.minor.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _block_d(head_dim: int) -> int:
    # tl.dot needs K >= 16; powers of two keep arange/tile shapes legal.
    return max(16, triton.next_power_of_2(head_dim))


def _device_arch(device: torch.device) -> int:
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


# ----------------------------------------------------------------------------------------------
# Configurations: (BLOCK_M, BLOCK_N, num_warps, num_stages) per target and padded head dim (<= 64,
# 128, 256; fp32 inputs have their own small list: ieee dots run on FMA units and large tiles
# spill). BLOCK_M % BLOCK_N == 0 is required by the forward's causal split (the unmasked region
# ends on a BLOCK_M boundary). sm_90: every dot's row dim is 64 per warpgroup (BLOCK_M = 64 with
# 4 warps, 128 with 8), the wgmma tile height; sm_80 (163 KB shared memory) uses shallower
# pipelines at large head dims. Registers/spills of each entry: `python -m gptfast.kernels.check`.
# ----------------------------------------------------------------------------------------------
_FWD_CONFIGS = {
    90: {64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
         128: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3)],
         256: [(128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2), (64, 32, 4, 3)]},
    80: {64: [(128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 2)],
         128: [(128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
         256: [(64, 64, 4, 2), (64, 32, 4, 2), (128, 32, 8, 2)]},
}
_BWD_CONFIGS = {  # (BLOCK_M, BLOCK_N) shared by the dK/dV (BLOCK_N rows) and dQ (BLOCK_M rows) kernels
    # sm_90 at d=128/256: 8 warps, because with 4 the dK/dV kernel's two fp32 (BLOCK_N, d)
    # accumulators spill (AOT check: d=128 64x64 w4 48 B stack, d=256 64x64 w4 1264 B).
    90: {64: [(64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 2), (64, 64, 8, 3)],
         128: [(64, 64, 8, 2), (64, 64, 8, 3), (64, 128, 8, 2)],
         256: [(64, 64, 8, 2)]},  # register-bound: 4 warps or 1 stage spill hundreds of bytes
    80: {64: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3)],
         128: [(64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2)],
         256: [(64, 64, 8, 1), (64, 32, 4, 2), (32, 32, 4, 2)]},
}
_FP32_CONFIGS = [(32, 32, 4, 2), (32, 16, 4, 2), (64, 16, 4, 2)]
_INTERPRET_CONFIG = (32, 16, 4, 1)  # small tiles: the interpreter is ~1000x slower than a GPU


def _fwd_smem(bm, bn, stages, block_d, esize):
    # q tile once, a (k, v) pair per pipeline stage, plus the p tile re-staged for the second dot.
    return esize * (bm * block_d + stages * 2 * bn * block_d + bm * bn)


def _bwd_smem(bm, bn, stages, block_d, esize):
    # dkdv: k, v resident; q, dO per stage; P^T and dS^T re-staged for their dots.
    return esize * (2 * bn * block_d + stages * 2 * bm * block_d + 2 * bm * bn)


def _select(table, smem_fn, arch, block_d, esize):
    rows = _FP32_CONFIGS if esize == 4 else table[90 if arch >= 90 else 80][max(64, block_d)]
    out = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
           for bm, bn, w, s in rows if smem_fn(bm, bn, s, block_d, esize) <= SMEM_LIMIT.get(arch, 99 * 1024)]
    return out or [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]


def fwd_configs(arch: int, block_d: int, esize: int) -> list[triton.Config]:
    """The forward configs the autotuner may select for ``arch``/``block_d``/element size."""
    return _select(_FWD_CONFIGS, _fwd_smem, arch, block_d, esize)


def bwd_configs(arch: int, block_d: int, esize: int) -> list[triton.Config]:
    """The backward (dK/dV and dQ) configs the autotuner may select."""
    return _select(_BWD_CONFIGS, _bwd_smem, arch, block_d, esize)


def _all_configs(table):
    if _INTERPRET:
        bm, bn, w, s = _INTERPRET_CONFIG
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)]
    rows = [r for per_arch in table.values() for per_d in per_arch.values() for r in per_d]
    rows = list(dict.fromkeys(rows + _FP32_CONFIGS + [(32, 16, 4, 1)]))
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in rows]


def _same(c, d):
    return c.kwargs == d.kwargs and c.num_warps == d.num_warps and c.num_stages == d.num_stages


def _make_prune(select):
    def prune(configs, named_args, **kwargs):
        if _INTERPRET:
            return configs
        q = named_args["Q"]
        allowed = select(_device_arch(q.device), kwargs["BLOCK_D"], q.element_size())
        if os.environ.get("GPTFAST_TRITON_AUTOTUNE") == "0":  # tests: skip benchmarking
            allowed = allowed[:1]
        return [c for c in configs if any(_same(c, a) for a in allowed)] or configs[-1:]
    return prune


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attention_fwd_inner(
    acc, l_i, m_i,  # running output (BLOCK_M, BLOCK_D) fp32, row sums and row maxima (base 2)
    q,  # (BLOCK_M, BLOCK_D) query tile, input dtype
    k_base, v_base,  # pointers to key/value row 0 of this (batch, head)
    stride_kt, stride_vt,  # seq strides of k and v (elements)
    offs_m, offs_d,  # query row indices, head-dim indices
    lo, hi,  # key range [lo, hi) to visit, lo a multiple of BLOCK_N
    T,  # sequence length
    qk_scale,  # softmax_scale * log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
    MASK_KEYS: tl.constexpr,  # mask keys >= T (tail block)
    MASK_CAUSAL: tl.constexpr,  # mask keys after the query (diagonal block)
    DOT_PREC: tl.constexpr,  # "ieee" for fp32 inputs, else ignored
):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]
        if MASK_KEYS:
            if EVEN_D:
                kv_mask = offs_n[:, None] < T
            else:
                kv_mask = (offs_n[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        else:
            if EVEN_D:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
                v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if MASK_KEYS:
            qk = tl.where(offs_n[None, :] < T, qk, float("-inf"))
        if MASK_CAUSAL:
            qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen only masked keys keeps m = -inf; subtracting 0 instead keeps
        # exp2(-inf - m) = 0 rather than exp2(nan).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(
    configs=_all_configs(_FWD_CONFIGS),
    key=["HEAD_DIM", "T_BUCKET", "IS_CAUSAL"],
    prune_configs_by={"early_config_prune": _make_prune(fwd_configs)},
)
@triton.jit(do_not_specialize=["T_BUCKET"])  # key-only argument: one binary for every T
def _attention_fwd_kernel(
    Q, K, V,  # inputs (B, T, H, D), stride(-1) == 1
    Out,  # output (B, T, H, D), same dtype as Q
    Lse,  # logsumexp (B, H, T) fp32, contiguous
    stride_qb, stride_qt, stride_qh,  # q strides (elements)
    stride_kb, stride_kt, stride_kh,  # k strides
    stride_vb, stride_vt, stride_vh,  # v strides
    stride_ob, stride_ot, stride_oh,  # out strides
    T,  # sequence length
    H,  # number of heads
    qk_scale,  # softmax_scale * log2(e)
    T_BUCKET,  # next power of two of T: autotune key only, so decoding does not retune every step
    HEAD_DIM: tl.constexpr,  # true head dim
    BLOCK_D: tl.constexpr,  # padded head dim (power of two >= 16)
    EVEN_D: tl.constexpr,  # HEAD_DIM == BLOCK_D: drop head-dim masks
    IS_CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner iteration
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)  # int64: batch offsets overflow int32 on large inputs
    off_h = (off_bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    if EVEN_D:
        q_mask = offs_m[:, None] < T
    else:
        q_mask = (offs_m[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if IS_CAUSAL:
        # Keys < start_m*BLOCK_M are visible to every row of this block and all < T: no masks.
        full_hi = start_m * BLOCK_M
        acc, l_i, m_i = _attention_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, 0, full_hi, T,
            qk_scale, HEAD_DIM, BLOCK_N, EVEN_D, False, False, DOT_PREC)
        # The diagonal block(s); blocks above the diagonal are never visited.
        diag_hi = tl.minimum((start_m + 1) * BLOCK_M, T)
        acc, l_i, m_i = _attention_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, full_hi, diag_hi, T,
            qk_scale, HEAD_DIM, BLOCK_N, EVEN_D, True, True, DOT_PREC)
    else:
        full_hi = (T // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _attention_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, 0, full_hi, T,
            qk_scale, HEAD_DIM, BLOCK_N, EVEN_D, False, False, DOT_PREC)
        acc, l_i, m_i = _attention_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, full_hi, T, T,
            qk_scale, HEAD_DIM, BLOCK_N, EVEN_D, True, False, DOT_PREC)

    # Contract: a row with no unmasked key has out = 0 and lse = -inf (never 0/0).
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_i)) * 0.6931471805599453)  # x ln 2: back to natural log
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_mask)
    tl.store(Lse + off_bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attention_bwd_preprocess_kernel(
    Out, DO,  # output (contiguous) and its gradient (stride(-1) == 1), (B, T, H, D)
    Delta,  # (B, H, T) fp32 output: rowsum(dO * O)
    stride_ob, stride_ot, stride_oh,  # out strides
    stride_dob, stride_dot, stride_doh,  # dout strides
    T, H,  # sequence length, heads
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + off_bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.autotune(
    configs=_all_configs(_BWD_CONFIGS),
    key=["HEAD_DIM", "T_BUCKET", "IS_CAUSAL"],
    prune_configs_by={"early_config_prune": _make_prune(bwd_configs)},
)
@triton.jit(do_not_specialize=["T_BUCKET"])  # key-only argument: one binary for every T
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO,  # inputs (B, T, H, D), stride(-1) == 1
    Lse, Delta,  # (B, H, T) fp32: forward logsumexp (natural log), rowsum(dO * O)
    DK, DV,  # outputs (B, T, H, D), contiguous
    stride_qb, stride_qt, stride_qh,  # q strides
    stride_kb, stride_kt, stride_kh,  # k strides
    stride_vb, stride_vt, stride_vh,  # v strides
    stride_dob, stride_dot, stride_doh,  # dout strides
    stride_gb, stride_gt, stride_gh,  # dk/dv strides (same contiguous layout)
    T, H,  # sequence length, heads
    softmax_scale,  # scale applied to QK^T
    qk_scale,  # softmax_scale * log2(e)
    T_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per inner iteration
    BLOCK_N: tl.constexpr,  # key rows per program
):
    start_n = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    kv_mask = (offs_n[:, None] < T) & d_ok
    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    row_base = off_bh.to(tl.int64) * T
    # Causal: queries before this key block cannot see it; start at the query block holding it.
    lo = (start_n * BLOCK_N // BLOCK_M) * BLOCK_M if IS_CAUSAL else 0
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(lo, T, BLOCK_M):
        offs_m = start_m + offs_m0
        q_mask = (offs_m[:, None] < T) & d_ok
        q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(Lse + row_base + offs_m, mask=offs_m < T, other=0.0)
        delta = tl.load(Delta + row_base + offs_m, mask=offs_m < T, other=0.0)
        # lse = -inf marks a row with no visible key: make its P exactly 0 instead of exp2(+inf).
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
        visible = offs_m[None, :] < T
        if IS_CAUSAL:
            visible = visible & (offs_m[None, :] >= offs_n[:, None])
        # Mask before exp2: masked scores can exceed lse, and exp2 of them would overflow.
        pT = tl.exp2(tl.where(visible, qkT, float("-inf")) - lse2[None, :])
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
    dk = dk * softmax_scale
    g_off = off_b * stride_gb + off_h * stride_gh + offs_n[:, None] * stride_gt + offs_d[None, :]
    tl.store(DK + g_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(
    configs=_all_configs(_BWD_CONFIGS),
    key=["HEAD_DIM", "T_BUCKET", "IS_CAUSAL"],
    prune_configs_by={"early_config_prune": _make_prune(bwd_configs)},
)
@triton.jit(do_not_specialize=["T_BUCKET"])  # key-only argument: one binary for every T
def _attention_bwd_dq_kernel(
    Q, K, V, DO,  # inputs (B, T, H, D), stride(-1) == 1
    Lse, Delta,  # (B, H, T) fp32
    DQ,  # output (B, T, H, D), contiguous
    stride_qb, stride_qt, stride_qh,  # q strides
    stride_kb, stride_kt, stride_kh,  # k strides
    stride_vb, stride_vt, stride_vh,  # v strides
    stride_dob, stride_dot, stride_doh,  # dout strides
    stride_gb, stride_gt, stride_gh,  # dq strides
    T, H,  # sequence length, heads
    softmax_scale,  # scale applied to QK^T
    qk_scale,  # softmax_scale * log2(e)
    T_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner iteration
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    q_mask = (offs_m[:, None] < T) & d_ok
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=q_mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=q_mask, other=0.0)
    row_base = off_bh.to(tl.int64) * T
    lse = tl.load(Lse + row_base + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(Delta + row_base + offs_m, mask=offs_m < T, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    hi = tl.minimum((start_m + 1) * BLOCK_M, T) if IS_CAUSAL else T
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kv_mask = (offs_n[:, None] < T) & d_ok
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        visible = offs_n[None, :] < T
        if IS_CAUSAL:
            visible = visible & (offs_m[:, None] >= offs_n[None, :])
        p = tl.exp2(tl.where(visible, qk, float("-inf")) - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    dq = dq * softmax_scale
    g_off = off_b * stride_gb + off_h * stride_gh + offs_m[:, None] * stride_gt + offs_d[None, :]
    tl.store(DQ + g_off, dq.to(DQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------------
# Launchers (contract: gptfast/ops/_backend.py)
# ----------------------------------------------------------------------------------------------
def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                      softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, H, D = q.shape
    out = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    block_d = _block_d(D)

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_M"]), B * H)

    _attention_fwd_kernel[grid](
        q, k, v, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        T, H, softmax_scale * LOG2E, triton.next_power_of_2(T),
        HEAD_DIM=D, BLOCK_D=block_d, EVEN_D=D == block_d, IS_CAUSAL=bool(causal),
        DOT_PREC=_dot_prec(q.dtype),
    )
    return out, lse


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, causal: bool, softmax_scale: float,
                       deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # ``deterministic`` is accepted for the contract; this backward never uses atomics, so every
    # call is bitwise reproducible whatever its value.
    del deterministic
    B, T, H, D = q.shape
    block_d = _block_d(D)
    out = out.contiguous() if out.stride(-1) != 1 else out
    lse = lse.contiguous()
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    pre_block = 32 if _INTERPRET else max(16, min(128, 2048 // block_d))
    _attention_bwd_preprocess_kernel[(triton.cdiv(T, pre_block), B * H)](
        out, dout, delta,
        out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        T, H, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=pre_block,
    )
    dq = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, T, H, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, T, H, D), dtype=v.dtype, device=q.device)
    common = (
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        T, H, softmax_scale, softmax_scale * LOG2E, triton.next_power_of_2(T),
    )
    meta = dict(HEAD_DIM=D, BLOCK_D=block_d, IS_CAUSAL=bool(causal), DOT_PREC=_dot_prec(q.dtype))
    _attention_bwd_dkdv_kernel[lambda m: (triton.cdiv(T, m["BLOCK_N"]), B * H)](
        q, k, v, dout, lse, delta, dk, dv, *common, **meta)
    _attention_bwd_dq_kernel[lambda m: (triton.cdiv(T, m["BLOCK_M"]), B * H)](
        q, k, v, dout, lse, delta, dq, *common, **meta)
    return dq, dk, dv
