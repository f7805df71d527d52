"""KV-cache decoding: gptfast.flash_attn_with_kvcache against dense attention over the updated
cache (the in-place update checked element by element; contiguous and paged caches, rotary
interleaved or not, cache_batch_idx, cache_leftpad, GQA, windows, softcap, ALiBi), and
GPT.generate with the cache equal to generate without it."""
from __future__ import annotations

import inspect
import math

import pytest
import torch

import gptfast
from gptfast import GPT, GPTConfig, flash_attn_with_kvcache

F64 = torch.float64


def _rotate(x, positions, theta, rotary_dim, interleaved):
    """Rotary embedding written independently: pairs as complex numbers times e^(i pos theta_j)."""
    out = x.clone()
    half = rotary_dim // 2
    ang = positions[..., None].to(F64) * theta[None, None, :half]          # (B, T, R/2)
    rot = torch.polar(torch.ones_like(ang), ang)[:, :, None, :]             # (B, T, 1, R/2)
    if interleaved:
        pairs = torch.complex(x[..., 0:rotary_dim:2].double(), x[..., 1:rotary_dim:2].double()) * rot
        out[..., 0:rotary_dim:2], out[..., 1:rotary_dim:2] = pairs.real.to(x.dtype), pairs.imag.to(x.dtype)
    else:
        pairs = torch.complex(x[..., :half].double(), x[..., half:rotary_dim].double()) * rot
        out[..., :half], out[..., half:rotary_dim] = pairs.real.to(x.dtype), pairs.imag.to(x.dtype)
    return out


# (B, Tq, T_new, H, Hk, D, causal, window, softcap, alibi, rotary (dim, interleaved) or None,
#  batch_idx, leftpad, paged page size or None)
CASES = [
    (2, 1, 1, 4, 2, 16, True, (-1, -1), 0.0, False, None, False, False, None),        # a decode step
    (3, 4, 4, 4, 4, 32, True, (-1, -1), 0.0, False, (16, True), False, False, None),  # chunk, GPT-J rotary
    (3, 2, 2, 6, 2, 16, True, (5, 0), 5.0, True, (8, False), True, False, None),      # NeoX rotary, batch_idx
    (2, 3, 0, 4, 1, 16, False, (-1, -1), 0.0, False, (16, False), False, True, None),  # no new k, leftpad
    (3, 1, 2, 4, 2, 16, True, (-1, -1), 0.0, False, None, False, False, 4),            # paged, ragged
    (2, 2, 1, 2, 2, 8, False, (2, 1), 0.0, True, (8, True), False, True, 8),           # paged + leftpad
]


