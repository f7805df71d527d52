"""FlashAttention 2.8's dense attention options (issue 12, step 1: the reference semantics, the
public API and per-call backend routing).

The ground truth here is independent of gptfast's own masking code: a plain loop over query rows
and visible keys (``naive``), written from the spec -- bottom-right aligned masks, windows,
softcap, ALiBi, GQA. ``attention_ref`` must equal it, and the reference backend's explicit
backward must equal autograd through ``attention_ref``, forward and every gradient, on a grid
that covers every pair of options at least once. A kernel backend runs the options it declares
(``_backend.KERNEL_ATTENTION_FEATURES``; the cpu backend's are tested against the reference in
test_cpu_attention_options.py): ``auto`` routes other calls on, an explicit kernel backend raises.
"""
from __future__ import annotations

import itertools
import math
import re

import pytest
import torch

import gptfast
from gptfast.ops.attention import normalise
from gptfast.testing import assert_close


def naive(q, k, v, causal, scale, window=(-1, -1), softcap=0.0, slopes=None, keep=None, p_drop=0.0):
    """Loop-by-loop float64 attention from the spec (independent of gptfast.ops.attention)."""
    b, tq, h, d = q.shape
    tk, hk = k.shape[1], k.shape[2]
    left, right = window
    if left >= tk:
        left = -1
    if right >= tk:
        right = -1
    if causal:
        right = 0
    out = torch.zeros(b, tq, h, d, dtype=torch.float64)
    lse = torch.full((b, h, tq), float("-inf"), dtype=torch.float64)
    for bi, hi, i in itertools.product(range(b), range(h), range(tq)):
        kv = hi // (h // hk)
        c = i + tk - tq  # the key column aligned with query i
        js = [j for j in range(tk) if (right < 0 or j <= c + right) and (left < 0 or j >= c - left)]
        if not js:
            continue
        s = []
        for j in js:
            x = scale * float(q[bi, i, hi].double() @ k[bi, j, kv].double())
            if softcap > 0:
                x = softcap * math.tanh(x / softcap)
            if slopes is not None:
                slope = float(slopes[hi] if slopes.dim() == 1 else slopes[bi, hi])
                x -= slope * abs(c - j)
            s.append(x)
        m = max(s)
        z = sum(math.exp(x - m) for x in s)
        lse[bi, hi, i] = m + math.log(z)
        for j, x in zip(js, s):
            pij = math.exp(x - m) / z
            if keep is not None:
                pij = pij * float(keep[bi, hi, i, j]) / (1 - p_drop)
            out[bi, i, hi] += pij * v[bi, j, kv].double()
    return out, lse


# (H, Hk), (Tq, Tk), causal, window, softcap, alibi: every pair of options appears at least once
GRID = [
    ((4, 4), (5, 5), True, (-1, -1), 0.0, False),
    ((6, 2), (3, 11), True, (-1, -1), 0.0, False),     # GQA, Tq < Tk, bottom-right causal
    ((4, 2), (9, 5), True, (-1, -1), 0.0, True),       # Tq > Tk: the first rows see no key
    ((3, 1), (7, 7), False, (2, 1), 0.0, False),       # MQA, window
    ((4, 2), (1, 9), False, (3, -1), 2.0, False),      # decode-like Tq = 1, window, softcap
    ((2, 2), (8, 3), False, (-1, 0), 0.0, True),       # (-1, 0) is causal, ALiBi
    ((6, 2), (6, 10), True, (2, 5), 1.5, True),        # everything: causal clips right to 0
    ((2, 1), (7, 1), False, (0, 0), 3.0, False),       # Tk = 1, a window of one key
    ((4, 4), (4, 6), False, (-1, -1), 2.0, True),      # softcap + ALiBi without masks
    ((4, 2), (5, 8), False, (1, 2), 0.0, True),        # window + ALiBi
]


