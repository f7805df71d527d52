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
kernel; here they are separate, O(B * T_new) work). Step 3 is gptfast.attention on views of the
cache -- no copy -- when every sequence sees the same key range of a contiguous cache (the usual
decoding step, and whatever backend the dense call picks); otherwise (ragged lengths, a paged
cache) the visible keys are gathered into a packed batch for gptfast.attention_varlen (a copy of
the visible cache, O(sum Tk_b)). ``num_splits`` is accepted for compatibility: the kernels choose
their own parallelisation over keys.
"""
from __future__ import annotations

import torch

from .attention import _window_tuple, attention
from .varlen import attention_varlen

__all__ = ["flash_attn_with_kvcache", "apply_rotary"]


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
           rotary_cos, rotary_sin):
    fn = "gptfast.flash_attn_with_kvcache"
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be a 4-D tensor, got {tuple(getattr(t, 'shape', ()))}")
    b, tq, h, d = q.shape
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
    del num_splits
    _check(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
           rotary_cos, rotary_sin)
    window_size = _window_tuple(window_size)
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
    if int((seqlens + t_new).max()) > cache_len if b else False:
        raise ValueError(f"gptfast.flash_attn_with_kvcache: cache_seqlens + seqlen_new exceeds the cache's "
                         f"{cache_len} positions")
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
        ends = seqlens + t_new                                  # one past each sequence's last key
        kw = dict(causal=causal, softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
                  alibi_slopes=alibi_slopes)
        lo, hi = leftpad.tolist(), ends.tolist()
        if not paged and len(set(lo)) <= 1 and len(set(hi)) <= 1 and b:
            # one key range for every sequence: views of the cache, no copy
            kc = k_cache if cache_batch_idx is None else k_cache[rows]
            vc = v_cache if cache_batch_idx is None else v_cache[rows]
            out, lse = attention(q, kc[:, lo[0]:hi[0]], vc[:, lo[0]:hi[0]], return_lse=True, **kw)
        else:
            out, lse = _ragged(q, k_cache, v_cache, rows, block_table, page, lo, hi, kw)
    return (out, lse) if return_softmax_lse else out


def _per_batch(x, b, dev, default):
    if x is None:
        return None if default is None else torch.full((b,), default, dtype=torch.int64, device=dev)
    if isinstance(x, int):
        return torch.full((b,), x, dtype=torch.int64, device=dev)
    return x.to(device=dev, dtype=torch.int64)


def _ragged(q, k_cache, v_cache, rows, block_table, page, lo, hi, kw):
    """Sequences with their own key ranges: gather them into one packed batch (attention_varlen)."""
    b, tq, h, d = q.shape
    keys, values = [], []
    for s in range(b):
        pos = torch.arange(lo[s], max(hi[s], lo[s]), device=q.device)
        if block_table is not None:
            blocks = block_table[s].long()[pos // page]
            keys.append(k_cache[blocks, pos % page])
            values.append(v_cache[blocks, pos % page])
        else:
            keys.append(k_cache[rows[s], pos])
            values.append(v_cache[rows[s], pos])
    lengths = [len(x) for x in keys]
    cu_k = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=q.device)
    cu_q = torch.arange(0, (b + 1) * tq, tq, dtype=torch.int32, device=q.device)
    out, lse = attention_varlen(q.reshape(b * tq, h, d), torch.cat(keys), torch.cat(values), cu_q, cu_k, tq,
                                max(lengths), return_lse=True, **kw)
    return out.view(b, tq, h, d), lse.view(h, b, tq).transpose(0, 1).contiguous()
