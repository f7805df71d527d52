"""KV-cache decoding: FlashAttention 2.8's ``flash_attn_with_kvcache``.

    q (B, Tq, H, D); k_cache, v_cache (B_cache, T_cache, Hk, D) -- or, with ``block_table``
    (B, max_blocks) int32, a paged cache (num_blocks, page_block_size, Hk, D) whose block
    block_table[b, i] holds positions i * page_block_size .. of sequence b;
    k, v (B, T_new, Hk, D) optional new keys/values; cache_seqlens int or int32 (B,).

What a call does, in order (FlashAttention's semantics):

1. with ``rotary_cos``/``rotary_sin`` (T_ro, R / 2), rotary embeddings on the first R dims of q and
   of the new k: k's rows at positions cache_seqlens[b] + 0, 1, ...; q's at the same positions when
   ``causal`` or a window is on, else all at cache_seqlens[b]; ``rotary_interleaved`` pairs dims
   (0, 1), (2, 3), ... (GPT-J), else (0, R/2), (1, R/2 + 1), ... (GPT-NeoX);
2. the new k, v are written into the cache **in place** at positions cache_seqlens[b] .. (+ T_new)
   of cache row cache_batch_idx[b] (default b);
3. each q row attends to the cache's positions cache_leftpad[b] .. cache_seqlens[b] + T_new - 1
   (Tk_b keys) with the dense semantics of gptfast.attention (bottom-right causal mask over
   (Tq, Tk_b), windows, softcap, ALiBi; no dropout: decoding is inference).

Returns out (B, Tq, H, D), and with ``return_softmax_lse`` also lse (B, H, Tq) fp32. Forward only.

How it runs: steps 1-2 are PyTorch index ops on the caches (FlashAttention fuses them into its
kernel; here they are separate, O(B * T_new) work). Step 3 is the custom op ``gptfast::kvcache_fwd``
(backend op ``kvcache``, forward only), which reads the cache in place -- contiguous rows through
cache_batch_idx or pages through block_table, each sequence its own key range -- and never
gathers it. Its kernels are split-K decode kernels: the keys of one (sequence, head) are cut into
``num_splits`` chunks (0: the kernel's heuristic, from the core / SM count), each reduced to a
partial softmax (max m, sum l, unnormalised output acc) in parallel, then merged exactly:
M = max_s m_s, L = sum_s l_s e^(m_s - M), out = sum_s acc_s e^(m_s - M) / L, lse = M + log L. So
small batches still fill the machine. Backends: reference (the gather below + the dense reference
per sequence), cpu (csrc/cpu/kvcache.cpp), triton (kernels/kvcache.py); cuda has none: ``auto``
routes around it, and an explicit ``cuda`` runs its dense attention kernels on views of the cache
when every sequence sees one key range of a contiguous cache (GPT.generate's calls), else raises
NotImplementedError.
"""
from __future__ import annotations

import torch

import math

from . import _backend
from ._common import autocast_off, run_plain
from .attention import (MAX_HEADDIM, Options, _check_options, _forward_reference, _lse_dtype, _window_tuple,
                        attention)

__all__ = ["flash_attn_with_kvcache", "apply_rotary", "kvcache_fwd_op", "kvcache_forward_reference"]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 interleaved: bool) -> torch.Tensor:
    """Rotary embedding of the first 2 * cos.shape[1] dims of x (B, T, H, D) at ``positions``
    (B, T) (rows of cos/sin (T_ro, R / 2)); the other dims pass through. Computed in fp32 (fp64
    for fp64 inputs)."""
    half = cos.shape[1]
    r = 2 * half
    acc = torch.promote_types(x.dtype, torch.float32)
    c = cos[positions].to(acc).unsqueeze(2)  # (B, T, 1, R/2)
    s = sin[positions].to(acc).unsqueeze(2)
    xr = x[..., :r].to(acc)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        rot = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
    return torch.cat([rot.to(x.dtype), x[..., r:]], dim=-1)