def _case(hh, tt, d=8, b=2, dtype=torch.float64, seed=0):
    (h, hk), (tq, tk) = hh, tt
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, tq, h, d, generator=g, dtype=dtype)
    k = torch.randn(b, tk, hk, d, generator=g, dtype=dtype)
    v = torch.randn(b, tk, hk, d, generator=g, dtype=dtype)
    return q, k, v, g


@pytest.mark.parametrize("hh,tt,causal,window,softcap,alibi", GRID)
def test_reference_matches_the_naive_loop_and_its_own_autograd(hh, tt, causal, window, softcap, alibi):
    q, k, v, g = _case(hh, tt)
    slopes = torch.rand(q.shape[2], generator=g) if alibi else None
    scale = 0.4
    want, want_lse = naive(q, k, v, causal, scale, window, softcap, slopes)
    kw = dict(window_size=window, softcap=softcap, alibi_slopes=slopes)
    assert_close(gptfast.attention_ref(q, k, v, causal, scale, **kw), want, atol=1e-12, name="attention_ref")

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = gptfast.attention(*leaves, causal=causal, softmax_scale=scale, backend="reference",
                                 return_lse=True, **kw)
    assert_close(out, want, atol=1e-12, name="out")
    assert_close(lse, want_lse, atol=1e-12, name="lse")
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_grads = torch.autograd.grad(gptfast.attention_ref(*ref_leaves, causal, scale, **kw), ref_leaves, dout)
    for name, a, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert a.shape == r.shape
        assert_close(a, r, atol=1e-11, name=name)
    assert all(torch.isfinite(t).all() for t in (out, *grads)), "a row without keys must give 0, not NaN"


def test_rows_that_see_no_key_give_zero_and_minus_inf_lse():
    q, k, v, _ = _case((2, 1), (6, 3))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out, lse = gptfast.attention(*leaves, causal=True, backend="reference", return_lse=True)
    # query i sees keys j <= i - 3: rows 0..2 see none
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))
    assert torch.isinf(lse[..., :3]).all() and (lse[..., :3] < 0).all() and torch.isfinite(lse[..., 3:]).all()
    dq, dk, dv = torch.autograd.grad(out.sum(), leaves)
    assert torch.equal(dq[:, :3], torch.zeros_like(dq[:, :3])) and torch.isfinite(dq).all()


def test_flash_attention_normalisations():
    q, k, v, _ = _case((2, 2), (5, 7))
    run = lambda **kw: gptfast.attention(q, k, v, backend="reference", **kw)  # noqa: E731
    assert torch.equal(run(causal=False, window_size=(7, 9)), run(causal=False))        # >= seqlen_k: none
    assert torch.equal(run(causal=False, window_size=(-1, 0)), run(causal=True))        # (-1, 0) is causal
    assert torch.equal(run(causal=True, window_size=(2, 5)), run(causal=False, window_size=(2, 0)))
    assert torch.equal(run(causal=False, softcap=-1.0), run(causal=False))              # <= 0: none
    o = normalise(False, (-1, 0), 0.0, 0.0, 7)
    assert o.causal and o.plain_window


def test_gqa_matches_sdpa_with_repeated_kv_heads():
    q, k, v, _ = _case((6, 2), (9, 9), d=16, dtype=torch.float32)
    out = gptfast.attention(q, k, v, causal=True)  # auto: the first backend that has GQA
    rep = [t.repeat_interleave(3, dim=2) for t in (k, v)]
    want = gptfast.testing.sdpa_bthd(q, *rep, True)
    assert_close(out, want, atol=2e-6, name="GQA vs SDPA on repeated heads")


