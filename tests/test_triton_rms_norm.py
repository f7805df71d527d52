"""Triton RMSNorm (kernels/rms_norm.py): its launchers and ``gptfast.rms_norm(..., backend="triton")``.

Interpreter-sized (TRITON_INTERPRET=1 on CPU): hidden sizes {123, 768, 1000} (not powers of two)
and one row wider than the kernel's single tile (the chunked path), weight present or absent,
offset 0 (Llama) and 1 (Gemma), fp16 and fp32 (bf16 on a GPU only: tests/gpu/test_triton_gpu.py
runs these checks there), leading dimensions, several rows per backward program. Ground truth: float64; within 2x/3x
PyTorch's own error in the dtype plus the rounding of the summed terms (gptfast.testing's rule).

The fused residual add (``residual=`` / ``dresidual=`` of the launchers) is checked against the
reference launchers on the summed input, with bitwise checks of the single roundings.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import gptfast  # noqa: E402
from gptfast.testing import (assert_close, assert_matches_reference, assert_results_match,  # noqa: E402
                             rms_norm_magnitudes, rounding_atol)
from test_triton_layer_norm import _bits_equal  # noqa: E402  (the bits of one rounding, -0.0 apart from 0.0)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------
# The public op against float64 and PyTorch's F.rms_norm in the dtype
# ---------------------------------------------------------------------------------------------
def check_rms_norm(rows, N, dtype, has_weight=True, offset=0.0, eps=1e-6, backend="triton"):
    torch.manual_seed(N + rows)
    # (2, rows, N) viewed through a transpose of a (rows, 2, N) buffer: not contiguous
    xbuf = torch.randn(rows, 2, N, device=DEVICE) * 2.0 + 0.5
    w = torch.randn(N, device=DEVICE) * 0.5 if has_weight else None

    def leaves(dt):
        x = xbuf.to(dt, copy=True).transpose(0, 1).requires_grad_()
        return [x, None if w is None else w.to(dt, copy=True).requires_grad_()]

    x64, xpt, xtr = leaves(torch.float64), leaves(dtype), leaves(dtype)
    assert not xtr[0].is_contiguous()
    ref = gptfast.rms_norm_ref(x64[0], x64[1], eps, offset)
    # PyTorch's own result in the dtype: F.rms_norm with the scale (offset + w) formed in the dtype
    pt = F.rms_norm(xpt[0], (N,), None if xpt[1] is None else offset + xpt[1], eps)
    out = gptfast.rms_norm(xtr[0], xtr[1], eps, offset=offset, backend=backend)
    assert out.dtype == dtype and out.shape == ref.shape
    g = torch.randn(2, rows, N + 5, device=DEVICE)[..., :N].to(dtype)  # non-contiguous
    ref.backward(g.double())
    pt.backward(g)
    out.backward(g)
    grads = lambda xs: [None if t is None else t.grad for t in xs]  # noqa: E731
    assert all(a.dtype == dtype for a in grads(xtr) if a is not None)
    assert_results_match(out, ref, pt, grads(xtr), grads(x64), grads(xpt),
                         magnitudes=rms_norm_magnitudes(x64[0], x64[1], g, eps, offset),
                         name=f"N={N} {dtype} w={has_weight} offset={offset}")


GRID = [
    (5, 123, torch.float32, True, 0.0),
    (5, 768, torch.float32, True, 1.0),
    (5, 1000, torch.float32, False, 0.0),
    (7, 123, torch.float16, True, 1.0),
    (7, 768, torch.float16, False, 0.0),
    (7, 1000, torch.float16, True, 0.0),
]


@pytest.mark.parametrize("rows,N,dtype,has_weight,offset", GRID,
                         ids=[f"N{n}-{str(d)[6:]}-w{int(w)}-off{o:g}" for _, n, d, w, o in GRID])
def test_rms_norm_triton_matches_float64(rows, N, dtype, has_weight, offset):
    check_rms_norm(rows, N, dtype, has_weight, offset)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("residual_dtype", ["same", "float32"])
def test_rms_norm_triton_op_matches_reference_backend(dtype, residual_dtype):
    # The public op, prenorm with a residual (the Gemma offset) and without: forward and every
    # gradient of backend="triton" against backend="reference", both fp32 inside and rounded once.
    torch.manual_seed(3)
    N = 200
    x0 = torch.randn(2, 3, N, device=DEVICE).to(dtype)
    r0 = torch.randn(2, 3, N, device=DEVICE).to(dtype if residual_dtype == "same" else torch.float32)
    w0 = torch.randn(N, device=DEVICE).to(dtype)
    gy = torch.randn(2, 3, N, device=DEVICE).to(dtype)
    results = {}
    for backend in ("reference", "triton"):
        x, r, w = (t.clone().requires_grad_() for t in (x0, r0, w0))
        y, s = gptfast.rms_norm(x, w, 1e-5, offset=1.0, residual=r, prenorm=True, backend=backend)
        y2 = gptfast.rms_norm(s, w.to(s.dtype), 1e-5, backend=backend)  # the next block's norm of the stream
        ((y * gy).sum() + (y2 * gy.to(y2.dtype)).sum()).backward()
        results[backend] = (y, s, y2, x.grad, r.grad, w.grad)
    names = ("y", "s", "y2", "dx", "dresidual", "dweight")
    for name, got, want in zip(names, results["triton"], results["reference"]):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if name == "s":
            assert _bits_equal(got, want), "s is not x + residual rounded once"
            continue
        # both compute the same fp32 function, summing rows of N terms in other orders (a few
        # eps_fp32 * sqrt(N) of the largest value), and round it once: one unit in the last place
        big = float(want.detach().abs().max())
        atol = torch.finfo(got.dtype).eps * big + rounding_atol(math.sqrt(N) * big, torch.float32)
        assert_close(got, want, atol=atol, name=name)


def test_rms_norm_triton_stats_and_leading_dims():
    from gptfast.kernels.rms_norm import rms_norm_backward, rms_norm_forward
    x = torch.randn(2, 3, 5, 123, device=DEVICE, dtype=torch.float16)  # 30 rows
    y, rstd = rms_norm_forward(x, None, 1e-6, 0.0)
    assert y.shape == x.shape and y.is_contiguous() and y.dtype == x.dtype
    assert rstd.dtype == torch.float32 and rstd.shape == (30,)
    assert_close(rstd, (x.double().pow(2).mean(-1).reshape(-1) + 1e-6).rsqrt(), atol=1e-5, rtol=1e-6, name="rstd")
    dx, dw = rms_norm_backward(torch.randn_like(x), x, None, rstd, 0.0)
    assert dw is None and dx.shape == x.shape and dx.dtype == x.dtype
    # one row: x (N,)
    x1 = torch.randn(123, device=DEVICE)
    y1, rstd1 = rms_norm_forward(x1, torch.ones(123, device=DEVICE), 1e-6, 0.0)
    assert y1.shape == (123,) and rstd1.shape == (1,)
    assert_close(y1, x1 / x1.pow(2).mean().add(1e-6).sqrt(), atol=1e-6, rtol=1e-6, name="y (N,)")


def test_rms_norm_triton_nan_propagates():
    from gptfast.kernels.rms_norm import rms_norm_forward
    x = torch.randn(3, 123, device=DEVICE)
    r = torch.randn(3, 123, device=DEVICE)
    r[1, 7] = float("nan")
    y, rstd, s = rms_norm_forward(x, torch.ones(123, device=DEVICE), 1e-6, 0.0, residual=r)
    assert torch.isnan(s[1, 7]) and torch.isnan(s).sum() == 1
    assert torch.isnan(y[1]).all() and not torch.isnan(y[[0, 2]]).any()
    assert torch.isnan(rstd[1]) and not torch.isnan(rstd[[0, 2]]).any()


# ---------------------------------------------------------------------------------------------
# Launchers against the reference launchers (the contract in gptfast/ops/_backend.py), with and
# without the fused residual add
# ---------------------------------------------------------------------------------------------
def check_rms_norm_launchers(M, N, dtype, has_weight=True, offset=0.0, residual=True, eps=1e-6, lead=(),
                             launchers=None):
    """Forward (with ``residual=`` when ``residual``) and backward (with ``dresidual=``) against
    the reference launchers, on x of shape (*lead, M, N).

    s must be bitwise (x + r) rounded once; y within 2x PyTorch's error (the reference launcher in
    the dtype) of the float64 reference launcher on that rounded s, rstd close to float64's; dx
    within 3x of float64 dx + ds, dweight likewise. In the interpreter (CPU) also bitwise: y/rstd
    equal the unfused kernel's on s (s is rounded before it is normalised), and dx equals the
    fp32 backward plus ds rounded once (ds is added before the rounding, not after). On a GPU the
    compiler may lay the fused and unfused tiles out differently, so those two are not asserted.
    ``launchers``: a module with another backend's rms_norm_forward/backward (default: the Triton
    kernels'), e.g. gptfast.ops._cuda on a GPU.
    """
    if launchers is None:
        from gptfast.kernels import rms_norm as launchers
    rms_norm_forward, rms_norm_backward = launchers.rms_norm_forward, launchers.rms_norm_backward
    from gptfast.ops.rms_norm import rms_norm_backward_reference, rms_norm_forward_reference

    torch.manual_seed(1000 * M + N)
    shape = (*lead, M, N)
    x = (torch.randn(shape, device=DEVICE) * 2.0).to(dtype)
    r = torch.randn(shape, device=DEVICE).to(dtype) if residual else None
    w = (torch.randn(N, device=DEVICE) * 0.5).to(dtype) if has_weight else None
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    ds = torch.randn(shape, device=DEVICE).to(dtype) if residual else None
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    name = f"M={M} N={N} {dtype} w={has_weight} offset={offset} res={residual}"
    rows = math.prod(shape[:-1])

    out = rms_norm_forward(x, w, eps, offset, **({"residual": r} if residual else {}))
    assert len(out) == (3 if residual else 2)
    y, rstd = out[:2]
    if residual:
        s = out[2]
        assert s.dtype == dtype and s.shape == shape and s.is_contiguous()
        assert _bits_equal(s, (x.double() + r.double()).to(dtype)), f"{name}: s is not x + r rounded once"
    else:
        s = x
    assert y.dtype == dtype and y.shape == shape and y.is_contiguous()
    assert rstd.dtype == torch.float32 and rstd.shape == (rows,)

    ref = rms_norm_forward_reference(s.double(), f64(w), eps, offset)
    pt = rms_norm_forward_reference(s, w, eps, offset)
    mags = rms_norm_magnitudes(s, w, dy, eps, offset)
    assert_results_match(y, ref[0], pt[0], magnitudes=mags, name=f"{name} y")
    # rstd from a sum of N squares (no cancellation): relatively a few eps_fp32 * sqrt(N) off
    assert_close(rstd, ref[1], atol=0.0, rtol=rounding_atol(math.sqrt(N), torch.float32), name=f"{name} rstd")

    dx, dw = rms_norm_backward(dy, s, w, rstd, offset, **({"dresidual": ds} if residual else {}))
    assert dx.dtype == dtype and dx.shape == shape and dx.is_contiguous()
    ref_b = rms_norm_backward_reference(dy.double(), s.double(), f64(w), ref[1], offset)
    pt_b = rms_norm_backward_reference(dy, s, w, rstd, offset)
    dres = 0.0 if ds is None else ds.double()
    assert_matches_reference(dx, ref_b[0] + dres, pt_b[0] + (0.0 if ds is None else ds), factor=3,
                             magnitude=mags[1] + (0.0 if ds is None else float(ds.abs().max())), name=f"{name} dx")
    if w is None:
        assert dw is None
    else:
        assert dw.dtype == w.dtype and dw.shape == (N,)
        assert_matches_reference(dw, ref_b[1], pt_b[1], factor=3, magnitude=mags[2], name=f"{name} dweight")

    if DEVICE != "cpu" or not residual:
        return
    y0, rstd0 = rms_norm_forward(s, w, eps, offset)
    assert _bits_equal(y, y0) and _bits_equal(rstd, rstd0), \
        f"{name}: fused forward differs from the unfused kernel on s"
    if dtype == torch.float32:
        dx0, dw0 = rms_norm_backward(dy, s, w, rstd, offset)  # no dresidual: unfused
        assert _bits_equal(dx, dx0 + ds), f"{name}: dx != unfused dx + ds"
        assert (dw is None and dw0 is None) or _bits_equal(dw, dw0), f"{name}: ds changed dweight"
    else:
        # the kernel on fp32 copies does the same fp32 arithmetic (it converts on load) and rounds
        # nothing before dx + ds is formed here
        up = lambda t: None if t is None else t.float()  # noqa: E731
        dx32 = rms_norm_backward(dy.float(), s.float(), up(w), rstd, offset)[0]
        assert _bits_equal(dx, (dx32 + ds.float()).to(dtype)), f"{name}: dx + ds is not rounded once"


LAUNCHER_GRID = [
    # M, N, dtype, weight, offset, residual, leading dims, eps
    (1, 123, torch.float32, True, 0.0, True, (), 1e-6),  # one row
    (7, 123, torch.float16, True, 1.0, True, (), 1e-6),  # odd rows: 2 per backward program (4 programs), the last 1
    (5, 1000, torch.float16, False, 0.0, True, (), 1e-6),
    (9, 768, torch.float32, True, 1.0, False, (), 0.5),  # 3 rows per program, the 4th none; an eps that shows
    (5, 200, torch.float16, True, 0.0, False, (3,), 1e-6),  # leading dims: 15 rows, 4 per program
    (3, 200, torch.float32, False, 1.0, True, (2,), 1e-6),  # offset without weight: unused
    # > one 8192 tile: the chunked forward and backward; 2 rows per program add into the dW
    # partial rows in memory
    (5, 9000, torch.float16, True, 1.0, True, (), 1e-6),
    (2, 9000, torch.float32, False, 0.0, False, (), 0.5),
]


@pytest.mark.parametrize("M,N,dtype,has_weight,offset,residual,lead,eps", LAUNCHER_GRID,
                         ids=[f"M{m}-N{n}-{str(d)[6:]}-w{int(w)}-off{o:g}-res{int(r)}-lead{len(ld)}-eps{e:g}"
                              for m, n, d, w, o, r, ld, e in LAUNCHER_GRID])
def test_rms_norm_triton_launchers(M, N, dtype, has_weight, offset, residual, lead, eps):
    check_rms_norm_launchers(M, N, dtype, has_weight, offset, residual, eps=eps, lead=lead)


def test_rms_norm_triton_launchers_fp32_tight():
    # fp32 against the fp32 reference launchers: the same arithmetic up to the order of the sums
    from gptfast.kernels.rms_norm import rms_norm_backward, rms_norm_forward
    from gptfast.ops.rms_norm import rms_norm_backward_reference, rms_norm_forward_reference
    torch.manual_seed(5)
    x, r, dy, ds = (torch.randn(6, 777, device=DEVICE) for _ in range(4))
    w = torch.randn(777, device=DEVICE)
    got = rms_norm_forward(x, w, 1e-6, 1.0, residual=r)
    want = rms_norm_forward_reference(x, w, 1e-6, 1.0, residual=r)
    for name, a, b in zip(("y", "rstd", "s"), got, want):
        assert_close(a, b, atol=1e-5, rtol=1e-5, name=name)
    got_b = rms_norm_backward(dy, got[2], w, got[1], 1.0, dresidual=ds)
    want_b = rms_norm_backward_reference(dy, want[2], w, want[1], 1.0, dresidual=ds)
    for name, a, b in zip(("dx", "dweight"), got_b, want_b):
        assert_close(a, b, atol=1e-4, rtol=1e-5, name=name)