def _check(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
           rotary_cos, rotary_sin, causal, softmax_scale, window_size, softcap, alibi_slopes):
    fn = "gptfast.flash_attn_with_kvcache"
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be a 4-D tensor, got {tuple(getattr(t, 'shape', ()))}")
    b, tq, h, d = q.shape
    if not 1 <= d <= MAX_HEADDIM:
        raise ValueError(f"{fn}: head dim (q.shape[3]) must be in 1..{MAX_HEADDIM}, got {d}")
    _check_options("flash_attn_with_kvcache", causal, softmax_scale, window_size, softcap, 0.0, alibi_slopes,
                   [(h,), (b, h)], q.device)
    if k_cache.shape != v_cache.shape or k_cache.shape[3] != d or h % k_cache.shape[2]:
        raise ValueError(f"{fn}: k_cache and v_cache must have one shape (..., nheads_k, {d}) with nheads ({h}) a "
                         f"multiple of nheads_k, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{fn}: {name} must have q's dtype and device ({q.dtype}, {q.device}), got "
                             f"{t.dtype} on {t.device}")
    if (k is None) != (v is None):
        raise ValueError(f"{fn}: pass both k and v, or neither")
    if k is not None:
        hk = k_cache.shape[2]
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 4 or t.shape[0] != b or t.shape[2:] != (hk, d) or t.dtype != q.dtype:
                raise ValueError(f"{fn}: {name} must be ({b}, seqlen_new, {hk}, {d}) in {q.dtype}, got "
                                 f"{t.dtype} {tuple(t.shape)}")
        if k.shape != v.shape:
            raise ValueError(f"{fn}: k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    for name, t in (("cache_seqlens", cache_seqlens), ("cache_batch_idx", cache_batch_idx),
                    ("cache_leftpad", cache_leftpad)):
        if isinstance(t, torch.Tensor) and (t.dim() != 1 or t.shape[0] != b or t.dtype.is_floating_point):
            raise ValueError(f"{fn}: {name} must be an integer tensor of shape ({b},), got {t.dtype} {tuple(t.shape)}")
    if block_table is not None:
        if block_table.dim() != 2 or block_table.shape[0] != b or block_table.dtype != torch.int32:
            raise ValueError(f"{fn}: block_table must be int32 (batch, max_blocks) = ({b}, ...), got "
                             f"{block_table.dtype} {tuple(block_table.shape)}")
        if cache_batch_idx is not None:
            raise ValueError(f"{fn}: cache_batch_idx cannot be combined with a paged cache (block_table)")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError(f"{fn}: pass both rotary_cos and rotary_sin, or neither")
    if rotary_cos is not None:
        if rotary_cos.dim() != 2 or rotary_cos.shape != rotary_sin.shape or 2 * rotary_cos.shape[1] > d:
            raise ValueError(f"{fn}: rotary_cos/rotary_sin must be (seqlen_ro, rotary_dim / 2) with rotary_dim <= "
                             f"headdim {d}, got {tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}")


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Drop-in for ``flash_attn.flash_attn_with_kvcache`` (FlashAttention 2.8): same arguments,
    order, defaults and returns; see the module docstring for the semantics and how it runs.
    k_cache/v_cache are updated in place when k/v are given. Forward only (no autograd)."""
    window_size = _window_tuple(window_size)
    _check(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
           rotary_cos, rotary_sin, causal, softmax_scale, window_size, softcap, alibi_slopes)
    b, tq, h, d = q.shape
    dev = q.device
    paged = block_table is not None
    page = k_cache.shape[1]
    cache_len = block_table.shape[1] * page if paged else k_cache.shape[1]
    seqlens = _per_batch(cache_seqlens, b, dev, default=cache_len if k is None else 0)
    t_new = 0 if k is None else k.shape[1]
    rows = _per_batch(cache_batch_idx, b, dev, default=None)
    rows = torch.arange(b, device=dev) if rows is None else rows
    leftpad = _per_batch(cache_leftpad, b, dev, default=0)
    # Bounds: a kernel reads positions leftpad .. seqlens + t_new - 1 of the cache. (A host sync;
    # skipped while torch.compile traces, where the values are not known.)
    if b and not torch.compiler.is_compiling():
        if int((seqlens + t_new).max()) > cache_len:
            raise ValueError(f"gptfast.flash_attn_with_kvcache: cache_seqlens + seqlen_new exceeds the cache's "
                             f"{cache_len} positions")
        if int(leftpad.min()) < 0:
            raise ValueError("gptfast.flash_attn_with_kvcache: cache_leftpad must be >= 0")
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    with torch.no_grad():
        if rotary_cos is not None:
            steps = torch.arange(max(tq, t_new), device=dev)[None, :]
            if k is not None:
                k = apply_rotary(k, rotary_cos, rotary_sin, seqlens[:, None] + steps[:, :t_new], rotary_interleaved)
            moving = causal or window_size != (-1, -1)
            q_pos = seqlens[:, None] + (steps[:, :tq] if moving else torch.zeros_like(steps[:, :tq]))
            q = apply_rotary(q, rotary_cos, rotary_sin, q_pos, rotary_interleaved)
        if k is not None and t_new:
            pos = seqlens[:, None] + torch.arange(t_new, device=dev)[None, :]  # (B, T_new)
            if paged:
                blocks = block_table.long().gather(1, pos // page)
                k_cache[blocks, pos % page] = k
                v_cache[blocks, pos % page] = v
            else:
                k_cache[rows[:, None], pos] = k
                v_cache[rows[:, None], pos] = v
        # step 3: every sequence's own key range [leftpad, seqlens + t_new), read in place
        dense = _dense_views(k_cache, v_cache, block_table, cache_batch_idx, rows, leftpad, seqlens + t_new)
        if dense is not None:
            out, lse = attention(q, *dense, causal=causal, softmax_scale=scale, window_size=window_size,
                                 softcap=softcap, alibi_slopes=alibi_slopes, return_lse=True)
            return (out, lse) if return_softmax_lse else out
        i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
        out, lse = run_plain(kvcache_fwd_op, _kvcache_fwd,
            q.contiguous(), _last_dim_contiguous(k_cache), _last_dim_contiguous(v_cache),
            None if block_table is None else block_table.contiguous(),
            None if cache_batch_idx is None else i32(rows), i32(leftpad), i32(seqlens + t_new),
            bool(causal), scale, window_size[0], window_size[1], float(softcap) if softcap > 0 else 0.0,
            None if alibi_slopes is None else alibi_slopes.contiguous(), int(num_splits), "")
    return (out, lse) if return_softmax_lse else out


def _dense_views(k_cache, v_cache, block_table, cache_batch_idx, rows, key_start, key_end):
    """For an explicitly chosen backend without a ``kvcache`` kernel (cuda): when every sequence
    sees one key range of a contiguous cache, that range as (B, Tk, Hk, D) views, so that the
    backend's dense attention kernels run step 3 (the same function: one key range, the dense
    semantics). None otherwise -- the kvcache op then raises NotImplementedError naming it."""
    name = _backend.requested_backend(None)
    if name == "auto" or ("kvcache", name) in _backend._REGISTRY or block_table is not None:
        return None
    if torch.compiler.is_compiling() or key_start.numel() == 0:
        return None
    lo, hi = int(key_start.min()), int(key_end.max())
    if lo != int(key_start.max()) or hi != int(key_end.min()) or hi < lo:
        return None
    kc = k_cache if cache_batch_idx is None else k_cache[rows]
    vc = v_cache if cache_batch_idx is None else v_cache[rows]
    return kc[:, lo:hi], vc[:, lo:hi]


def _per_batch(x, b, dev, default):
    if x is None:
        return None if default is None else torch.full((b,), default, dtype=torch.int64, device=dev)
    if isinstance(x, int):
        return torch.full((b,), x, dtype=torch.int64, device=dev)
    return x.to(device=dev, dtype=torch.int64)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernels read rows of headdim values; any other strides are fine (no copy of the cache).
    return t if t.stride(-1) == 1 else t.contiguous()


# --------------------------------------------------------------------------- the reference backend

def _gather(k_cache: torch.Tensor, block_table, row: int, lo: int, hi: int) -> torch.Tensor:
    """Cache positions lo .. hi - 1 of one sequence as (1, hi - lo, Hk, D): cache row ``row`` of
    a contiguous cache, or the pages of block_table row ``row`` of a paged one."""
    pos = torch.arange(lo, max(hi, lo), device=k_cache.device)
    if block_table is None:
        return k_cache[row, pos][None]
    page = k_cache.shape[1]
    return k_cache[block_table[row].long()[pos // page], pos % page][None]


def kvcache_forward_reference(q, k_cache, v_cache, block_table, cache_batch_idx, key_start, key_end,
                              softmax_scale: float, window_left: int, window_right: int, softcap: float,
                              alibi_slopes, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference launcher (the contract in _backend.py): gathers each sequence's visible keys and
    runs the dense reference on them. out (B, Tq, H, D) in q.dtype, lse (B, H, Tq) fp32 (fp64 for
    fp64 inputs); a sequence without keys gives out 0, lse -inf. ``num_splits`` is ignored."""
    del num_splits
    b, tq, h, d = q.shape
    out = torch.zeros_like(q)
    lse = torch.full((b, h, tq), float("-inf"), dtype=_lse_dtype(q.dtype), device=q.device)
    opts = Options(window_left < 0 and window_right == 0, (window_left, window_right), softcap)
    lo, hi = key_start.tolist(), key_end.tolist()
    rows = list(range(b)) if cache_batch_idx is None else cache_batch_idx.tolist()
    for s in range(b):
        if hi[s] <= lo[s]:
            continue
        row = s if block_table is not None else rows[s]
        ks, vs = (_gather(c, block_table, row, lo[s], hi[s]) for c in (k_cache, v_cache))
        slopes = None if alibi_slopes is None else alibi_slopes[s:s + 1] if alibi_slopes.dim() == 2 else alibi_slopes
        o, l = _forward_reference(q[s:s + 1], ks, vs, opts, softmax_scale, slopes, None)
        out[s], lse[s] = o[0], l[0]
    return out, lse


