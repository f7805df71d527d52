"""Triton attention (kernels/attention.py) with FlashAttention 2.8's dense options against the
reference backend: GQA/MQA, seqlen_q != seqlen_k (bottom-right aligned), sliding windows, softcap,
ALiBi and dropout, forward + lse + every gradient.

On CPU this runs in Triton's interpreter, so the grid is a pairwise covering array instead of the
cross product: every pair of values of any two factors (kv heads, (Tq, Tk), causal, window,
softcap, ALiBi, dropout, head dim) appears in at least one case (``test_grid_covers_every_pair``).

Tolerances. fp32: both backends compute the same function in fp32 from the same inputs, so they
differ by fp32 rounding only: ``2e-5 * max(1, max|ref|)`` (measured worst ~1e-6 relative). With
dropout this is also the exact-mask check: one flipped keep bit moves an output by
p_ij * |v_j| / (1 - p) ~ 1e-2, three orders above the tolerance (and ``test_dropout_mask_is_exact``
reads the mask bit for bit). fp16: the kernel rounds P (and dS) to fp16 before each tensor-core
dot, a relative 2^-11 per summed term, and rounds its results to fp16; the reference runs in fp32
on the same fp16 values. So each result is off by at most ~2^-11 * (sum of |terms|) plus its own
rounding: tolerance ``4 * 2^-11 * M`` with M the sum of absolute terms (``_magnitudes``).
"""
from __future__ import annotations

import importlib
import itertools
import math

import pytest
import torch

pytest.importorskip("triton")

import gptfast  # noqa: E402
A = importlib.import_module("gptfast.ops.attention")  # the module (gptfast.ops.attention is the function)
from gptfast.testing import assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H = 4  # query heads; batch 2 only where ALiBi slopes are (B, H) (interpreter time), else 1

FACTORS = dict(hk=[4, 2, 1], tt=[(1, 37), (3, 19), (33, 65), (37, 1), (40, 40)], causal=[False, True],
               window=[(-1, -1), (5, 3), (16, -1), (-1, 4)], softcap=[0.0, 30.0], alibi=[None, "h", "bh"],
               dropout=[0.0, 0.17], d=[16, 40, 64])

# (kv heads of 4 query heads, (Tq, Tk), causal, window, softcap, alibi slopes shape, dropout_p, head dim):
# a greedy pairwise covering array (23 cases), biased towards small shapes.
GRID = [
    (1, (37, 1), False, (-1, -1), 0.0, "bh", 0.17, 16),
    (4, (1, 37), True, (16, -1), 30.0, None, 0.0, 16),
    (2, (3, 19), True, (-1, 4), 30.0, "h", 0.17, 40),
    (2, (1, 37), False, (5, 3), 0.0, "h", 0.0, 64),
    (4, (40, 40), False, (5, 3), 0.0, None, 0.17, 40),
    (1, (40, 40), True, (-1, 4), 30.0, "bh", 0.0, 64),
    (1, (33, 65), True, (-1, -1), 0.0, "h", 0.0, 40),
    (2, (33, 65), False, (16, -1), 30.0, "bh", 0.17, 64),
    (4, (37, 1), True, (-1, -1), 30.0, None, 0.0, 64),
    (4, (3, 19), False, (-1, 4), 0.0, "h", 0.0, 16),
    (1, (1, 37), True, (5, 3), 30.0, "bh", 0.17, 40),
    (2, (37, 1), False, (16, -1), 0.0, "h", 0.0, 40),
    (1, (3, 19), False, (16, -1), 0.0, None, 0.17, 64),
    (2, (40, 40), True, (-1, -1), 0.0, "h", 0.0, 16),
    (4, (33, 65), False, (5, 3), 0.0, "bh", 0.0, 16),
    (2, (33, 65), False, (-1, 4), 30.0, None, 0.17, 16),
    (2, (3, 19), False, (-1, -1), 30.0, "bh", 0.0, 16),
    (1, (37, 1), True, (-1, 4), 0.0, "h", 0.0, 16),
    (2, (1, 37), True, (-1, -1), 0.0, "bh", 0.0, 16),
    (2, (1, 37), False, (-1, 4), 30.0, None, 0.0, 16),
    (2, (37, 1), True, (5, 3), 0.0, None, 0.0, 16),
    (4, (3, 19), True, (5, 3), 0.0, None, 0.0, 16),
    (1, (40, 40), True, (16, -1), 30.0, "h", 0.0, 16),
]
FP16_GRID = [GRID[i] for i in (0, 1, 3, 9, 10, 13, 14)]  # 7 cases holding every value of every factor


def _id(case):
    hk, (tq, tk), causal, window, softcap, alibi, p, d = case
    return (f"hk{hk}-{tq}x{tk}-{'causal' if causal else 'full'}-w{window[0]}_{window[1]}-sc{softcap:g}"
            f"-alibi{alibi}-p{p:g}-d{d}")