@pytest.mark.parametrize("backend", [b for b in gptfast.available_backends(device="cpu") if b != "reference"])
def test_kernel_backends_route_or_raise_for_options(backend):
    """A kernel backend runs the options it declares (matching the reference) and raises
    NotImplementedError naming each one it lacks; ``auto`` routes to a backend that has them."""
    from gptfast.ops import _backend
    has = _backend.KERNEL_ATTENTION_FEATURES[backend]
    able = [b for b in gptfast.available_backends("attention", "cpu")
            if not _backend._REGISTRY[("attention", b)].missing(frozenset({"gqa"}))]
    q, k, v, _ = _case((4, 2), (5, 5), dtype=torch.float32)
    qq = torch.randn(2, 5, 4, 8)
    calls = [("gqa", lambda b: gptfast.attention(q, k, v, backend=b)),
             ("window_size", lambda b: gptfast.attention(qq, qq, qq, window_size=(2, 0), backend=b)),
             ("softcap", lambda b: gptfast.attention(qq, qq, qq, softcap=5.0, backend=b))]
    for feature, call in calls:
        if feature in has:
            assert_close(call(backend), call("reference"), atol=1e-5, name=f"{backend} {feature}")
        else:
            match = r"does not support gqa.*that do: " + re.escape(str(able)) if feature == "gqa" else feature
            with pytest.raises(NotImplementedError, match=match):
                call(backend)
    # a window that FlashAttention normalises away is plain attention: the kernel runs it
    out = gptfast.attention(qq, qq, qq, causal=False, window_size=(-1, 0), backend=backend)
    assert_close(out, gptfast.attention(qq, qq, qq, causal=True, backend="reference"), atol=1e-5)
    with gptfast.use_backend("auto"):  # auto picks a backend that has the option, silently
        assert_close(gptfast.attention(q, k, v), gptfast.attention(q, k, v, backend="reference"), atol=1e-5)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(k=torch.randn(1, 4, 3, 8)), ValueError, "multiple of nheads_k"),
    (dict(window_size=(-2, 0)), ValueError, "window_size"),
    (dict(window_size=(1.5, 0)), ValueError, "window_size"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p"),
    (dict(softcap=float("nan")), ValueError, "softcap"),
    (dict(alibi_slopes=torch.rand(3)), ValueError, "alibi_slopes"),
    (dict(alibi_slopes=torch.rand(4, dtype=torch.float64)), TypeError, "alibi_slopes"),
])
def test_bad_options_name_the_argument(kwargs, error, match):
    q = torch.randn(1, 4, 4, 8)
    args = dict(k=q, v=None)
    args.update(kwargs)
    k = args.pop("k")
    v = k if args.pop("v") is None else None
    with pytest.raises(error, match=match):
        gptfast.attention(q, k, v, **args)


def test_flash_attn_signatures_and_packed_variants():
    import gptfast.flash_attn_interface as fai
    from gptfast.flash_attn_interface import flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func
    assert flash_attn_func is gptfast.flash_attn_func
    assert fai.flash_attn_varlen_func is gptfast.flash_attn_varlen_func  # FA's whole interface, one import
    assert fai.flash_attn_with_kvcache is gptfast.flash_attn_with_kvcache
    assert set(fai.__all__) >= {"flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func"}
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(2, 6, 3, 4, 8, generator=g)
    q, k, v = qkv.unbind(2)
    want = gptfast.attention_ref(q, k, v, False)  # FlashAttention's default: causal=False
    assert_close(flash_attn_qkvpacked_func(qkv), want, atol=1e-5)
    assert_close(flash_attn_kvpacked_func(q, torch.stack([k, v], 2)), want, atol=1e-5)
    # window_size as a tensor, positional arguments in FlashAttention's order
    out = flash_attn_func(q, k, v, 0.0, 0.3, True, torch.tensor([2, 0]), 0.0, None, False, False)
    assert_close(out, gptfast.attention_ref(q, k, v, True, 0.3, window_size=(2, 0)), atol=1e-5)
    out, lse, probs = flash_attn_func(q, k, v, return_attn_probs=True)
    assert lse.shape == (2, 4, 6) and probs.shape == (2, 4, 6, 6)
    assert_close(probs.sum(-1), torch.ones(2, 4, 6), atol=1e-5, name="probabilities sum to 1")
    with pytest.raises(ValueError, match="qkv"):
        flash_attn_qkvpacked_func(q)


