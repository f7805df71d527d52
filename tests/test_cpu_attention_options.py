"""The cpu backend's FlashAttention 2.8 dense options (issue 12, step 2) against the reference.

csrc/cpu/attention.cpp implements GQA/MQA, seqlen_q != seqlen_k, windows, softcap, ALiBi and
dropout (gptfast.ops._philox's mask, regenerated in C++); the reference backend is the model
(tests/test_attention_options.py checks it against a naive loop). Forward, lse and every
gradient are compared in float64 (tight), float32 and bfloat16 on a grid in which every pair of
options appears at least once (the first two rows use all of them), and dropout masks are checked
bit for bit against the reference's.
"""
from __future__ import annotations

import pytest
import torch

import gptfast
from gptfast.ops import _backend, _philox
import gptfast.ops._cpu  # noqa: E402,F401  (the launchers some tests call directly; imported lazily otherwise)
from gptfast.ops.attention import attention_backward_reference, attention_forward_reference
from gptfast.testing import assert_close, assert_within_pytorch_error

pytestmark = pytest.mark.skipif("cpu" not in gptfast.available_backends(device="cpu"),
                                reason="the cpu backend's extension is not available here")

# (H, Hk), (Tq, Tk), headdim, causal, window, softcap, alibi ("h": (H,), "bh": (B, H)), dropout_p
GRID = [
    ((6, 2), (113, 203), 59, True, (40, -1), 30.0, "h", 0.17),   # everything; causal clips right to 0
    ((3, 1), (239, 1), 32, True, (-1, -1), 30.0, "bh", 0.17),    # MQA, Tq > Tk: most rows see no key
    ((6, 2), (1, 239), 40, False, (17, 3), 0.0, "bh", 0.17),     # decode step, two-sided window
    ((3, 1), (3, 79), 64, False, (-1, -1), 30.0, None, 0.17),
    ((4, 4), (64, 64), 128, False, (5, 9), 30.0, "h", 0.0),
    ((6, 2), (64, 64), 32, True, (-1, -1), 0.0, None, 0.0),      # plain GQA
    ((4, 4), (113, 203), 64, True, (-1, -1), 0.0, None, 0.0),    # bottom-right causal only
    ((4, 4), (64, 64), 59, False, (-1, -1), 0.0, None, 0.17),    # dropout only
    ((4, 4), (64, 64), 40, False, (-1, -1), 30.0, None, 0.0),    # softcap only
    ((2, 2), (64, 64), 64, True, (-1, -1), 0.0, "bh", 0.0),      # ALiBi only
    ((3, 1), (239, 1), 128, False, (0, 0), 0.0, None, 0.0),      # window of one key, Tk = 1
    ((6, 2), (3, 79), 40, True, (2, -1), 0.0, "h", 0.0),         # rows see 3 keys each
]
B = 2
SCALE = 0.3


def _inputs(case, dtype, seed=0):
    (h, hk), (tq, tk), d, causal, window, softcap, alibi, p = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, tq, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, tk, hk, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, tk, hk, d, generator=g, dtype=torch.float64)
    dout = torch.randn(B, tq, h, d, generator=g, dtype=torch.float64)
    slopes = None if alibi is None else torch.rand((h,) if alibi == "h" else (B, h), generator=g) * 0.5
    kw = dict(causal=causal, softmax_scale=SCALE, window_size=window, softcap=softcap, alibi_slopes=slopes,
              dropout_p=p)
    return [t.to(dtype) for t in (q, k, v, dout)], kw


def _run(backend, q, k, v, dout, kw, dropout_seed=7):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(dropout_seed)  # both backends draw the same (seed, offset)
    out, lse = gptfast.attention(*leaves, backend=backend, return_lse=True, **kw)
    grads = torch.autograd.grad(out, leaves, dout)  # the backward regenerates the mask
    return out, lse, grads


