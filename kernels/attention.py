"""Triton flash-attention (FlashAttention-2), forward and backward.

Algorithm: Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning"
(2023). Forward: one program per (query block, batch*head); it streams key/value blocks through
an online softmax with fp32 accumulators, working in base 2 (scores pre-multiplied by
``softmax_scale * log2(e)`` so the hot loop uses ``exp2``). Causal blocks above the diagonal are
never loaded; blocks strictly below it run without masks, only the diagonal and the key tail mask.
Saved for backward (by the caller): q, k, v, out and the per-row logsumexp (natural log, fp32) --
O(T) memory, never the T x T matrix.

Options (FlashAttention 2.8's dense ones; semantics in gptfast/ops/attention.py): GQA/MQA (a
query head reads kv head h // (H / Hk) in place, K/V are never repeated), seqlen_q != seqlen_k
(masks aligned to the bottom-right corner), sliding windows (only the key blocks a query block can
see are visited, and of those only blocks not wholly visible pay for masks; causal is the window
(-1, 0)), softcap, ALiBi and dropout (Philox 4x32-10 regenerated in the backward with
gptfast.ops._philox's exact counter layout; lse is the undropped one). Window sides are runtime
integers (unbounded = Tq + Tk, so no branches), softcap/ALiBi/dropout constexprs: the plain path
compiles without them and gives bitwise the results it gave before the options (interpreter-checked).

Backward (FA-2 split, no atomics, hence always deterministic):
  1. ``_attention_bwd_preprocess_kernel``: delta_i = rowsum(dO_i * O_i) in fp32.
  2. ``_attention_bwd_dkdv_kernel``: one program per key block; recomputes P^T from K, Q and lse,
     accumulates dV += P^T dO and dK += dS^T Q over the query blocks that can see it -- and,
     under GQA, over its kv head's query heads in a fixed order (one program per kv head).
  3. ``_attention_bwd_dq_kernel``: one program per query block; dQ += dS K over the visible keys.
P is recomputed twice (steps 2 and 3) instead of accumulating dQ with atomics; this costs one
extra QK^T per block but makes ``deterministic=True`` free.

Layout: q (batch, seqlen_q, nheads, headdim), k/v (batch, seqlen_k, nheads_k, headdim), any
batch/seq/head strides, stride(-1) == 1. Head dims that are not a power of two are padded to
``BLOCK_D`` (next power of two, >= 16) by masked loads; the padding columns are zeros, so they
change neither QK^T nor the stored output.

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
# Score modifiers shared by the forward and both backward kernels. Indices come pre-broadcast:
# ``ri`` the query rows, ``cj`` the key columns, shaped (BLOCK_M, 1) x (1, BLOCK_N) in the forward
# and dQ kernels and (1, BLOCK_M) x (BLOCK_N, 1) in the dK/dV kernel (which works on S^T).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    # libdevice tanh does not run in the interpreter. 1 - 2/(e^2x + 1) is right at +-inf (+-1)
    # and propagates NaN, but is off by ~1 ulp of 1 near 0, where softcapped scores live
    # (x = s / softcap ~ 0.03): there the Taylor series to x^9 (truncation < 1e-9 at |x| < 1/4)
    # keeps the relative error at a few ulp (fp32 out error at softcap 30, T=65: 2.3e-6 -> 4.8e-7).
    x2 = x * x
    poly = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * 0.021869488536155203))))
    big = 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)  # 2 log2(e)
    return tl.where(tl.abs(x) < 0.25, poly, big)


@triton.jit
def _scores(qk, ri, cj, Tq, Tk, shift, left, right, qk_scale, softcap_scale, softcap2, slope2,
            MASKED: tl.constexpr, KEY_TAIL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
            HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Base-2 scores of the raw dot ``qk`` (x log2(e)) and tanh(scale qk / softcap) (the softcap
    backward's factor; ``s`` itself without softcap). Order as attention.py: scale, softcap,
    ALiBi, masks. ``left``/``right`` are window sides with unbounded ones replaced by Tq + Tk;
    HAS_LEFT/HAS_RIGHT say which are bounded (causal: right = 0), so the plain path pays for the
    comparisons it paid for before the options (AOT check: up to 300 B of spills otherwise).
    KEY_TAIL masks keys >= Tk (forward, dQ), else query rows >= Tq (dK/dV, whose rows >= Tk are
    never stored)."""
    if HAS_SOFTCAP:
        t = _tanh(qk * softcap_scale)  # softcap_scale = scale / softcap
        s = t * softcap2  # softcap * log2(e)
    else:
        s = qk * qk_scale
        t = s
    if HAS_ALIBI:
        s = s - slope2 * tl.abs(ri + shift - cj).to(tl.float32)  # slope2 = slope * log2(e)
    if MASKED:
        if KEY_TAIL:
            vis = cj < Tk
        else:
            vis = ri < Tq
        if HAS_RIGHT:
            vis = vis & (cj <= ri + (shift + right))
        if HAS_LEFT:
            vis = vis & (cj >= ri + (shift - left))
        s = tl.where(vis, s, float("-inf"))
    return s, t


