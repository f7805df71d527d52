"""Triton LayerNorm (kernels/layer_norm.py) through ``gptfast.layer_norm(..., backend="triton")``.

Interpreter-sized (TRITON_INTERPRET=1 on CPU): hidden sizes {123, 768, 1000} (plus one row wider
than the kernel's single tile, which takes the chunked path), weight/bias present or absent,
fp16 and fp32, non-contiguous 3-D input and upstream gradient. Ground truth: F.layer_norm in
float64; within 2x/3x PyTorch's own error in the dtype plus the rounding of the summed terms
(gptfast.testing's rule; fp32 too).

The fused residual add (``residual=`` / ``dresidual=`` of the launchers) is checked against the
reference launchers on the summed input, with bitwise checks of the single roundings.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import gptfast  # noqa: E402
from gptfast.testing import (assert_close, assert_matches_reference, assert_results_match,  # noqa: E402
                             layer_norm_magnitudes)

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


# ---------------------------------------------------------------------------------------------
# Fused residual add, at the launcher level (the contract in gptfast/ops/_backend.py)
# ---------------------------------------------------------------------------------------------
def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    # torch.equal calls -0.0 == 0.0; the contract is one rounding, so compare the bits
    assert a.dtype == b.dtype and a.shape == b.shape
    view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    return torch.equal(a.view(view), b.view(view))


def check_layer_norm_residual(M, N, dtype, has_weight=True, has_bias=True, offset=0.0, eps=1e-5):
    """Forward with ``residual=`` and backward with ``dresidual=`` against the reference launchers.

    s must be bitwise (x + r) rounded once; y within 2x PyTorch's error of the float64 LayerNorm of
    that rounded s, mean/rstd as the stats test above allows; dx within 3x of float64 dx + ds,
    dweight/dbias as without a residual. In the interpreter (CPU) also bitwise: y/mean/rstd equal
    the unfused kernel's on s (so s is rounded before it is normalised), and dx equals the fp32
    LN-backward plus ds rounded once (so ds is added before the rounding, not after). On a GPU the
    compiler may lay the fused and unfused tiles out differently, so those two are not asserted.
    """
    from gptfast.kernels.layer_norm import layer_norm_backward, layer_norm_forward
    from gptfast.ops.layer_norm import layer_norm_backward_reference, layer_norm_forward_reference

    torch.manual_seed(1000 * M + N)
    x = (torch.randn(M, N, device=DEVICE) * 2.0 + offset).to(dtype)
    r = (torch.randn(M, N, device=DEVICE) + offset).to(dtype)
    w = torch.randn(N, device=DEVICE).to(dtype) if has_weight else None
    b = torch.randn(N, device=DEVICE).to(dtype) if has_bias else None
    dy = torch.randn(M, N, device=DEVICE).to(dtype)
    ds = torch.randn(M, N, device=DEVICE).to(dtype)
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    name = f"M={M} N={N} {dtype} w={has_weight} b={has_bias}"

    y, mean, rstd, s = layer_norm_forward(x, w, b, eps, residual=r)
    assert s.dtype == y.dtype == dtype and s.shape == y.shape == (M, N) and s.is_contiguous()
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (M,)
    s_ref = (x.double() + r.double()).to(dtype)
    assert _bits_equal(s, s_ref), f"{name}: s is not x + r rounded once"

    ref = layer_norm_forward_reference(s.double(), f64(w), f64(b), eps)
    pt = layer_norm_forward_reference(s, w, b, eps)
    mags = layer_norm_magnitudes(s.double(), f64(w), f64(b), dy.double(), eps)
    assert_results_match(y, ref[0], pt[0], magnitudes=mags, name=f"{name} y")
    if offset == 0.0:
        assert_close(mean, ref[1], atol=1e-6, name=f"{name} mean")
        assert_close(rstd, ref[2], atol=1e-4, name=f"{name} rstd")

    dx, dw, db = layer_norm_backward(dy, s, w, mean, rstd, has_bias, dresidual=ds)
    assert dx.dtype == dtype and dx.shape == (M, N)
    ref_b = layer_norm_backward_reference(dy.double(), s.double(), f64(w), ref[1], ref[2], has_bias)
    pt_b = layer_norm_backward_reference(dy, s, w, mean, rstd, has_bias)
    assert_matches_reference(dx, ref_b[0] + ds.double(), pt_b[0] + ds, factor=3,
                             magnitude=mags[1] + float(ds.abs().max()), name=f"{name} dx")
    for i, (got, want, ptg) in enumerate(zip((dw, db), ref_b[1:], pt_b[1:])):
        if want is None:
            assert got is None
            continue
        assert_matches_reference(got, want, ptg, factor=3, magnitude=mags[2 + i], name=f"{name} grad[{i}]")

    if DEVICE != "cpu":
        return
    y0, mean0, rstd0 = layer_norm_forward(s, w, b, eps)
    assert _bits_equal(y, y0) and _bits_equal(mean, mean0) and _bits_equal(rstd, rstd0), \
        f"{name}: fused forward differs from the unfused kernel on s"
    # One more backward each (the interpreter's dW/dB column sums cost ~3 s apiece at N = 9000).
    if dtype == torch.float32:
        dx0, dw0, db0 = layer_norm_backward(dy, s, w, mean, rstd, has_bias)  # no dresidual: unfused
        assert _bits_equal(dx, dx0 + ds), f"{name}: dx != unfused dx + ds"
        for got, plain in ((dw, dw0), (db, db0)):
            assert (got is None and plain is None) or _bits_equal(got, plain), f"{name}: ds changed dw/db"
    else:
        # The kernel on fp32 copies does the same fp32 arithmetic (it converts on load) and rounds
        # nothing before dx + ds is formed here; has_bias only adds dB, left out.
        up = lambda t: None if t is None else t.float()  # noqa: E731
        dx32 = layer_norm_backward(dy.float(), s.float(), up(w), mean, rstd, False)[0]
        assert _bits_equal(dx, (dx32 + ds.float()).to(dtype)), f"{name}: dx + ds is not rounded once"


RES_GRID = [
    (1, 123, torch.float32, True, True),  # one row
    (7, 123, torch.float16, True, True),  # odd rows: 2 per backward program (4 programs), the last 1
    (5, 1000, torch.float16, False, False),
    (9, 768, torch.float32, True, False),  # 3 rows per program, the 4th program has none
    (3, 200, torch.float16, False, True),
    # > one 8192 tile: chunked forward and backward. No weight/bias: the interpreter's dW/dB
    # column sums would take ~3 s each, and the affine part is the unfused kernel's (tested above).
    (2, 9000, torch.float16, False, False),
]


@pytest.mark.parametrize("M,N,dtype,has_weight,has_bias", RES_GRID,
                         ids=[f"M{m}-N{n}-{str(d)[6:]}-w{int(w)}b{int(b)}" for m, n, d, w, b in RES_GRID])
def test_layer_norm_triton_residual(M, N, dtype, has_weight, has_bias):
    check_layer_norm_residual(M, N, dtype, has_weight, has_bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_layer_norm_triton_residual_large_offset(dtype):
    # s ~ 1e3 + 2.2 * randn: the mean is taken on s - s[0], s as rounded, like the unfused kernel's
    # (the bitwise comparison with it fails when the shift is x[0] instead).
    check_layer_norm_residual(3, 768, dtype, offset=500.0)


def test_layer_norm_triton_residual_nan_propagates():
    from gptfast.kernels.layer_norm import layer_norm_forward
    x = torch.randn(3, 123, device=DEVICE)
    r = torch.randn(3, 123, device=DEVICE)
    r[1, 7] = float("nan")
    y, mean, rstd, s = layer_norm_forward(x, None, None, 1e-5, residual=r)
    assert torch.isnan(s[1, 7]) and torch.isnan(s).sum() == 1
    assert torch.isnan(y[1]).all() and not torch.isnan(y[[0, 2]]).any()
    assert torch.isnan(mean[1]) and not torch.isnan(mean[[0, 2]]).any()