def _id(c):
    return (f"B{c[0]}-q{c[1]}-new{c[2]}-h{c[3]}:{c[4]}-{'causal' if c[6] else 'full'}-w{c[7]}-sc{c[8]}"
            f"{'-alibi' if c[9] else ''}{'-rot' + str(c[10]) if c[10] else ''}{'-bidx' if c[11] else ''}"
            f"{'-leftpad' if c[12] else ''}{'-paged' + str(c[13]) if c[13] else ''}")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_kvcache_equals_attention_over_the_updated_cache(case):
    b, tq, t_new, h, hk, d, causal, window, softcap, alibi, rotary, use_idx, use_lp, page = case
    g = torch.Generator().manual_seed(0)
    t_cache, n_rows = 24, b + 2
    q = torch.randn(b, tq, h, d, generator=g, dtype=F64)
    new_k = torch.randn(b, t_new, hk, d, generator=g, dtype=F64) if t_new else None
    new_v = torch.randn(b, t_new, hk, d, generator=g, dtype=F64) if t_new else None
    seqlens = torch.tensor([5, 9, 3][:b], dtype=torch.int32)
    leftpad = torch.tensor([2, 1, 0][:b], dtype=torch.int32) if use_lp else None
    rows = torch.tensor([3, 0, 4][:b], dtype=torch.int32) if use_idx else None
    # the logical cache each sequence has: (n_rows, t_cache, hk, d)
    logical_k = torch.randn(n_rows, t_cache, hk, d, generator=g, dtype=F64)
    logical_v = torch.randn(n_rows, t_cache, hk, d, generator=g, dtype=F64)
    block_table = None
    if page:
        nblk = t_cache // page
        perm = torch.randperm(b * nblk, generator=g)
        block_table = perm.view(b, nblk).to(torch.int32)
        k_cache = torch.zeros(b * nblk, page, hk, d, dtype=F64)
        v_cache = torch.zeros_like(k_cache)
        for s in range(b):
            for i in range(nblk):
                k_cache[block_table[s, i]] = logical_k[s, i * page:(i + 1) * page]
                v_cache[block_table[s, i]] = logical_v[s, i * page:(i + 1) * page]
    else:
        k_cache, v_cache = logical_k.clone(), logical_v.clone()
    kw = {}
    theta = None
    if rotary:
        rdim, inter = rotary
        theta = 1.0 / (10000 ** (torch.arange(0, rdim, 2, dtype=F64) / rdim))
        ang = torch.arange(t_cache, dtype=F64)[:, None] * theta[None]
        kw = dict(rotary_cos=ang.cos(), rotary_sin=ang.sin(), rotary_interleaved=inter)
    slopes = torch.rand(b, h, generator=g) if alibi else None
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, new_k, new_v, cache_seqlens=seqlens,
                                       cache_batch_idx=rows, cache_leftpad=leftpad, block_table=block_table,
                                       causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes,
                                       return_softmax_lse=True, **kw)
    assert out.shape == q.shape and lse.shape == (b, h, tq) and lse.dtype == F64
    for s in range(b):
        row = s if rows is None else int(rows[s])
        L = int(seqlens[s])
        pos_new = torch.arange(L, L + t_new)[None]
        expect_k, expect_v = logical_k[row].clone(), logical_v[row].clone()
        if t_new:
            kn = new_k[s:s + 1]
            if rotary:
                kn = _rotate(kn, pos_new, theta, rotary[0], rotary[1])
            expect_k[L:L + t_new], expect_v[L:L + t_new] = kn[0], new_v[s]
        # the cache in memory, element by element (other rows and positions untouched)
        if page:
            got_k = torch.cat([k_cache[block_table[s, i]] for i in range(t_cache // page)])
            got_v = torch.cat([v_cache[block_table[s, i]] for i in range(t_cache // page)])
        else:
            got_k, got_v = k_cache[row], v_cache[row]
        torch.testing.assert_close(got_k, expect_k, rtol=1e-12, atol=1e-12)  # rotary: two formulas
        assert torch.equal(got_v, expect_v)
        qs = q[s:s + 1]
        if rotary:
            moving = causal or window != (-1, -1)
            qpos = (L + torch.arange(tq) if moving else torch.full((tq,), L))[None]
            qs = _rotate(qs, qpos, theta, rotary[0], rotary[1])
        lo = 0 if leftpad is None else int(leftpad[s])
        hi = L + t_new
        ref, ref_lse = gptfast.attention(qs, expect_k[None, lo:hi], expect_v[None, lo:hi], causal=causal,
                                         window_size=window, softcap=softcap, return_lse=True,
                                         alibi_slopes=None if slopes is None else slopes[s:s + 1],
                                         backend="reference")
        torch.testing.assert_close(out[s], ref[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse[s], ref_lse[0], rtol=1e-10, atol=1e-10)
    if rows is not None:  # rows no sequence uses are untouched
        unused = sorted(set(range(n_rows)) - set(rows.tolist()))
        assert torch.equal(k_cache[unused], logical_k[unused])


def test_signature_matches_flashattention():
    names = [(p.name, p.default) for p in inspect.signature(flash_attn_with_kvcache).parameters.values()]
    assert names == [
        ("q", inspect._empty), ("k_cache", inspect._empty), ("v_cache", inspect._empty), ("k", None), ("v", None),
        ("rotary_cos", None), ("rotary_sin", None), ("cache_seqlens", None), ("cache_batch_idx", None),
        ("cache_leftpad", None), ("block_table", None), ("softmax_scale", None), ("causal", False),
        ("window_size", (-1, -1)), ("softcap", 0.0), ("rotary_interleaved", True), ("alibi_slopes", None),
        ("num_splits", 0), ("return_softmax_lse", False)]


@pytest.mark.parametrize("change, msg", [
    (lambda a: a.update(k=None), "pass both k and v"),
    (lambda a: a.update(v_cache=a["v_cache"][:, :, :1]), "one shape"),
    (lambda a: a.update(cache_seqlens=torch.tensor([20, 3], dtype=torch.int32)), "exceeds the cache"),
    (lambda a: a.update(cache_seqlens=torch.zeros(3, dtype=torch.int32)), "cache_seqlens must be"),
    (lambda a: a.update(rotary_cos=torch.zeros(8, 20)), "rotary_dim <= headdim"),
    (lambda a: a.update(k=a["k"].double(), v=a["v"].double()), "k must be"),
])
def test_bad_input(change, msg):
    args = dict(q=torch.randn(2, 1, 2, 16), k_cache=torch.zeros(2, 20, 2, 16), v_cache=torch.zeros(2, 20, 2, 16),
                k=torch.randn(2, 1, 2, 16).double(), v=torch.randn(2, 1, 2, 16).double(),
                cache_seqlens=torch.tensor([3, 4], dtype=torch.int32))
    args["k"], args["v"] = args["k"].float(), args["v"].float()
    change(args)
    if "rotary_cos" in args:
        args["rotary_sin"] = args["rotary_cos"]
    with pytest.raises(ValueError, match=msg):
        flash_attn_with_kvcache(**args)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_generate_with_the_cache_equals_generate_without(dtype):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=48, vocab_size=64, n_layer=2, n_head=4, n_embd=64, n_kv_head=2)).to(dtype).eval()
    idx = torch.randint(0, 64, (3, 7))
    for new in (30, 60):  # 60 outgrows block_size: the context slides as without the cache
        a = model.generate(idx, new, temperature=0)
        b = model.generate(idx, new, temperature=0, use_cache=False)
        assert torch.equal(a, b), new
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1 = model.generate(idx, 20, temperature=0.9, top_k=10, generator=g1)
    s2 = model.generate(idx, 20, temperature=0.9, top_k=10, generator=g2, use_cache=False)
    assert torch.equal(s1, s2)


def test_forward_cached_equals_forward():
    torch.manual_seed(1)
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    idx = torch.randint(0, 64, (2, 20))
    full, _ = model(idx)
    cache = model.kv_cache(2)
    parts = [model.forward_cached(idx[:, :12], cache, 0), model.forward_cached(idx[:, 12:13], cache, 12),
             model.forward_cached(idx[:, 13:], cache, 13)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert math.isclose(cache[0][0][:, 20:].abs().sum().item(), 0.0)  # nothing written past the tokens
    with pytest.raises(ValueError, match="exceed the cache"):
        model.forward_cached(idx, cache, 20)