# --------------------------------------------------------------------------- dropout

def _drawn_mask(seed_value, b, h, tq, tk, p):
    """The keep mask a call made right after torch.manual_seed(seed_value) (replaying its draw)."""
    from gptfast.ops import _philox
    torch.manual_seed(seed_value)
    seed, offset = _philox.rng_state_values(_philox.dropout_rng_state("cpu"))
    return _philox.dropout_keep_mask(seed, offset, b, h, tq, tk, p)


@pytest.mark.parametrize("hh,tt,causal,window,softcap,alibi", [GRID[1], GRID[3], GRID[6]])
def test_dropout_uses_the_philox_mask_forward_and_backward(hh, tt, causal, window, softcap, alibi):
    q, k, v, g = _case(hh, tt)
    slopes = torch.rand(q.shape[2], generator=g) if alibi else None
    p = 0.17
    kw = dict(window_size=window, softcap=softcap, alibi_slopes=slopes)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(11)
    out = gptfast.attention(*leaves, causal=causal, softmax_scale=0.4, dropout_p=p, backend="reference", **kw)
    keep = _drawn_mask(11, q.shape[0], q.shape[2], q.shape[1], k.shape[1], p)
    assert 0 < (~keep).sum() < keep.numel(), "the case must drop something and keep something"
    want, _ = naive(q, k, v, causal, 0.4, window, softcap, slopes, keep=keep, p_drop=p)
    assert_close(out, want, atol=1e-12, name="out with dropout")
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, dout)  # the backward regenerates the mask
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = gptfast.attention_ref(*ref_leaves, causal, 0.4, dropout_p=p, dropout_mask=keep, **kw)
    for name, a, r in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, ref_leaves, dout)):
        assert_close(a, r, atol=1e-11, name=name)


def test_dropout_is_reproducible_under_manual_seed_and_varies_between_calls():
    q, k, v, _ = _case((2, 2), (16, 16), dtype=torch.float32)
    run = lambda: gptfast.attention(q, k, v, dropout_p=0.3, backend="reference")  # noqa: E731
    torch.manual_seed(5)
    a, b = run(), run()
    torch.manual_seed(5)
    assert torch.equal(run(), a) and not torch.equal(a, b)
    # auto (the cpu kernels where built) draws the same mask
    torch.manual_seed(5)
    assert_close(gptfast.attention(q, k, v, dropout_p=0.3), a, atol=1e-5, name="auto vs reference")


def test_flash_attn_probs_mark_the_dropped_entries_at_the_expected_rate():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 64, 3, 16, generator=g) for _ in range(3))
    p = 0.17
    torch.manual_seed(9)
    out, lse, probs = gptfast.flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True)
    torch.manual_seed(9)
    assert torch.equal(out, gptfast.flash_attn_func(q, k, v, dropout_p=p))  # replay did not move the RNG
    keep = _drawn_mask(9, 2, 3, 64, 64, p)
    assert torch.equal(probs < 0, ~keep & (probs != 0))
    n = keep.numel()
    dropped = int((~keep).sum())
    assert abs(dropped - p * n) < 6 * math.sqrt(n * p * (1 - p)), f"{dropped} of {n} dropped at p={p}"
    assert_close(probs.abs().sum(-1), torch.ones(2, 3, 64), atol=1e-5, name="|S_dmask| rows sum to 1")


def test_gpt_with_gqa_and_attention_dropout_trains_and_is_deterministic_in_eval():
    from gptfast.model import GPT, GPTConfig
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, attn_dropout=0.2)
    model = GPT(cfg)
    qkv = model.transformer.h[0].attn.c_attn
    assert qkv.out_features == (4 + 2 * 2) * 8  # [q | k | v] with 2 kv heads of 8
    x = torch.randint(0, 32, (2, 16))
    _, loss = model(x, x)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, x)[1], model(x, x)[1])
