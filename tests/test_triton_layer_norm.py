"""Triton LayerNorm (kernels/layer_norm.py) through ``gptfast.layer_norm(..., backend="triton")``.

Interpreter-sized (TRITON_INTERPRET=1 on CPU): hidden sizes {123, 768, 1000} (plus one row wider
than the kernel's single tile, which takes the chunked path), weight/bias present or absent,
fp16 and fp32, non-contiguous 3-D input and upstream gradient. Ground truth: F.layer_norm in
float64; within 2x/3x PyTorch's own error in the dtype plus the rounding of the summed terms
(gptfast.testing's rule; fp32 too).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import gptfast  # noqa: E402
from gptfast.testing import assert_close, assert_results_match, layer_norm_magnitudes  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check_layer_norm(rows, N, dtype, has_weight=True, has_bias=True, shift=1.0, backend="triton"):
    torch.manual_seed(N + rows)
    # (2, rows, N) viewed through a transpose of a (rows, 2, N) buffer: not contiguous
    xbuf = torch.randn(rows, 2, N, device=DEVICE) * 2.0 + shift
    w = torch.randn(N, device=DEVICE) if has_weight else None
    b = torch.randn(N, device=DEVICE) if has_bias else None

    def leaves(dt):
        x = xbuf.to(dt, copy=True).transpose(0, 1).requires_grad_()
        p = [None if t is None else t.to(dt, copy=True).requires_grad_() for t in (w, b)]
        return [x] + p

    x64, xpt, xtr = leaves(torch.float64), leaves(dtype), leaves(dtype)
    assert not xtr[0].is_contiguous()
    ref = F.layer_norm(x64[0], (N,), x64[1], x64[2], 1e-5)
    pt = F.layer_norm(xpt[0], (N,), xpt[1], xpt[2], 1e-5)
    out = gptfast.layer_norm(xtr[0], xtr[1], xtr[2], eps=1e-5, backend=backend)
    assert out.dtype == dtype and out.shape == ref.shape
    g = torch.randn(2, rows, N + 5, device=DEVICE)[..., :N].to(dtype)  # non-contiguous
    ref.backward(g.double())
    pt.backward(g)
    out.backward(g)
    grads = lambda xs: [None if t is None else t.grad for t in xs]  # noqa: E731
    assert all(a.dtype == dtype for a in grads(xtr) if a is not None)
    assert_results_match(out, ref, pt, grads(xtr), grads(x64), grads(xpt),
                         magnitudes=layer_norm_magnitudes(*x64, g, 1e-5),
                         name=f"N={N} {dtype} w={has_weight} b={has_bias}")


GRID = [
    (5, 123, torch.float32, True, True),
    (5, 768, torch.float32, True, False),
    (5, 1000, torch.float32, False, False),
    (7, 123, torch.float16, True, True),
    (7, 768, torch.float16, False, True),
    (7, 1000, torch.float16, True, True),
    (2, 9000, torch.float32, True, True),  # > one 8192 tile: chunked forward and backward
]


@pytest.mark.parametrize("rows,N,dtype,has_weight,has_bias", GRID,
                         ids=[f"N{n}-{str(d)[6:]}-w{int(w)}b{int(b)}" for _, n, d, w, b in GRID])
def test_layer_norm_triton_matches_float64(rows, N, dtype, has_weight, has_bias):
    check_layer_norm(rows, N, dtype, has_weight, has_bias)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="bf16 arithmetic is unsupported in the Triton interpreter; bf16 runs on a GPU only")
def test_layer_norm_triton_bf16():
    check_layer_norm(64, 1000, torch.bfloat16)


def test_layer_norm_triton_large_offset_is_stable():
    # mean 1e3, std 2: a one-pass E[x^2]-mean^2 would lose every digit in fp32. fp32's own
    # rounding of the mean is then ~1e-4 of the output: PyTorch's fp32 error and the |x| / std
    # in the terms' magnitude allow that, and nothing like a lost variance.
    check_layer_norm(3, 768, torch.float32, shift=1e3)


def test_layer_norm_triton_saves_fp32_stats():
    from gptfast.kernels.layer_norm import layer_norm_forward
    x = torch.randn(4, 123, device=DEVICE, dtype=torch.float16)
    y, mean, rstd = layer_norm_forward(x, None, None, 1e-5)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (4,)
    assert_close(mean, x.double().mean(-1), atol=1e-6, name="mean")
    assert_close(rstd, (x.double().var(-1, unbiased=False) + 1e-5).rsqrt(), atol=1e-4, name="rstd")


def test_layer_norm_triton_nan_propagates():
    x = torch.randn(3, 123, device=DEVICE)
    x[1, 7] = float("nan")
    y = gptfast.layer_norm(x, torch.ones(123, device=DEVICE), None, backend="triton")
    assert torch.isnan(y[1]).all() and not torch.isnan(y[[0, 2]]).any()