def test_grid_covers_every_pair():
    names = list(FACTORS)
    for a, b in itertools.combinations(range(len(names)), 2):
        seen = {(row[a], row[b]) for row in GRID}
        for va in FACTORS[names[a]]:
            for vb in FACTORS[names[b]]:
                assert (va, vb) in seen, f"no case with {names[a]}={va} and {names[b]}={vb}"
    for a, name in enumerate(names):
        assert {row[a] for row in FP16_GRID} == set(FACTORS[name]), f"fp16 grid misses a value of {name}"


def _make(case, dtype, seed):
    hk, (tq, tk), causal, window, softcap, alibi, p, d = case
    B = 2 if alibi == "bh" else 1
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    q, k, v, dout = rnd(B, tq, H, d), rnd(B, tk, hk, d), rnd(B, tk, hk, d), rnd(B, tq, H, d)
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    slopes = None
    if alibi is not None:
        shape = (H,) if alibi == "h" else (B, H)
        slopes = (torch.rand(*shape, generator=g) * 0.5).to(DEVICE)
    kw = dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes, dropout_p=p)
    return (q, k, v), dout, kw


def _run(backend, inputs, dout, kw, rng_seed=1234):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    torch.manual_seed(rng_seed)  # the same dropout (seed, offset) for every backend
    out, lse = gptfast.attention(*leaves, backend=backend, return_lse=True, **kw)
    out.backward(dout.to(out.dtype))
    return out, lse, [t.grad for t in leaves]


def _check_no_key_rows(out, lse, ref_lse, name):
    empty = ref_lse == float("-inf")
    assert torch.equal(lse == float("-inf"), empty), f"{name}: rows with lse = -inf differ"
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), f"{name}: NaN"
    rows = empty.transpose(1, 2)  # (B, Tq, H)
    assert (out[rows] == 0).all(), f"{name}: a row that sees no key is not 0"


@pytest.mark.parametrize("case", GRID, ids=[_id(c) for c in GRID])
def test_options_fp32_match_reference(case):
    inputs, dout, kw = _make(case, torch.float32, seed=GRID.index(case))
    out, lse, grads = _run("triton", inputs, dout, kw)
    r_out, r_lse, r_grads = _run("reference", inputs, dout, kw)
    name = _id(case)
    tol = lambda ref: 2e-5 * max(1.0, ref.abs().max().item())  # noqa: E731
    assert out.shape == r_out.shape and lse.shape == r_lse.shape and lse.dtype == torch.float32
    _check_no_key_rows(out, lse, r_lse, name)
    assert_close(out, r_out, atol=tol(r_out), name=f"{name} out")
    finite = r_lse != float("-inf")
    assert_close(lse[finite], r_lse[finite], atol=tol(r_lse[finite]) if finite.any() else 0.0,
                 name=f"{name} lse")
    for n, a, r in zip(("dq", "dk", "dv"), grads, r_grads):
        assert a.shape == r.shape and not torch.isnan(a).any()
        assert_close(a, r, atol=tol(r), name=f"{name} {n}")


def _magnitudes(inputs, dout, kw, rng_state):
    """Sums of absolute terms [out, dq, dk, dv] (each the max over its tensor) in float64, with the
    reference's own score/mask/dropout definitions."""
    q, k, v = (t.double() for t in inputs)
    do = dout.double().transpose(1, 2)
    hk, d = k.shape[2], q.shape[-1]
    scale = 1.0 / math.sqrt(d)
    opts = A.normalise(kw["causal"], kw["window_size"], kw["softcap"], kw["dropout_p"], k.shape[1])
    s, _ = A._scores(q, k, opts, scale, kw["alibi_slopes"])
    p = A._probabilities(s, torch.logsumexp(s, -1))
    drop = A.dropout_scale(A._keep_mask(rng_state, q, k, opts.dropout_p), opts.dropout_p, torch.float64)
    drop = torch.ones_like(p) if drop is None else drop
    vh, kh = A._expand_kv(v, H).abs(), A._expand_kv(k, H).abs()
    out = torch.matmul(p * drop, A._expand_kv(v, H))
    m_out = torch.matmul(p * drop, vh)
    m_dv = A._group_sum(torch.matmul((p * drop).transpose(-1, -2), do.abs()), hk)
    # ds = p (dp * drop - delta), delta = dO . out: |terms| p (|dO|.|v| drop + |dO|.|out|)
    ds = p * (torch.matmul(do.abs(), vh.transpose(-1, -2)) * drop + (do.abs() * out.abs()).sum(-1, keepdim=True))
    m_dq = scale * torch.matmul(ds, kh)
    m_dk = scale * A._group_sum(torch.matmul(ds.transpose(-1, -2), q.abs().transpose(1, 2)), hk)
    return [m.max().item() for m in (m_out, m_dq, m_dk, m_dv)]


