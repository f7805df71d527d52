"""Triton flash-attention (kernels/attention.py) through ``gptfast.attention(..., backend="triton")``.

On CPU this runs in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py), so shapes are
small and the grid varies one axis at a time around a base case (B=2, H=3, T=97, D=64, causal,
fp16) instead of the full cross product; every value of the issue-3 grid (T in {1, 3, 97, 130},
D in {16, 40, 64, 128}, causal and not, fp16 and fp32) appears at least once. Ground truth is
plain PyTorch math in float64; fp16 must be within 2x (output) / 3x (gradients) of PyTorch's own
fp16 error plus the rounding of the summed terms (gptfast.testing's rule, fp32 too).
bf16 only on a GPU (tests/gpu/).
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

import gptfast  # noqa: E402
from gptfast.testing import assert_close, assert_results_match, attention_magnitudes  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B, T, H, D, layout, scale_inputs=1.0):
    """A maker ``dtype -> [q, k, v]`` of leaves with the same values, in a non-contiguous layout."""
    if layout == "packed":  # slices of one (B, T, 3, H, D) buffer, like a fused QKV projection
        buf = torch.randn(B, T, 3, H, D, device=DEVICE) * scale_inputs
        return lambda dt: [t.requires_grad_() for t in buf.to(dt).unbind(2)]
    if layout == "bhtd":  # head-major storage, transposed view
        buf = torch.randn(3, B, H, T, D, device=DEVICE) * scale_inputs
        return lambda dt: [t.transpose(1, 2).requires_grad_() for t in buf.to(dt).unbind(0)]
    buf = torch.randn(3, B, T, H, D, device=DEVICE) * scale_inputs
    return lambda dt: [t.contiguous().requires_grad_() for t in buf.to(dt).unbind(0)]


def check_attention(B, T, H, D, causal, dtype, layout="packed", scale_inputs=1.0, backend="triton"):
    make = _inputs(B, T, H, D, layout, scale_inputs)
    scale = 1.0 / math.sqrt(D)
    x64, xpt, xtr = make(torch.float64), make(dtype), make(dtype)
    assert not xtr[0].is_contiguous() or layout == "contiguous"
    ref = gptfast.attention_ref(*x64, causal, scale, upcast=False)
    pt = gptfast.attention_ref(*xpt, causal, scale, upcast=False)
    out = gptfast.attention(*xtr, causal=causal, backend=backend)
    assert out.dtype == dtype and out.shape == (B, T, H, D)
    # non-contiguous upstream gradient (stride(-1) == 1, other strides padded)
    g = torch.randn(B, T, H, D + 8, device=DEVICE)[..., :D].to(dtype)
    ref.backward(g.to(torch.float64))
    pt.backward(g)
    out.backward(g)
    for a, b in zip(xtr, x64):
        assert a.grad.shape == b.grad.shape and a.grad.dtype == dtype
    grads = lambda xs: [t.grad for t in xs]  # noqa: E731
    assert_results_match(out, ref, pt, grads(xtr), grads(x64), grads(xpt),
                         magnitudes=attention_magnitudes(*x64, g, causal, scale),
                         name=f"T={T} D={D} causal={causal} {dtype}")


# (T, D, causal, dtype, layout): one axis at a time around (97, 64, True, fp16).
GRID = [
    (97, 64, True, torch.float16, "packed"),
    # seqlen axis
    (1, 64, True, torch.float16, "packed"),
    (3, 64, True, torch.float16, "bhtd"),
    (130, 64, True, torch.float16, "packed"),
    # head-dim axis (40: padded to 64 inside the kernel)
    (97, 16, True, torch.float16, "packed"),
    (97, 40, True, torch.float16, "bhtd"),
    (97, 128, True, torch.float16, "packed"),
    (33, 111, True, torch.float16, "bhtd"),  # DESIGN.md's 111 -> padded to 128
    # non-causal
    (97, 64, False, torch.float16, "packed"),
    (3, 40, False, torch.float16, "packed"),
    (130, 16, False, torch.float16, "bhtd"),
    (257, 16, False, torch.float16, "packed"),  # DESIGN.md's 257: several key blocks plus a tail
    # fp32 (ieee dots), tight tolerances
    (1, 16, True, torch.float32, "packed"),
    (3, 40, False, torch.float32, "bhtd"),
    (130, 40, True, torch.float32, "packed"),
    (97, 128, False, torch.float32, "contiguous"),
]


@pytest.mark.parametrize("T,D,causal,dtype,layout", GRID,
                         ids=[f"T{t}-D{d}-{'causal' if c else 'full'}-{str(dt)[6:]}-{lay}"
                              for t, d, c, dt, lay in GRID])
def test_attention_triton_matches_float64(T, D, causal, dtype, layout):
    torch.manual_seed(T * 1000 + D)
    check_attention(2, T, 3, D, causal, dtype, layout)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="bf16 tl.dot returns garbage in the Triton interpreter; bf16 runs on a GPU only")
def test_attention_triton_bf16():
    torch.manual_seed(0)
    check_attention(2, 97, 3, 64, True, torch.bfloat16)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_triton_large_logits_stay_finite(causal):
    # inputs x100: logits ~1e4 / sqrt(D); the online softmax must not overflow
    torch.manual_seed(1)
    B, T, H, D = 1, 37, 2, 16
    q, k, v = _inputs(B, T, H, D, "packed", 100.0)(torch.float32)
    out = gptfast.attention(q, k, v, causal=causal, backend="triton")
    out.backward(torch.randn_like(out))
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()
    ref = gptfast.attention_ref(*(t.detach().double() for t in (q, k, v)), causal, 1 / math.sqrt(D))
    assert_close(out, ref, atol=2e-5 * 100, name="x100 out")


def test_attention_triton_seqlen_one_and_tiny_have_no_nan():
    # T=1: the single key is the only visible one (causal and not); T=3 < any tile: all tails masked
    for T in (1, 3):
        for causal in (True, False):
            q, k, v = (torch.randn(2, T, 3, 40, device=DEVICE, dtype=torch.float16).requires_grad_()
                       for _ in range(3))
            out = gptfast.attention(q, k, v, causal=causal, backend="triton")
            out.float().sum().backward()
            for t in (out, q.grad, k.grad, v.grad):
                assert not torch.isnan(t).any(), f"NaN at T={T} causal={causal}"
            if T == 1:  # softmax over one key is 1: out == v exactly
                torch.testing.assert_close(out, v.detach(), rtol=0, atol=0)


def test_attention_triton_nan_propagates():
    q, k, v = (torch.randn(1, 8, 2, 16, device=DEVICE) for _ in range(3))
    q[0, 5, 1, 3] = float("nan")
    out = gptfast.attention(q, k, v, causal=True, backend="triton")
    assert torch.isnan(out[0, 5, 1]).all()
    assert not torch.isnan(out[0, :5]).any(), "NaN leaked into rows that never saw it"


def test_attention_triton_lse_contract():
    # the launcher itself: lse = logsumexp of the scaled, masked scores, fp32, (B, H, T)
    from gptfast.kernels.attention import attention_forward
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 33, 3, 24, device=DEVICE) for _ in range(3))
    out, lse = attention_forward(q, k, v, True, 0.3)
    assert out.is_contiguous() and lse.dtype == torch.float32 and lse.shape == (2, 3, 33)
    s = (q.double().transpose(1, 2) @ k.double().transpose(1, 2).transpose(-1, -2)) * 0.3
    s = s.masked_fill(torch.ones(33, 33, dtype=torch.bool, device=DEVICE).triu(1), float("-inf"))
    assert_close(lse, torch.logsumexp(s, -1), atol=1e-5, name="lse")


def test_attention_triton_deterministic_backward_is_bitwise_reproducible():
    # Weak on the interpreter (programs run sequentially); tests/gpu/ repeats it on a GPU.
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 70, 3, 32, device=DEVICE, dtype=torch.float16) for _ in range(3))
    g = torch.randn_like(q)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = gptfast.attention(*leaves, causal=True, backend="triton", deterministic=True)
        out.backward(g)
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
