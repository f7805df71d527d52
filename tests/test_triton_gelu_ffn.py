"""Triton GELU-FFN (kernels/gelu_ffn.py) through ``gptfast.gelu_ffn(..., backend="triton")``.

Interpreter-sized (TRITON_INTERPRET=1 on CPU; the interpreter's tiles are 32x32x32, so the sizes
below leave ragged tails in M, K, H and N), tanh and exact GELU, biases present or absent, fp16
and fp32, a 3-D input and non-contiguous weights (transposed storage, read through strides).
Ground truth: Linear -> GELU -> Linear in float64; within 2x/3x PyTorch's own error in the dtype
plus the rounding of the summed terms (gptfast.testing's rule; fp32 too).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import gptfast  # noqa: E402
from gptfast.testing import assert_close, assert_results_match, gelu_ffn_magnitudes  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check_gelu_ffn(B, T, K, H, N, dtype, approximate="tanh", has_bias=True, weights="transposed",
                   backend="triton"):
    torch.manual_seed(K * 7 + H)
    x = torch.randn(B, T, K, device=DEVICE)
    if weights == "transposed":  # nn.Linear shapes, column-major storage
        w1 = torch.randn(K, H, device=DEVICE).t() / K ** 0.5
        w2 = torch.randn(H, N, device=DEVICE).t() / H ** 0.5
    else:
        w1 = torch.randn(H, K, device=DEVICE) / K ** 0.5
        w2 = torch.randn(N, H, device=DEVICE) / H ** 0.5
    b1 = torch.randn(H, device=DEVICE) if has_bias else None
    b2 = torch.randn(N, device=DEVICE) if has_bias else None

    def leaves(dt):
        # copy=True: fresh leaves even for fp32; .to() keeps the transposed (dense) strides of the weights
        return [None if t is None else t.to(dt, copy=True).requires_grad_() for t in (x, w1, b1, w2, b2)]

    x64, xpt, xtr = leaves(torch.float64), leaves(dtype), leaves(dtype)
    if weights == "transposed":
        assert not xtr[1].is_contiguous() and not xtr[3].is_contiguous()
    ref = gptfast.gelu_ffn_ref(*x64, approximate)
    pt = gptfast.gelu_ffn_ref(*xpt, approximate)
    out = gptfast.gelu_ffn(*xtr, approximate=approximate, backend=backend)
    assert out.dtype == dtype and out.shape == (B, T, N)
    g = torch.randn(B, T, N, device=DEVICE).to(dtype)
    ref.backward(g.double())
    pt.backward(g)
    out.backward(g)
    grads = lambda xs: [None if t is None else t.grad for t in xs]  # noqa: E731
    for a, r in zip(grads(xtr), grads(x64)):
        assert a is None or (a.dtype == dtype and a.shape == r.shape)
    assert_results_match(out, ref, pt, grads(xtr), grads(x64), grads(xpt),
                         magnitudes=gelu_ffn_magnitudes(*x64, g.double(), approximate),
                         name=f"M={B * T} K={K} H={H} N={N} {dtype} {approximate}")


GRID = [  # (B, T, K, H, N, dtype, approximate, has_bias, weights)
    (2, 19, 45, 70, 29, torch.float32, "tanh", True, "transposed"),
    (1, 37, 40, 96, 33, torch.float32, "none", False, "contiguous"),
    (2, 19, 45, 70, 29, torch.float16, "tanh", True, "transposed"),
    (3, 11, 64, 50, 40, torch.float16, "none", True, "contiguous"),
    (1, 1, 17, 20, 9, torch.float16, "tanh", False, "transposed"),  # one token, everything a tail
]


@pytest.mark.parametrize("B,T,K,H,N,dtype,approximate,has_bias,weights", GRID,
                         ids=[f"M{b * t}-K{k}-H{h}-N{n}-{str(d)[6:]}-{a}-b{int(hb)}-{w}"
                              for b, t, k, h, n, d, a, hb, w in GRID])
def test_gelu_ffn_triton_matches_float64(B, T, K, H, N, dtype, approximate, has_bias, weights):
    check_gelu_ffn(B, T, K, H, N, dtype, approximate, has_bias, weights)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="bf16 tl.dot returns garbage in the Triton interpreter; bf16 runs on a GPU only")
def test_gelu_ffn_triton_bf16():
    check_gelu_ffn(4, 50, 96, 200, 72, torch.bfloat16)


def test_gelu_ffn_triton_saves_preactivation():
    from gptfast.kernels.gelu_ffn import gelu_ffn_forward
    x = torch.randn(33, 20, device=DEVICE)
    w1, b1 = torch.randn(40, 20, device=DEVICE), torch.randn(40, device=DEVICE)
    w2 = torch.randn(7, 40, device=DEVICE)
    out, h = gelu_ffn_forward(x, w1, b1, w2, None, "none")
    assert_close(h, F.linear(x.double(), w1.double(), b1.double()), atol=1e-4, name="h")


# numpy warns while computing sigmoid(2u) = 1/(1+exp(-2u)) for very negative u: exp overflows
# to inf and the sigmoid correctly becomes 0 (the test asserts the results are finite).
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_gelu_ffn_triton_large_activations_stay_finite():
    # |h| ~ 1e3: the sigmoid form of tanh-GELU and its derivative must not produce inf/NaN
    x = torch.randn(8, 16, device=DEVICE) * 100
    w1 = torch.randn(24, 16, device=DEVICE).requires_grad_()
    w2 = torch.randn(5, 24, device=DEVICE).requires_grad_()
    xl = x.requires_grad_()
    out = gptfast.gelu_ffn(xl, w1, None, w2, None, approximate="tanh", backend="triton")
    out.sum().backward()
    for t in (out, xl.grad, w1.grad, w2.grad):
        assert torch.isfinite(t).all()