def _check(name, got, want, atol):
    out, lse, grads = got
    rout, rlse, rgrads = want
    assert_close(out, rout, atol=atol, name=f"{name} out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rlse)), f"{name}: rows without keys differ"
    assert_close(lse.nan_to_num(neginf=0.0), rlse.nan_to_num(neginf=0.0), atol=atol, name=f"{name} lse")
    for gname, a, r in zip(("dq", "dk", "dv"), grads, rgrads):
        assert a.shape == r.shape, gname
        assert_close(a, r, atol=atol, name=f"{name} {gname}")
    assert all(torch.isfinite(t).all() for t in (out, *grads)), "rows without keys must give 0, not NaN"


def test_cpu_declares_every_option():
    assert _backend.KERNEL_ATTENTION_FEATURES["cpu"] == frozenset(_backend.ATTENTION_FEATURES + _backend.LAYOUT_FEATURES)


@pytest.mark.parametrize("case", GRID)
def test_float64_matches_the_reference(case):
    (q, k, v, dout), kw = _inputs(case, torch.float64)
    _check("fp64", _run("cpu", q, k, v, dout, kw), _run("reference", q, k, v, dout, kw), atol=1e-10)


@pytest.mark.parametrize("case", [GRID[0], GRID[1], GRID[2], GRID[4]])
def test_float32_matches_the_reference(case):
    (q, k, v, dout), kw = _inputs(case, torch.float32)
    _check("fp32", _run("cpu", q, k, v, dout, kw), _run("reference", q, k, v, dout, kw), atol=2e-5)


@pytest.mark.parametrize("case", [GRID[0], GRID[2], GRID[5]])
def test_bfloat16_is_within_the_references_own_error(case):
    (q, k, v, dout), kw = _inputs(case, torch.float64)
    truth = _run("reference", q, k, v, dout, kw)
    low = [t.to(torch.bfloat16) for t in (q, k, v, dout)]
    got, pt = _run("cpu", *low, kw), _run("reference", *low, kw)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert_within_pytorch_error(got[0], truth[0], pt[0], factor=2, atol=1e-3, name="bf16 out")
    finite = lambda t: t.double().nan_to_num(neginf=0.0)  # noqa: E731  (-inf rows checked in fp64)
    assert_within_pytorch_error(finite(got[1]), finite(truth[1]), finite(pt[1]), factor=2, atol=1e-4,
                                name="bf16 lse")
    for gname, a, r, c in zip(("dq", "dk", "dv"), got[2], truth[2], pt[2]):
        assert_within_pytorch_error(a, r, c, factor=3, atol=1e-3, name=f"bf16 {gname}")


@pytest.mark.parametrize("seed,offset", [(0x0123456789ABCDEF, 0), (-0x1234567890ABCD, 4 * 0x12345678901)])
def test_dropout_mask_is_the_philox_reference_bit_for_bit(seed, offset):
    """With v the identity (one key per head-dim column), out[b, i, h, j] = p_ij * keep / (1 - p):
    the kept set is read off exactly, for 64-bit seeds (high bit set) and offsets past 2^32."""
    h, tq, tk, p = 3, 37, 50, 0.17
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, tq, h, 64, generator=g, dtype=torch.float64)
    k = torch.randn(B, tk, h, 64, generator=g, dtype=torch.float64)
    v = torch.eye(tk, 64, dtype=torch.float64)[None, :, None, :].expand(B, tk, h, 64).contiguous()
    rng = torch.tensor([seed, offset], dtype=torch.int64)
    kw = dict(window=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=p, rng_state=rng)
    out, lse = gptfast.ops._cpu.attention_forward(q, k, v, False, SCALE, **kw)
    keep = _philox.dropout_keep_mask(seed, offset, B, h, tq, tk, p)          # (B, H, Tq, Tk)
    assert 0 < (~keep).sum() < keep.numel()
    assert torch.equal(out[..., :tk].permute(0, 2, 1, 3) > 0, keep), "the kept entries differ"
    ref_out, ref_lse = attention_forward_reference(q, k, v, False, SCALE, **kw)
    assert_close(out, ref_out, atol=1e-12, name="out")
    assert_close(lse, ref_lse, atol=1e-12, name="lse: the undropped logsumexp")
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = gptfast.ops._cpu.attention_backward(dout, q, k, v, out, lse, False, SCALE, **kw)
    for name, a, r in zip(("dq", "dk", "dv"), grads,
                          attention_backward_reference(dout, q, k, v, out, lse, False, SCALE, **kw)):
        assert_close(a, r, atol=1e-11, name=name)


def test_gqa_gradients_are_deterministic_and_no_kv_copy_is_needed():
    (q, k, v, dout), kw = _inputs(GRID[0], torch.float32)
    a, b = _run("cpu", q, k, v, dout, kw), _run("cpu", q, k, v, dout, kw)
    assert all(torch.equal(x, y) for x, y in zip((a[0], *a[2]), (b[0], *b[2]))), "not bitwise reproducible"
    # strided k/v (a slice of a packed kv tensor) give the same result as contiguous ones
    kv = torch.stack([k, v], dim=2)
    _check("packed kv", _run("cpu", q, kv[:, :, 0], kv[:, :, 1], dout, kw), a, atol=0)


def test_auto_picks_cpu_for_options_and_plain_calls_keep_the_fast_path():
    (q, k, v, dout), kw = _inputs(GRID[2], torch.float32)
    torch.manual_seed(1)
    auto = gptfast.attention(q, k, v, **kw)
    torch.manual_seed(1)
    assert torch.equal(auto, gptfast.attention(q, k, v, backend="cpu", **kw))
    # a window that FlashAttention normalises away is the plain causal kernel, bit for bit
    x = torch.randn(2, 70, 4, 32)
    assert torch.equal(gptfast.attention(x, x, x, causal=False, window_size=(-1, 0), backend="cpu"),
                       gptfast.attention(x, x, x, causal=True, backend="cpu"))


def test_extension_checks_option_arguments():
    ext = gptfast.ops._cpu._ext
    q = torch.randn(1, 4, 4, 8)
    with pytest.raises(ValueError, match="multiple of nheads_k"):
        ext.attention_forward(q, torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8), True, 0.3)
    with pytest.raises(ValueError, match="alibi_slopes"):
        ext.attention_forward(q, q, q, True, 0.3, alibi_slopes=torch.rand(3))
    with pytest.raises(TypeError, match="alibi_slopes"):
        ext.attention_forward(q, q, q, True, 0.3, alibi_slopes=torch.rand(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="rng_state"):
        ext.attention_forward(q, q, q, True, 0.3, dropout_p=0.1)
    with pytest.raises(ValueError, match="multiple of 4"):
        ext.attention_forward(q, q, q, True, 0.3, dropout_p=0.1, rng_state=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="dropout_p"):
        ext.attention_forward(q, q, q, True, 0.3, dropout_p=1.0, rng_state=torch.tensor([1, 0]))