# --------------------------------------------------------------------------- the custom op

def _normalised_window(tq: int, key_start, key_end, causal: bool, left: int, right: int,
                       cache_len: int) -> tuple[int, int]:
    """FlashAttention's window normalisation against the longest key range Tk_max (a side >=
    Tk_max is unbounded; causal sets right = 0), computed without reading the lengths where the
    answer does not depend on them: a left side >= cache_len >= Tk_max, or a right side >= Tq - 1
    (every row then sees its last key), is unbounded either way."""
    left = -1 if left >= cache_len else left
    if causal:
        return left, 0
    if right >= tq - 1:
        return left, -1
    if right >= 0:
        tk_max = int((key_end - key_start).clamp_min(0).max()) if key_start.numel() else 0
        right = -1 if right >= tk_max else right
    return left, right


# A custom op so that torch.compile(fullgraph=True) traces a decoding step through it; the backend
# is resolved when it runs. The cache is an input, never an output: nothing aliases.
def _kvcache_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor | None,
                 cache_batch_idx: torch.Tensor | None, key_start: torch.Tensor, key_end: torch.Tensor,
                 causal: bool, softmax_scale: float, window_left: int, window_right: int, softcap: float,
                 alibi_slopes: torch.Tensor | None, num_splits: int,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Tq, H, D) contiguous, lse (B, H, Tq) fp32: step 3 of flash_attn_with_kvcache (the
    ``kvcache`` launcher contract in _backend.py; the window raw, normalised here)."""
    if q.numel() == 0:
        out, lse = _kvcache_fwd_fake(q, k_cache, v_cache, block_table, cache_batch_idx, key_start, key_end,
                                     causal, softmax_scale, window_left, window_right, softcap, alibi_slopes,
                                     num_splits, backend)
        return out.zero_(), lse.fill_(float("-inf"))
    cache_len = block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
    left, right = _normalised_window(q.shape[1], key_start, key_end, causal, window_left, window_right, cache_len)
    launchers = _backend.resolve("kvcache", q.device, q.dtype, backend or None)
    with autocast_off(q.device.type):
        return launchers.fwd(q, k_cache, v_cache, block_table, cache_batch_idx, key_start, key_end,
                             softmax_scale, left, right, softcap, alibi_slopes, num_splits)


kvcache_fwd_op = torch.library.custom_op("gptfast::kvcache_fwd", _kvcache_fwd, mutates_args=())


@kvcache_fwd_op.register_fake
def _kvcache_fwd_fake(q, k_cache, v_cache, block_table, cache_batch_idx, key_start, key_end, causal, softmax_scale,
                      window_left, window_right, softcap, alibi_slopes, num_splits, backend):
    b, t, h, _ = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((b, h, t), dtype=_lse_dtype(q.dtype)))
