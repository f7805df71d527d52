"""The native ``cpu`` backend's RMSNorm (csrc/cpu/layer_norm.cpp's RMSNorm section) beyond
tests/test_rms_norm.py's shared grid.

- the launchers against the reference launchers and the float64 truth at row lengths around the
  vector width (1, 15, 16, 17, 33, 1000, 4099) and row counts that split over threads, every dtype
  the kernels take, with and without a weight, Gemma's offset;
- the fused residual add: s bitwise the once-rounded sum, y bitwise the plain kernel's y of s, dx
  with dresidual the plain dx plus dresidual rounded once;
- rstd and dweight in fp32 (fp64 for fp64), dweight summed over per-thread partials: one and two
  threads agree;
- bad input to the extension itself raises an exception naming the argument.
"""
from __future__ import annotations

import pytest
import torch

import gptfast
from gptfast.ops.rms_norm import rms_norm_backward_reference, rms_norm_forward_reference, rms_norm_ref
from gptfast.testing import assert_close, assert_results_match, rms_norm_magnitudes

if "cpu" not in gptfast.available_backends("rms_norm", device="cpu"):
    from gptfast import _build
    pytest.skip(f"cpu rms_norm unavailable: {_build.unavailable_reason()}", allow_module_level=True)

from gptfast.ops import _cpu  # noqa: E402  (builds / loads the extension)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _inputs(m, n, dtype, weight=True):
    x = (torch.randn(m, n) * 3 + 0.7).to(dtype)
    w = (torch.randn(n) * 0.5).to(dtype) if weight else None
    return x, w, torch.randn(m, n).to(dtype)


def _truth(x, w, dy, eps, offset):
    """float64 (y, dx, dw) and PyTorch's own in x's dtype: autograd through gptfast's rms_norm_ref."""
    outs = []
    for dt in (torch.float64, x.dtype):
        xx = x.to(dt).requires_grad_()
        ww = None if w is None else w.to(dt).requires_grad_()
        y = rms_norm_ref(xx, ww, eps, offset, upcast=False)
        grads = torch.autograd.grad(y, [t for t in (xx, ww) if t is not None], dy.to(dt))
        outs.append((y.detach(), grads))
    return outs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m, n", [(3, 1), (5, 15), (64, 16), (2, 17), (300, 33), (9, 1000), (4, 4099)])
@pytest.mark.parametrize("affine", ["weight", "offset", "none"])
def test_launchers_match_the_truth_and_the_reference(dtype, m, n, affine, seed):
    offset = 1.0 if affine == "offset" else 0.0
    x, w, dy = _inputs(m, n, dtype, weight=affine != "none")
    y, rstd = _cpu.rms_norm_forward(x, w, 1e-6, offset)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert y.dtype == dtype and y.shape == x.shape and rstd.dtype == acc and rstd.shape == (m,)
    y_ref, rstd_ref = rms_norm_forward_reference(x, w, 1e-6, offset)
    assert_close(rstd, rstd_ref, rtol=1e-6 if acc == torch.float32 else 1e-13, atol=0, name="rstd")
    dx, dw = _cpu.rms_norm_backward(dy, x, w, rstd, offset)
    assert (dw is None) == (w is None)
    (t_y, t_g), (pt_y, pt_g) = _truth(x, w, dy, 1e-6, offset)
    mags = rms_norm_magnitudes(x, w, dy, 1e-6, offset)
    assert_results_match(y, t_y, pt_y, [g for g in (dx, dw) if g is not None], t_g, pt_g,
                         magnitudes=[v for v in mags if v is not None], name=f"{dtype} {m}x{n} {affine}")
    dx_ref, dw_ref = rms_norm_backward_reference(dy, x, w, rstd_ref, offset)
    if dtype in (torch.float32, torch.float64):  # same formula, summation order aside
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        assert_close(y, y_ref, atol=tol * mags[0], name="y vs reference")
        assert_close(dx, dx_ref, atol=tol * mags[1], name="dx vs reference")


