"""Triton split-K decoding over a KV cache read in place (step 3 of gptfast.flash_attn_with_kvcache;
the ``kvcache`` launcher contract in gptfast/ops/_backend.py, semantics in gptfast/ops/kvcache.py).

Algorithm (Flash-Decoding: FlashAttention's num_splits): a decoding step has one query row per
(sequence, head), so B * H programs can leave most SMs idle while each walks all Tk keys. The keys
a (sequence, head, query block) sees are cut into S chunks; ``_kvcache_split_kernel`` runs one
program per (query block, batch * head, split), streams its chunk in BLOCK_N-key tiles through an
online softmax (fp32, base 2: scores x log2(e), so the loop uses exp2) and stores the partial
state of each row -- max m_s, sum l_s, unnormalised acc_s -- in fp32 scratch.
``_kvcache_combine_kernel`` merges a row's S partials exactly: M = max m_s, w_s = 2^(m_s - M),
out = sum w_s acc_s / sum w_s l_s, lse = (M + log2 sum w_s l_s) / log2(e). With S = 1 the split
kernel writes out and lse itself and no scratch is allocated.

The cache is read where it lies: row cache_batch_idx[b] of a contiguous cache, or, paged, block
block_table[b, p // page] row p % page for position p (gathered per key inside the tile's load,
so chunks may cross pages). Options as the dense kernels (kernels/attention.py): GQA (query head
h reads kv head h // (H / Hk)), bottom-right aligned windows over (Tq, Tk_b), softcap, ALiBi.
A row without keys gives out 0, lse -inf.

num_splits = 0: on a GPU, enough programs for two waves of SMs, no chunk under 256 keys of the
cache's length (a static bound: no device-to-host read of the lengths); in the interpreter, 2.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .attention import _tanh

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634
MAX_SPLITS = 128
MIN_CHUNK = 256  # keys per split the GPU heuristic keeps at least


@triton.jit
def _kvcache_split_kernel(
    Q, K, V,  # q (B, Tq, H, D) contiguous; caches (rows or blocks, T or page, Hk, D), stride(-1) == 1
    BlockTable, Rows,  # int32 (B, max_blocks) when PAGED; int32 (B,) cache rows when HAS_ROWS
    KStart, KEnd,  # int32 (B,): sequence b's keys are cache positions KStart[b] .. KEnd[b] - 1
    Alibi,  # float32 (H,) or (B, H) slopes when HAS_ALIBI
    Out, Lse,  # out (B, Tq, H, D), lse (B, H, Tq) fp32: written when SINGLE
    Mp, Lp, Accp,  # scratch (B*H, S, Tq) m and l (base 2), (B*H, S, Tq, BLOCK_D) acc: when not SINGLE
    Tq, H, D, G,  # query rows, heads, head dim, query heads per kv head
    s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,  # cache strides (row or block, position, kv head)
    s_bt, page,  # block_table row stride, positions per block (PAGED)
    slope_sb,  # alibi batch stride (0 for per-head slopes)
    left, right,  # window sides, -1 unbounded (right = 0 when causal)
    qk_scale, softcap_scale, softcap2,  # scale * log2(e); scale / softcap; softcap * log2(e)
    S,  # splits
    PAGED: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    SINGLE: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // H
    h = bh % H
    kvh = h // G
    start = tl.load(KStart + b)
    tk = tl.maximum(tl.load(KEnd + b) - start, 0)
    shift = tk - Tq
    big = Tq + tk  # an unbounded side, as a number (no branches)
    lft = tl.where(left < 0, big, left)
    rgt = tl.where(right < 0, big, right)
    # the keys this block's rows see (both window bounds grow with the row), and this split's chunk
    q0 = qb * BLOCK_M
    q1 = tl.minimum(q0 + BLOCK_M, Tq) - 1
    vis_lo = tl.minimum(tl.maximum(q0 + shift - lft, 0), tk)
    vis_hi = tl.maximum(tl.minimum(tl.maximum(q1 + shift + rgt + 1, 0), tk), vis_lo)
    chunk = (vis_hi - vis_lo + S - 1) // S
    c0 = tl.minimum(vis_lo + split * chunk, vis_hi)
    c1 = tl.minimum(c0 + chunk, vis_hi)

    ri = q0 + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    rmask = ri < Tq
    dmask = dd < D
    q_ptrs = Q + ((b * Tq + ri[:, None]).to(tl.int64) * H + h) * D + dd[None, :]
    q = tl.load(q_ptrs, mask=rmask[:, None] & dmask[None, :], other=0.0)
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + b * slope_sb + h) * 1.4426950408889634
    if HAS_ROWS:
        row = tl.load(Rows + b).to(tl.int64)
    else:
        row = b.to(tl.int64)

    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for k0 in range(c0, c1, BLOCK_N):
        cj = k0 + tl.arange(0, BLOCK_N)
        kmask = cj < c1
        pos = (start + cj).to(tl.int64)
        if PAGED:
            blk = tl.load(BlockTable + b * s_bt + pos // page, mask=kmask, other=0).to(tl.int64)
            k_off = blk * s_kb + (pos % page) * s_kt
            v_off = blk * s_vb + (pos % page) * s_vt
        else:
            k_off = row * s_kb + pos * s_kt
            v_off = row * s_vb + pos * s_vt
        lmask = kmask[:, None] & dmask[None, :]
        k = tl.load(K + (k_off + kvh * s_kh)[:, None] + dd[None, :], mask=lmask, other=0.0)
        v = tl.load(V + (v_off + kvh * s_vh)[:, None] + dd[None, :], mask=lmask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if HAS_SOFTCAP:
            s = _tanh(qk * softcap_scale) * softcap2
        else:
            s = qk * qk_scale
        if HAS_ALIBI:
            s = s - slope2 * tl.abs(ri[:, None] + shift - cj[None, :]).to(tl.float32)
        vis = kmask[None, :] & (cj[None, :] <= ri[:, None] + (shift + rgt)) & (cj[None, :] >= ri[:, None] + (shift - lft))
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: p = 0, not NaN
        alpha = tl.exp2(m - m_use)
        p = tl.exp2(s - m_use[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m = m_new

    if SINGLE:
        has = l > 0.0
        inv = tl.where(has, 1.0 / tl.where(has, l, 1.0), 0.0)
        o_ptrs = Out + ((b * Tq + ri[:, None]).to(tl.int64) * H + h) * D + dd[None, :]
        tl.store(o_ptrs, (acc * inv[:, None]).to(Out.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
        lse = tl.where(has, (m + tl.log2(tl.where(has, l, 1.0))) / 1.4426950408889634, float("-inf"))
        tl.store(Lse + bh * Tq + ri, lse, mask=rmask)
    else:
        base = (bh * S + split).to(tl.int64) * Tq
        tl.store(Mp + base + ri, m, mask=rmask)
        tl.store(Lp + base + ri, l, mask=rmask)
        tl.store(Accp + (base + ri[:, None]) * BLOCK_D + dd[None, :], acc, mask=rmask[:, None])


@triton.jit
def _kvcache_combine_kernel(
    Mp, Lp, Accp,  # the split kernel's partials: (B*H, S, Tq), (B*H, S, Tq, BLOCK_D) fp32
    Out, Lse,  # out (B, Tq, H, D), lse (B, H, Tq) fp32
    Tq, H, D, S,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    ri = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    rmask = ri < Tq
    M = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(0, S):
        base = (bh * S + s).to(tl.int64) * Tq
        M = tl.maximum(M, tl.load(Mp + base + ri, mask=rmask, other=float("-inf")))
    M_use = tl.where(M == float("-inf"), 0.0, M)
    L = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(0, S):
        base = (bh * S + s).to(tl.int64) * Tq
        w = tl.exp2(tl.load(Mp + base + ri, mask=rmask, other=float("-inf")) - M_use)  # 0 for a chunk without keys
        L += w * tl.load(Lp + base + ri, mask=rmask, other=0.0)
        acc += w[:, None] * tl.load(Accp + (base + ri[:, None]) * BLOCK_D + dd[None, :], mask=rmask[:, None],
                                    other=0.0)
    has = L > 0.0
    inv = tl.where(has, 1.0 / tl.where(has, L, 1.0), 0.0)
    o_ptrs = Out + ((b * Tq + ri[:, None]).to(tl.int64) * H + h) * D + dd[None, :]
    tl.store(o_ptrs, (acc * inv[:, None]).to(Out.dtype.element_ty), mask=rmask[:, None] & (dd[None, :] < D))
    lse = tl.where(has, (M + tl.log2(tl.where(has, L, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(Lse + bh * Tq + ri, lse, mask=rmask)


def num_splits_heuristic(programs: int, cache_len: int, device: torch.device) -> int:
    """The splits num_splits = 0 gives ``programs`` (query block, batch * head) programs over a
    cache of ``cache_len`` positions: two waves of the GPU's SMs, chunks >= MIN_CHUNK keys."""
    if device.type != "cuda":
        return 2  # the interpreter: exercise the merge, keep the grid small
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(2 * sms, max(programs, 1))
    return max(1, min(want, triton.cdiv(cache_len, MIN_CHUNK), MAX_SPLITS))