@pytest.mark.parametrize("case", FP16_GRID, ids=[_id(c) for c in FP16_GRID])
def test_options_fp16_match_reference_fp32(case):
    inputs, dout, kw = _make(case, torch.float16, seed=100 + GRID.index(case))
    out, lse, grads = _run("triton", inputs, dout, kw)
    r_out, r_lse, r_grads = _run("reference", [t.float() for t in inputs], dout.float(), kw)
    torch.manual_seed(1234)
    rng = A._rng_state(inputs[0].device, kw["dropout_p"])  # the calls' [seed, offset]
    mags = _magnitudes(inputs, dout, kw, rng)
    name = _id(case) + " fp16"
    assert out.dtype == torch.float16 and all(g.dtype == torch.float16 for g in grads)
    _check_no_key_rows(out, lse, r_lse, name)
    eps = 2.0 ** -11
    assert_close(out, r_out, atol=4 * eps * mags[0], name=f"{name} out")
    finite = r_lse != float("-inf")
    assert_close(lse[finite], r_lse[finite], atol=2e-5 * max(1.0, r_lse[finite].abs().max().item())
                 if finite.any() else 0.0, name=f"{name} lse")  # fp32 scores of the same fp16 inputs
    for n, a, r, m in zip(("dq", "dk", "dv"), grads, r_grads, mags[1:]):
        assert_close(a, r, atol=4 * eps * m, name=f"{name} {n}")


def test_launchers_explicit_rng_state_match_reference():
    # An explicit 64-bit state: a seed with the top bit set (int64 bits) and an offset past 2^32
    # stream positions (counter word c1 = 1), on the launchers themselves, with strided inputs:
    # q a head-major view, k/v slices of one packed (B, Tk, 2, Hk, D) buffer.
    from gptfast.kernels.attention import attention_backward, attention_forward
    g = torch.Generator().manual_seed(7)
    B, tq, tk, hk, d = 2, 33, 65, 2, 40
    q = torch.randn(B, H, tq, d, generator=g).to(DEVICE).transpose(1, 2)
    dout = torch.randn(B, tq, H, d, generator=g).to(DEVICE)
    k, v = torch.randn(B, tk, 2, hk, d, generator=g).to(DEVICE).unbind(2)
    assert not (q.is_contiguous() or k.is_contiguous())
    rng = torch.tensor([-(2 ** 63) + 0x12345678, (1 << 34) + 8], dtype=torch.int64)
    kw = dict(window=(20, 3), softcap=30.0, alibi_slopes=torch.rand(H, generator=g).to(DEVICE), dropout_p=0.17,
              rng_state=rng)
    out, lse = attention_forward(q, k, v, False, 0.2, **kw)
    r_out, r_lse = A.attention_forward_reference(q, k, v, False, 0.2, **kw)
    assert_close(out, r_out, atol=2e-5, name="out")
    assert_close(lse, r_lse, atol=2e-5, name="lse")
    grads = attention_backward(dout, q, k, v, out, lse, False, 0.2, **kw)
    r_grads = A.attention_backward_reference(dout, q, k, v, r_out, r_lse, False, 0.2, **kw)
    for n, a, r in zip(("dq", "dk", "dv"), grads, r_grads):
        assert_close(a, r, atol=2e-5 * max(1.0, r.abs().max().item()), name=n)


def test_dropout_mask_is_exact():
    # q = 0: every visible key has p = 1/Tk; v = identity rows, so out[i, h, j] = keep_ij / (1-p) / Tk
    # reads the kernel's keep bit of (b, h, i, j) directly.
    from gptfast.kernels.attention import attention_forward
    from gptfast.ops import _philox
    B, tq, tk, d, p = 2, 37, 40, 64, 0.3
    q = torch.zeros(B, tq, H, d, device=DEVICE)
    k = torch.randn(B, tk, H, d, device=DEVICE)
    v = torch.eye(tk, d, device=DEVICE)[None, :, None, :].expand(B, tk, H, d).contiguous()
    seed, offset = 0xDEADBEEFCAFEF00D - (1 << 64), 4 * 12345
    out, _ = attention_forward(q, k, v, False, 1.0, dropout_p=p,
                               rng_state=torch.tensor([seed, offset], dtype=torch.int64))
    got = out[..., :tk].permute(0, 2, 1, 3) > 0  # (B, H, Tq, Tk)
    want = _philox.dropout_keep_mask(seed, offset, B, H, tq, tk, p, DEVICE)
    assert torch.equal(got, want), f"{(got != want).sum().item()} keep bits differ"
    kept = out[..., :tk].permute(0, 2, 1, 3)[want]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p) / tk), rtol=1e-6, atol=0)


def test_gqa_backward_reads_kv_heads_in_place():
    # dk/dv have k's (B, Tk, Hk, D) shape and equal the per-query-head gradients summed over each
    # group (reference: K/V repeated); MQA included.
    for hk in (2, 1):
        case = (hk, (40, 40), True, (-1, -1), 0.0, None, 0.0, 16)
        inputs, dout, kw = _make(case, torch.float32, seed=hk)
        _, _, grads = _run("triton", inputs, dout, kw)
        q, k, v = inputs
        rep = [t.repeat_interleave(H // hk, dim=2) for t in (k, v)]
        _, _, full = _run("triton", [q, *rep], dout, kw)
        for a, f in zip(grads[1:], full[1:]):
            assert a.shape == k.shape
            summed = f.view(1, 40, hk, H // hk, 16).sum(3)
            assert_close(a, summed, atol=2e-5 * max(1.0, summed.abs().max().item()), name=f"hk={hk}")