def test_leading_dimensions_and_empty_weight_gradient(seed):
    x, w, dy = _inputs(24, 40, torch.float32)
    x3, dy3 = x.view(2, 3, 4, 40), dy.view(2, 3, 4, 40)
    y3, rstd3 = _cpu.rms_norm_forward(x3, w, 1e-5, 0.0)
    y, rstd = _cpu.rms_norm_forward(x, w, 1e-5, 0.0)
    assert y3.shape == x3.shape and torch.equal(y3.view(24, 40), y) and torch.equal(rstd3, rstd)
    dx3, dw3 = _cpu.rms_norm_backward(dy3, x3, w, rstd3, 0.0)
    dx, dw = _cpu.rms_norm_backward(dy, x, w, rstd, 0.0)
    assert dx3.shape == x3.shape and torch.equal(dx3.view(24, 40), dx) and torch.equal(dw3, dw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [16, 77])
def test_fused_residual_add(dtype, n, seed):
    x, w, dy = _inputs(130, n, dtype)
    r, dres = torch.randn(130, n).to(dtype), torch.randn(130, n).to(dtype)
    y, rstd, s = _cpu.rms_norm_forward(x, w, 1e-6, 1.0, residual=r)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert torch.equal(s, (x.to(acc) + r.to(acc)).to(dtype))  # summed wide, rounded once
    y_s, rstd_s = _cpu.rms_norm_forward(s, w, 1e-6, 1.0)
    assert torch.equal(y, y_s) and torch.equal(rstd, rstd_s)  # normalised as rounded
    dx0, dw0 = _cpu.rms_norm_backward(dy, s, w, rstd, 1.0)
    dx1, dw1 = _cpu.rms_norm_backward(dy, s, w, rstd, 1.0, dresidual=dres)
    assert torch.equal(dw0, dw1)
    # dx1 is the wide dx plus dresidual, rounded once (fp32/fp64: possibly one FMA, so not
    # bitwise dx0 + dres): within a rounding of each of the two
    want = dx0.to(acc) + dres.to(acc)
    ulp = torch.finfo(dtype).eps
    assert_close(dx1.to(acc), want, atol=float(want.abs().max()) * ulp + float(dx0.abs().max()) * ulp,
                 name="dx + dresidual")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_and_two_threads_agree(dtype, seed):
    x, w, dy = _inputs(512, 96, dtype)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y, rstd = _cpu.rms_norm_forward(x, w, 1e-6, 0.0)
            results.append((y, rstd, *_cpu.rms_norm_backward(dy, x, w, rstd, 0.0)))
    finally:
        torch.set_num_threads(before)
    (y1, r1, dx1, dw1), (y2, r2, dx2, dw2) = results
    # rows are independent: bitwise; dweight's per-thread partials may add in another order
    assert torch.equal(y1, y2) and torch.equal(r1, r2) and torch.equal(dx1, dx2)
    ulp = 1e-6 if dtype == torch.float32 else 2 ** -7
    assert_close(dw1.float(), dw2.float(), atol=ulp * float(dw1.float().abs().max()) * 2, name="dweight")


def test_bad_input_raises_named_errors_from_cpp():
    x, w, _ = _inputs(4, 8, torch.float32)
    y, rstd = _cpu.rms_norm_forward(x, w, 1e-6, 0.0)
    cases = [
        (lambda: _cpu.rms_norm_forward(x, w.double(), 1e-6, 0.0), TypeError, "weight has dtype"),
        (lambda: _cpu.rms_norm_forward(x, torch.randn(9), 1e-6, 0.0), ValueError, r"weight must have shape \(8,\)"),
        (lambda: _cpu.rms_norm_forward(x.t(), None, 1e-6, 0.0), ValueError, "contiguous"),
        (lambda: _cpu.rms_norm_forward(x, w, -1.0, 0.0), ValueError, "eps must be non-negative"),
        (lambda: _cpu.rms_norm_forward(x, w, 1e-6, 0.0, residual=torch.randn(4, 9)), ValueError,
         "residual must have x's shape"),
        (lambda: _cpu.rms_norm_forward(x.long(), None, 1e-6, 0.0), TypeError, "gptfast.rms_norm: x has unsupported dtype"),
        (lambda: _cpu.rms_norm_backward(x, x, w, rstd[:3], 0.0), ValueError, "rstd"),
        (lambda: _cpu.rms_norm_backward(x[:, :7].contiguous(), x, w, rstd, 0.0), ValueError, "dy must have x's shape"),
        (lambda: _cpu.rms_norm_backward(x, x, w, rstd, 0.0, dresidual=x.half()), TypeError, "dresidual has dtype"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
    with pytest.raises(ValueError, match="gptfast.rms_norm: x must be"):
        _cpu.rms_norm_forward(torch.randn(4, 0), None, 1e-6, 0.0)