@triton.jit
def _dropout_key(Rng, HAS_DROPOUT: tl.constexpr):
    """(seed, offset / 4) of gptfast.ops._philox's layout, loaded from the int64 [seed, offset]
    tensor on the device: no host value is baked into a launch, so CUDA graphs replay with the
    key each call draws (gptfast.ops._philox.dropout_rng_state) and nothing waits for the host."""
    if HAS_DROPOUT:
        seed = tl.load(Rng)
        rng_base = (tl.load(Rng + 1).to(tl.uint64, bitcast=True) >> 2).to(tl.int64)
    else:
        seed = 0
        rng_base = 0
    return seed, rng_base


@triton.jit
def _dropout_keep(seed, rng_base, bh, start_m, start_n, threshold,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) keep bits of rows start_m.., columns start_n.. (a multiple of 4) of
    (batch * H + head) ``bh``, exactly gptfast.ops._philox's layout: one Philox 4x32-10 call per
    4 columns of a row with counter (n lo, n hi, i, bh), n = offset / 4 + j // 4, word m ->
    column 4 (j // 4) + m; kept iff the word >= threshold = floor(p * 2^32). Drawing per group
    of 4 and interleaving (join + reshape) instead of per element: AOT check, forward with every
    option, d=64, 128x64, 4 warps: 296 B of stack against 1016 B (sm_80), 112 against 1160 (sm_90),
    for 32 KB more shared memory (the reshape's layout change)."""
    rows = start_m + tl.arange(0, BLOCK_M)[:, None]
    n = rng_base + (start_n // 4 + tl.arange(0, BLOCK_N // 4)[None, :]).to(tl.int64)
    r0, r1, r2, r3 = tl.philox(seed, n.to(tl.uint32), (n >> 32).to(tl.uint32), rows.to(tl.uint32),
                               bh.to(tl.uint32))  # the words broadcast inside philox's rounds
    # join appends a last axis: [i, g, y, x] of join(join(r0, r2), join(r1, r3)) is word 2y + x,
    # which the row-major reshape puts at column 4g + 2y + x.
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_N))
    return r.to(tl.int64) >= threshold


@triton.jit
def _dropout_keep_t(seed, rng_base, bh, ri, cj, threshold):
    """The same bits for any broadcast rows ``ri`` / columns ``cj`` (the dK/dV kernel's
    transposed tile), element by element: 4 words drawn, one used. Measured with the AOT check
    (sm_80, d=64, 64x64, 4 warps): 200 B of stack, against 4168 B for tl.trans of the tile above."""
    n = rng_base + (cj // 4).to(tl.int64)  # the words broadcast inside philox's rounds
    r0, r1, r2, r3 = tl.philox(seed, n.to(tl.uint32), (n >> 32).to(tl.uint32), ri.to(tl.uint32),
                               bh.to(tl.uint32))
    w = cj % 4
    r = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
    return r.to(tl.int64) >= threshold


@triton.jit
def _sequence(Cu_q, Cu_k, b):
    """Packed (varlen) layout: (first q row, first k row, Tq, Tk) of sequence ``b``, read from the
    int32 prefix sums cu_seqlens_q/k on the device (no host synchronisation)."""
    q0 = tl.load(Cu_q + b)
    k0 = tl.load(Cu_k + b)
    return q0.to(tl.int64), k0.to(tl.int64), tl.load(Cu_q + b + 1) - q0, tl.load(Cu_k + b + 1) - k0


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attention_fwd_inner(
    acc, l_i, m_i,  # running output (BLOCK_M, BLOCK_D) fp32, row sums and row maxima (base 2)
    q,  # (BLOCK_M, BLOCK_D) query tile, input dtype
    k_base, v_base,  # pointers to key/value row 0 of this (batch, kv head)
    stride_kt, stride_vt,  # seq strides of k and v (elements)
    m0, offs_m, offs_d,  # first query row, query row indices, head-dim indices
    lo, hi,  # key range [lo, hi) to visit, lo a multiple of BLOCK_N
    Tq, Tk, shift, left, right,  # lengths, Tk - Tq, window sides (unbounded = Tq + Tk)
    qk_scale, softcap_scale, softcap2, slope2,  # score constants (see _scores)
    seed, rng_base, bh, threshold, drop_scale,  # dropout: Philox key, offset / 4, b*H+h, floor(p 2^32), 1/(1-p)
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
    MASKED: tl.constexpr,  # apply key-tail and window masks (blocks not wholly visible)
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,  # window sides bounded (causal: right = 0)
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr,  # "ieee" for fp32 inputs, else ignored
):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]
        if MASKED:
            if EVEN_D:
                kv_mask = offs_n[:, None] < Tk
            else:
                kv_mask = (offs_n[:, None] < Tk) & (offs_d[None, :] < HEAD_DIM)
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        else:
            if EVEN_D:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
                v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        qk, _t = _scores(qk, offs_m[:, None], offs_n[None, :], Tq, Tk, shift, left, right, qk_scale,
                         softcap_scale, softcap2, slope2, MASKED, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen only masked keys keeps m = -inf; subtracting 0 instead keeps
        # exp2(-inf - m) = 0 rather than exp2(nan).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)  # undropped: lse is dropout's normaliser
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_base, bh, m0, start_n, threshold, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p * drop_scale, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


_FWD_KEY = ["HEAD_DIM", "T_BUCKET", "TK_BUCKET", "HAS_LEFT", "HAS_RIGHT", "HAS_SOFTCAP", "HAS_ALIBI",
            "HAS_DROPOUT", "IS_VARLEN"]


@triton.autotune(
    configs=_all_configs(_FWD_CONFIGS),
    key=_FWD_KEY,
    prune_configs_by={"early_config_prune": _make_prune(fwd_configs)},
)
@triton.jit(do_not_specialize=["T_BUCKET", "TK_BUCKET", "threshold"])
def _attention_fwd_kernel(
    Q,  # queries (B, Tq, H, D), stride(-1) == 1
    K, V,  # keys/values (B, Tk, Hk, D), stride(-1) == 1
    Out,  # output (B, Tq, H, D), same dtype as Q
    Lse,  # logsumexp (B, H, Tq) fp32, contiguous
    Alibi,  # ALiBi slopes fp32 (H,) or (B, H) (any pointer without ALiBi)
    Cu_q, Cu_k,  # varlen: int32 (B + 1,) prefix sums of the sequence lengths (any pointer when dense)
    stride_qb, stride_qt, stride_qh,  # q strides (elements)
    stride_kb, stride_kt, stride_kh,  # k strides
    stride_vb, stride_vt, stride_vh,  # v strides
    stride_ob, stride_ot, stride_oh,  # out strides
    stride_ab,  # slopes' batch stride (0 for (H,))
    Tq, Tk,  # query and key lengths (varlen: the packed totals; each sequence's come from Cu_q/Cu_k)
    H,  # number of query heads
    GROUP,  # H // Hk: query heads per kv head
    left, right,  # window sides, unbounded = Tq + Tk (causal: right = 0)
    qk_scale,  # softmax_scale * log2(e)
    softcap_scale, softcap2,  # softmax_scale / softcap, softcap * log2(e)
    Rng, threshold,  # dropout: int64 [seed, offset] (read on the device), floor(p * 2^32)
    drop_scale,  # 1 / (1 - p)
    T_BUCKET, TK_BUCKET,  # next powers of two of Tq, Tk: autotune keys only (decoding does not retune)
    HEAD_DIM: tl.constexpr,  # true head dim
    BLOCK_D: tl.constexpr,  # padded head dim (power of two >= 16)
    EVEN_D: tl.constexpr,  # HEAD_DIM == BLOCK_D: drop head-dim masks
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,  # window sides bounded (causal: right = 0)
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    IS_VARLEN: tl.constexpr,  # packed sequences: batch entry b is rows Cu[b].. (batch strides 0)
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner iteration
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    seed, rng_base = _dropout_key(Rng, HAS_DROPOUT)
    off_b = (off_bh // H).to(tl.int64)  # int64: batch offsets overflow int32 on large inputs
    off_h = (off_bh % H).to(tl.int64)
    off_hk = off_h // GROUP  # GQA: the kv head this query head reads; K/V are never repeated
    m0 = start_m * BLOCK_M
    if IS_VARLEN:
        # Sequence off_b from here on is a dense batch entry of lengths (Tq, Tk) whose rows start
        # at q0/k0: the grid is sized by the longest sequence, so blocks past this one's end stop.
        total_q = Tq
        q0, k0, Tq, Tk = _sequence(Cu_q, Cu_k, off_b)
        if m0 >= Tq:
            return
        Q += q0 * stride_qt
        Out += q0 * stride_ot
        K += k0 * stride_kt
        V += k0 * stride_vt
        Lse += off_h * total_q + q0  # (H, total_q)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    if EVEN_D:
        q_mask = offs_m[:, None] < Tq
    else:
        q_mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + off_b * stride_ab + off_h) * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Row i sees keys [i + shift - left, i + shift + right]: visit only the key blocks some row
    # of this block sees, and split them into [lo, full_lo) masked, [full_lo, full_hi) seen by
    # every row and inside Tk (no masks), [full_hi, hi) masked. Plain causal: [0, m0) unmasked,
    # then the diagonal block(s); plain non-causal: all full blocks, then the key tail.
    shift = Tk - Tq
    lo = tl.maximum(m0 + shift - left, 0) // BLOCK_N * BLOCK_N  # clamp first: no negative division
    hi = tl.maximum(tl.minimum(Tk, m0 + BLOCK_M + shift + right), lo)
    bh = off_bh
    if HAS_LEFT:  # without a left side, every key before the right edge is seen by all rows
        full_lo = tl.minimum(tl.cdiv(tl.maximum(m0 + BLOCK_M - 1 + shift - left, lo), BLOCK_N) * BLOCK_N, hi)
        acc, l_i, m_i = _attention_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, m0, offs_m, offs_d, lo, full_lo,
            Tq, Tk, shift, left, right, qk_scale, softcap_scale, softcap2, slope2,
            seed, rng_base, bh, threshold, drop_scale,
            HEAD_DIM, BLOCK_M, BLOCK_N, EVEN_D, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
            DOT_PREC)
    else:
        full_lo = lo
    full_hi = tl.minimum(tl.maximum(m0 + shift + right + 1, 0) // BLOCK_N * BLOCK_N, Tk // BLOCK_N * BLOCK_N)
    full_hi = tl.maximum(full_hi, full_lo)
    acc, l_i, m_i = _attention_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, m0, offs_m, offs_d, full_lo, full_hi,
        Tq, Tk, shift, left, right, qk_scale, softcap_scale, softcap2, slope2,
        seed, rng_base, bh, threshold, drop_scale,
        HEAD_DIM, BLOCK_M, BLOCK_N, EVEN_D, False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
        DOT_PREC)
    acc, l_i, m_i = _attention_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, m0, offs_m, offs_d, full_hi, hi,
        Tq, Tk, shift, left, right, qk_scale, softcap_scale, softcap2, slope2,
        seed, rng_base, bh, threshold, drop_scale,
        HEAD_DIM, BLOCK_M, BLOCK_N, EVEN_D, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
        DOT_PREC)

    # Contract: a row with no unmasked key has out = 0 and lse = -inf (never 0/0).
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_i)) * 0.6931471805599453)  # x ln 2: back to natural log
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_mask)
    if IS_VARLEN:
        tl.store(Lse + offs_m, lse, mask=offs_m < Tq)
    else:
        tl.store(Lse + off_bh.to(tl.int64) * Tq + offs_m, lse, mask=offs_m < Tq)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attention_bwd_preprocess_kernel(
    Out, DO,  # output (contiguous) and its gradient (stride(-1) == 1), (B, T, H, D)
    Delta,  # (B, H, T) fp32 output: rowsum(dO * O)
    stride_ob, stride_ot, stride_oh,  # out strides
    stride_dob, stride_dot, stride_doh,  # dout strides
    T, H,  # query length, heads
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


_BWD_KEY = _FWD_KEY


@triton.autotune(
    configs=_all_configs(_BWD_CONFIGS),
    key=_BWD_KEY,
    prune_configs_by={"early_config_prune": _make_prune(bwd_configs)},
)
@triton.jit(do_not_specialize=["T_BUCKET", "TK_BUCKET", "threshold"])
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO,  # q, dout (B, Tq, H, D); k, v (B, Tk, Hk, D); stride(-1) == 1
    Lse, Delta,  # (B, H, Tq) fp32: forward logsumexp (natural log), rowsum(dO * O)
    DK, DV,  # outputs (B, Tk, Hk, D), contiguous
    Alibi,  # ALiBi slopes fp32 (H,) or (B, H) (any pointer without ALiBi)
    Cu_q, Cu_k,  # varlen: int32 (B + 1,) prefix sums (see the forward)
    stride_qb, stride_qt, stride_qh,  # q strides
    stride_kb, stride_kt, stride_kh,  # k strides
    stride_vb, stride_vt, stride_vh,  # v strides
    stride_dob, stride_dot, stride_doh,  # dout strides
    stride_gb, stride_gt, stride_gh,  # dk/dv strides (contiguous (B, Tk, Hk, D))
    stride_ab,  # slopes' batch stride (0 for (H,))
    Tq, Tk, H, GROUP,  # lengths (varlen: the totals), query heads, query heads per kv head
    left, right,  # window sides, unbounded = Tq + Tk
    softmax_scale,  # scale applied to QK^T
    qk_scale,  # softmax_scale * log2(e)
    softcap_scale, softcap2,  # softmax_scale / softcap, softcap * log2(e)
    Rng, threshold, drop_scale,  # dropout (see the forward)
    T_BUCKET, TK_BUCKET,  # autotune keys only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,  # window sides bounded (causal: right = 0)
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    IS_VARLEN: tl.constexpr,  # packed sequences (see the forward)
    BLOCK_M: tl.constexpr,  # query rows per inner iteration
    BLOCK_N: tl.constexpr,  # key rows per program
):
    start_n = tl.program_id(0)
    seed, rng_base = _dropout_key(Rng, HAS_DROPOUT)
    off_bhk = tl.program_id(1)  # b * Hk + kv head
    Hk = H // GROUP
    off_b = (off_bhk // Hk).to(tl.int64)
    off_hk = (off_bhk % Hk).to(tl.int64)
    n0 = start_n * BLOCK_N
    if IS_VARLEN:  # as the forward; Lse and Delta are (H, total_q)
        total_q = Tq
        q0, k0, Tq, Tk = _sequence(Cu_q, Cu_k, off_b)
        if n0 >= Tk:
            return
        Q += q0 * stride_qt
        DO += q0 * stride_dot
        Lse += q0
        Delta += q0
        K += k0 * stride_kt
        V += k0 * stride_vt
        DK += k0 * stride_gt
        DV += k0 * stride_gt
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    kv_mask = (offs_n[:, None] < Tk) & d_ok
    k = tl.load(K + off_b * stride_kb + off_hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query rows that see some key of this block: i + shift - left <= n0 + BLOCK_N - 1 and
    # i + shift + right >= n0 (plain causal: from the query block holding n0).
    shift = Tk - Tq
    lo = tl.maximum(n0 - shift - right, 0) // BLOCK_M * BLOCK_M
    hi = tl.minimum(Tq, n0 + BLOCK_N - shift + left)
    offs_m0 = tl.arange(0, BLOCK_M)
    # GQA: this program owns its kv head's dK/dV and sums the group's query heads in a fixed
    # order -- deterministic, no atomics.
    for g in range(0, GROUP):
        off_h = off_hk * GROUP + g
        bh = off_b * H + off_h
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        if IS_VARLEN:
            row_base = off_h * total_q
        else:
            row_base = bh * Tq
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(Alibi + off_b * stride_ab + off_h) * 1.4426950408889634
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            q_mask = (offs_m[:, None] < Tq) & d_ok
            q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=q_mask, other=0.0)
            lse = tl.load(Lse + row_base + offs_m, mask=offs_m < Tq, other=0.0)
            delta = tl.load(Delta + row_base + offs_m, mask=offs_m < Tq, other=0.0)
            # lse = -inf marks a row with no visible key: make its P exactly 0 instead of exp2(+inf).
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
            # Mask before exp2: masked scores can exceed lse, and exp2 of them would overflow.
            sT, tT = _scores(qkT, offs_m[None, :], offs_n[:, None], Tq, Tk, shift, left, right, qk_scale,
                             softcap_scale, softcap2, slope2, True, False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
                             HAS_ALIBI)
            pT = tl.exp2(sT - lse2[None, :])
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            if HAS_DROPOUT:
                keepT = _dropout_keep_t(seed, rng_base, bh, offs_m[None, :], offs_n[:, None], threshold)
                dv += tl.dot(tl.where(keepT, pT * drop_scale, 0.0).to(do.dtype), do, input_precision=DOT_PREC)
                dpT = tl.where(keepT, dpT * drop_scale, 0.0)
            else:
                dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
            dsT = pT * (dpT - delta[None, :])
            if HAS_SOFTCAP:
                dsT = dsT * (1.0 - tT * tT)
            dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
    dk = dk * softmax_scale
    g_off = off_b * stride_gb + off_hk * stride_gh + offs_n[:, None] * stride_gt + offs_d[None, :]
    tl.store(DK + g_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(
    configs=_all_configs(_BWD_CONFIGS),
    key=_BWD_KEY,
    prune_configs_by={"early_config_prune": _make_prune(bwd_configs)},
)
@triton.jit(do_not_specialize=["T_BUCKET", "TK_BUCKET", "threshold"])
def _attention_bwd_dq_kernel(
    Q, K, V, DO,  # q, dout (B, Tq, H, D); k, v (B, Tk, Hk, D); stride(-1) == 1
    Lse, Delta,  # (B, H, Tq) fp32
    DQ,  # output (B, Tq, H, D), contiguous
    Alibi,  # ALiBi slopes fp32 (H,) or (B, H) (any pointer without ALiBi)
    Cu_q, Cu_k,  # varlen: int32 (B + 1,) prefix sums (see the forward)
    stride_qb, stride_qt, stride_qh,  # q strides
    stride_kb, stride_kt, stride_kh,  # k strides
    stride_vb, stride_vt, stride_vh,  # v strides
    stride_dob, stride_dot, stride_doh,  # dout strides
    stride_gb, stride_gt, stride_gh,  # dq strides
    stride_ab,  # slopes' batch stride
    Tq, Tk, H, GROUP,  # lengths (varlen: the totals), query heads, query heads per kv head
    left, right,  # window sides, unbounded = Tq + Tk
    softmax_scale,  # scale applied to QK^T
    qk_scale,  # softmax_scale * log2(e)
    softcap_scale, softcap2,  # softmax_scale / softcap, softcap * log2(e)
    Rng, threshold, drop_scale,  # dropout (see the forward)
    T_BUCKET, TK_BUCKET,  # autotune keys only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,  # window sides bounded (causal: right = 0)
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    IS_VARLEN: tl.constexpr,  # packed sequences (see the forward)
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner iteration
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    seed, rng_base = _dropout_key(Rng, HAS_DROPOUT)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    off_hk = off_h // GROUP
    m0 = start_m * BLOCK_M
    if IS_VARLEN:  # as the forward; Lse and Delta are (H, total_q)
        total_q = Tq
        q0, k0, Tq, Tk = _sequence(Cu_q, Cu_k, off_b)
        if m0 >= Tq:
            return
        Q += q0 * stride_qt
        DO += q0 * stride_dot
        DQ += q0 * stride_gt
        Lse += q0
        Delta += q0
        K += k0 * stride_kt
        V += k0 * stride_vt
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    q_mask = (offs_m[:, None] < Tq) & d_ok
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=q_mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=q_mask, other=0.0)
    if IS_VARLEN:
        row_base = off_h * total_q
    else:
        row_base = off_bh.to(tl.int64) * Tq
    lse = tl.load(Lse + row_base + offs_m, mask=offs_m < Tq, other=0.0)
    delta = tl.load(Delta + row_base + offs_m, mask=offs_m < Tq, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + off_b * stride_ab + off_h) * 1.4426950408889634

    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    shift = Tk - Tq
    lo = tl.maximum(m0 + shift - left, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(Tk, m0 + BLOCK_M + shift + right)
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kv_mask = (offs_n[:, None] < Tk) & d_ok
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        s, t = _scores(qk, offs_m[:, None], offs_n[None, :], Tq, Tk, shift, left, right, qk_scale,
                       softcap_scale, softcap2, slope2, True, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI)
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_base, off_bh, m0, start_n, threshold, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    dq = dq * softmax_scale
    g_off = off_b * stride_gb + off_h * stride_gh + offs_m[:, None] * stride_gt + offs_d[None, :]
    tl.store(DQ + g_off, dq.to(DQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------------
# Launchers (contract: gptfast/ops/_backend.py)
# ----------------------------------------------------------------------------------------------
def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _options(q, k, causal, softmax_scale, window, softcap, alibi_slopes, dropout_p, rng_state, Tq, Tk):
    """Kernel arguments for the options: (Alibi, stride_ab, left, right, softcap_scale, softcap2,
    Rng, threshold, drop_scale) and the constexprs HAS_LEFT/HAS_RIGHT/HAS_SOFTCAP/
    HAS_ALIBI/HAS_DROPOUT. Tq, Tk: the (longest) lengths, whose sum stands for an unbounded side."""
    left, right = (int(w) for w in window)
    if causal:
        right = 0
    has_left, has_right = left >= 0, right >= 0
    unbounded = Tq + Tk  # every key of every row: the block ranges need no -1 branches
    left = unbounded if left < 0 else left
    right = unbounded if right < 0 else right
    has_softcap = softcap > 0
    has_alibi = alibi_slopes is not None
    has_dropout = dropout_p > 0 and rng_state is not None
    if has_alibi:
        alibi = alibi_slopes.to(device=q.device, dtype=torch.float32).contiguous()
        stride_ab = alibi.stride(0) if alibi.dim() == 2 else 0
    else:
        alibi, stride_ab = q, 0  # never read
    rng, threshold = q, 0  # q: never read without dropout
    drop_scale = 1.0
    if has_dropout:
        from gptfast.ops import _philox
        if rng_state.dtype != torch.int64 or rng_state.numel() != 2:
            raise ValueError(f"gptfast.attention: rng_state must be int64 [seed, offset], got {rng_state.dtype} "
                             f"with {rng_state.numel()} values")
        rng = rng_state.to(q.device).contiguous()  # the kernels load the key on the device
        threshold = _philox.dropout_threshold(dropout_p)
        drop_scale = _philox.keep_scale(dropout_p)
    args = (alibi, stride_ab, left, right,
            softmax_scale / softcap if has_softcap else 0.0, softcap * LOG2E if has_softcap else 0.0,
            rng, threshold, drop_scale)
    return args, dict(HAS_LEFT=has_left, HAS_RIGHT=has_right, HAS_SOFTCAP=has_softcap, HAS_ALIBI=has_alibi,
                      HAS_DROPOUT=has_dropout)


class _Layout:
    """How the launchers address q/k/v-shaped tensors: dense (B, T, heads, D), or packed (total,
    heads, D) seen as batch entries of stride 0 whose rows start at cu_seqlens (``varlen``).
    Tq/Tk are what the kernels' length arguments get (varlen: the totals), max_q/max_k the
    longest sequence (grid sizes, autotune buckets, unbounded window sides)."""

    def __init__(self, q, k, varlen):
        if varlen is None:
            self.B, self.Tq, self.H, self.D = q.shape
            self.Tk, self.Hk = k.shape[1], k.shape[2]
            self.max_q, self.max_k = self.Tq, self.Tk
            self.cu_q = self.cu_k = q  # never read
        else:
            self.cu_q, self.cu_k, self.max_q, self.max_k = varlen
            self.B = self.cu_q.numel() - 1
            (self.Tq, self.H, self.D), (self.Tk, self.Hk) = q.shape, k.shape[:2]
            self.max_q, self.max_k = int(self.max_q), int(self.max_k)
        self.varlen = varlen is not None

    def strides(self, t):
        """(batch, seq, head) strides."""
        return (0, t.stride(0), t.stride(1)) if self.varlen else (t.stride(0), t.stride(1), t.stride(2))

    def lse_shape(self):
        return (self.H, self.Tq) if self.varlen else (self.B, self.H, self.Tq)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                      softmax_scale: float, *, window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                      alibi_slopes: torch.Tensor | None = None, dropout_p: float = 0.0,
                      rng_state: torch.Tensor | None = None, varlen: tuple | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    L = _Layout(q, k, varlen)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(L.lse_shape(), dtype=torch.float32, device=q.device)
    if L.B == 0 or L.max_q == 0:
        return out, lse  # no query rows
    block_d = _block_d(L.D)
    (alibi, stride_ab, left, right, sc_scale, sc2, rng, threshold, drop_scale), flags = _options(
        q, k, causal, softmax_scale, window, softcap, alibi_slopes, dropout_p, rng_state, L.max_q, L.max_k)

    def grid(meta):
        return (triton.cdiv(L.max_q, meta["BLOCK_M"]), L.B * L.H)

    _attention_fwd_kernel[grid](
        q, k, v, out, lse, alibi, L.cu_q, L.cu_k,
        *L.strides(q), *L.strides(k), *L.strides(v), *L.strides(out), stride_ab,
        L.Tq, L.Tk, L.H, L.H // L.Hk, left, right, softmax_scale * LOG2E, sc_scale, sc2,
        rng, threshold, drop_scale,
        triton.next_power_of_2(L.max_q), triton.next_power_of_2(L.max_k),
        HEAD_DIM=L.D, BLOCK_D=block_d, EVEN_D=L.D == block_d, DOT_PREC=_dot_prec(q.dtype), IS_VARLEN=L.varlen,
        **flags,
    )
    return out, lse


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, causal: bool, softmax_scale: float,
                       deterministic: bool = False, *, window: tuple[int, int] = (-1, -1),
                       softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                       dropout_p: float = 0.0, rng_state: torch.Tensor | None = None,
                       varlen: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # ``deterministic`` is accepted for the contract; this backward never uses atomics (GQA's
    # dK/dV sum runs inside one program), so every call is bitwise reproducible whatever its value.
    del deterministic
    L = _Layout(q, k, varlen)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=q.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=q.device)
    if L.B == 0 or L.max_q == 0 or L.max_k == 0:
        # no query rows, or no keys (every row's out is 0): the gradients are zeros
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_d = _block_d(L.D)
    out = out.contiguous() if out.stride(-1) != 1 else out
    lse = lse.contiguous()
    delta = torch.empty(L.lse_shape(), dtype=torch.float32, device=q.device)
    pre_block = 32 if _INTERPRET else max(16, min(128, 2048 // block_d))
    # Delta has lse's layout; packed, (H, total_q) is the dense layout of one batch entry of total_q rows.
    pre_b = 1 if L.varlen else L.B
    _attention_bwd_preprocess_kernel[(triton.cdiv(L.Tq, pre_block), pre_b * L.H)](
        out, dout, delta, *L.strides(out), *L.strides(dout),
        L.Tq, L.H, HEAD_DIM=L.D, BLOCK_D=block_d, BLOCK_M=pre_block,
    )
    (alibi, stride_ab, left, right, sc_scale, sc2, rng, threshold, drop_scale), flags = _options(
        q, k, causal, softmax_scale, window, softcap, alibi_slopes, dropout_p, rng_state, L.max_q, L.max_k)
    strides = (*L.strides(q), *L.strides(k), *L.strides(v), *L.strides(dout))
    tail = (stride_ab, L.Tq, L.Tk, L.H, L.H // L.Hk, left, right, softmax_scale, softmax_scale * LOG2E, sc_scale,
            sc2, rng, threshold, drop_scale, triton.next_power_of_2(L.max_q), triton.next_power_of_2(L.max_k))
    meta = dict(HEAD_DIM=L.D, BLOCK_D=block_d, DOT_PREC=_dot_prec(q.dtype), IS_VARLEN=L.varlen, **flags)
    _attention_bwd_dkdv_kernel[lambda m: (triton.cdiv(L.max_k, m["BLOCK_N"]), L.B * L.Hk)](
        q, k, v, dout, lse, delta, dk, dv, alibi, L.cu_q, L.cu_k, *strides, *L.strides(dk), *tail, **meta)
    _attention_bwd_dq_kernel[lambda m: (triton.cdiv(L.max_q, m["BLOCK_M"]), L.B * L.H)](
        q, k, v, dout, lse, delta, dq, alibi, L.cu_q, L.cu_k, *strides, *L.strides(dq), *tail, **meta)
    return dq, dk, dv