def kvcache_forward(q, k_cache, v_cache, block_table, cache_batch_idx, key_start, key_end, softmax_scale: float,
                    window_left: int, window_right: int, softcap: float, alibi_slopes, num_splits: int):
    """out (B, Tq, H, D) in q.dtype, lse (B, H, Tq) fp32 (the kvcache launcher contract)."""
    B, Tq, H, D = q.shape
    Hk = k_cache.shape[2]
    out = torch.empty((B, Tq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return out, lse
    q = q.contiguous()
    paged = block_table is not None
    page = k_cache.shape[1]
    cache_len = block_table.shape[1] * page if paged else k_cache.shape[1]
    block_m = 16  # tl.dot's smallest tile; decoding fills one of its rows
    block_n = 32 if _INTERPRET else 64
    block_d = max(16, triton.next_power_of_2(D))
    nqb = triton.cdiv(Tq, block_m)
    S = num_splits_heuristic(B * H * nqb, cache_len, q.device) if num_splits == 0 else min(num_splits, MAX_SPLITS)
    S = max(1, min(S, max(cache_len, 1)))
    single = S == 1
    if single:
        mp = lp = accp = lse  # unused
    else:
        mp = torch.empty((B * H, S, Tq), dtype=torch.float32, device=q.device)
        lp = torch.empty_like(mp)
        accp = torch.empty((B * H, S, Tq, block_d), dtype=torch.float32, device=q.device)
    dummy = key_start
    slope_sb = H if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0
    has_softcap = softcap > 0
    _kvcache_split_kernel[(nqb, B * H, S)](
        q, k_cache, v_cache, block_table if paged else dummy,
        cache_batch_idx if cache_batch_idx is not None else dummy, key_start, key_end,
        alibi_slopes if alibi_slopes is not None else lse, out, lse, mp, lp, accp,
        Tq, H, D, H // Hk,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), block_table.stride(0) if paged else 0, page, slope_sb,
        int(window_left), int(window_right), float(softmax_scale) * LOG2E,
        float(softmax_scale) / softcap if has_softcap else 0.0, softcap * LOG2E if has_softcap else 0.0, S,
        PAGED=paged, HAS_ROWS=cache_batch_idx is not None, HAS_ALIBI=alibi_slopes is not None,
        HAS_SOFTCAP=has_softcap, SINGLE=single, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=4,
    )
    if not single:
        _kvcache_combine_kernel[(nqb, B * H)](mp, lp, accp, out, lse, Tq, H, D, S, BLOCK_M=block_m,
                                              BLOCK_D=block_d, num_warps=4)
    return out, lse
