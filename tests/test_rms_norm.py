"""gptfast.rms_norm on every backend that runs here: the float64 truth by DESIGN.md's rule, the
options (offset, no weight, eps=None, the fused residual add, the fp32 stream), autocast, errors
that name the argument, the eager path against the custom ops, torch.compile, opcheck,
gptfast.nn.RMSNorm as a drop-in, and gptfast.patch on RMSNorm modules.

Backends: whatever ``available_backends("rms_norm")`` lists on the CPU (the reference always; cpu
once built; triton under TRITON_INTERPRET=1). Kernel-specific cases live in the backends' files.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gptfast
from gptfast.ops import _common
from gptfast.testing import assert_close, assert_results_match, rms_norm_magnitudes

BACKENDS = gptfast.available_backends("rms_norm", device="cpu")
ops = torch.ops.gptfast


def _dtypes(backend):
    if backend == "triton":  # the interpreter has no bf16 arithmetic
        return [torch.float32, torch.float16]
    return [torch.float32, torch.bfloat16, torch.float16]


def _truth_and_pytorch(x, w, eps, offset, dy):
    """(float64 truth, PyTorch's own result in x's dtype) of y and of (dx, dw)."""
    outs = []
    for dt in (torch.float64, x.dtype):
        xx = x.detach().to(dt).requires_grad_()
        ww = None if w is None else w.detach().to(dt).requires_grad_()
        y = F.rms_norm(xx, (x.shape[-1],), None if ww is None else offset + ww, eps)
        grads = torch.autograd.grad(y, [t for t in (xx, ww) if t is not None], dy.to(dt))
        outs.append((y.detach(), grads))
    return outs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(4, 9, 64), (7, 1000), (96,), (3, 1, 5, 33)], ids=str)
@pytest.mark.parametrize("affine", ["weight", "offset", "none"])
def test_matches_the_float64_truth(backend, shape, affine, seed):
    n = shape[-1]
    for dtype in _dtypes(backend):
        x = (torch.randn(shape) * 2 + 0.5).to(dtype).requires_grad_()
        w = None if affine == "none" else (torch.randn(n) * 0.5).to(dtype).requires_grad_()
        offset = 1.0 if affine == "offset" else 0.0
        dy = torch.randn(shape).to(dtype)
        y = gptfast.rms_norm(x, w, 1e-6, offset=offset, backend=backend)
        assert y.dtype == dtype and y.shape == x.shape
        grads = torch.autograd.grad(y, [t for t in (x, w) if t is not None], dy)
        (ref, ref_g), (pt, pt_g) = _truth_and_pytorch(x, w, 1e-6, offset, dy)
        mags = rms_norm_magnitudes(x, w, dy, 1e-6, offset)
        assert_results_match(y, ref, pt, grads, ref_g, pt_g, magnitudes=[m for m in mags if m is not None],
                             name=f"{backend} {dtype} {affine}")


def test_reference_gradcheck_with_offset_and_residual():
    x, r = (torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(12, dtype=torch.float64, requires_grad=True)
    f = lambda x, r, w: gptfast.rms_norm(x, w, 1e-5, offset=1.0, residual=r, prenorm=True,  # noqa: E731
                                         backend="reference")
    assert torch.autograd.gradcheck(f, (x, r, w))
    assert torch.autograd.gradcheck(lambda x: gptfast.rms_norm(x, None, backend="reference"), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_residual_add_is_the_add_then_rms_norm(backend, seed):
    for dtype in _dtypes(backend):
        x, r = (torch.randn(6, 8, 48).to(dtype).requires_grad_() for _ in range(2))
        w = torch.randn(48).to(dtype).requires_grad_()
        dy, ds = torch.randn(6, 8, 48).to(dtype), torch.randn(6, 8, 48).to(dtype)
        y, s = gptfast.rms_norm(x, w, 1e-6, residual=r, prenorm=True, backend=backend)
        s_want = (x.detach().float() + r.detach().float()).to(dtype)
        assert torch.equal(s, s_want)  # summed in fp32, rounded once
        y_plain = gptfast.rms_norm(s_want, w.detach(), 1e-6, backend=backend)
        assert torch.equal(y, y_plain)  # normalised as rounded: the unfused op's result
        gx, gr, gw = torch.autograd.grad((y, s), (x, r, w), (dy, ds))
        assert torch.equal(gx, gr)
        sd = s_want.clone().requires_grad_()
        wd = w.detach().clone().requires_grad_()
        g_s, g_w = torch.autograd.grad(gptfast.rms_norm(sd, wd, 1e-6, backend=backend), (sd, wd), dy)
        tol = 0 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps * float((g_s.float() + ds.float()).abs().max())
        assert_close(gx.float(), g_s.float() + ds.float(), atol=tol + 1e-6, name=f"{dtype} dx + ds")
        assert torch.equal(gw, g_w)


def test_prenorm_without_residual_and_the_fp32_stream():
    x, w = torch.randn(4, 32).to(torch.bfloat16), torch.randn(32).to(torch.bfloat16)
    y, s = gptfast.rms_norm(x, w, prenorm=True)
    assert s is x and torch.equal(y, gptfast.rms_norm(x, w))
    r = torch.randn(4, 32)  # a float32 stream under 16-bit activations
    y, s = gptfast.rms_norm(x, w, residual=r, prenorm=True)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert torch.equal(s, x.float() + r)
    y2, s2 = gptfast.rms_norm(x, w, residual=r.bfloat16(), prenorm=True, residual_in_fp32=True)
    assert s2.dtype == torch.float32 and y2.dtype == torch.bfloat16


def test_eps_none_is_the_dtypes_machine_epsilon_like_nn_rmsnorm():
    x = torch.randn(3, 16) * 1e-3
    torch.testing.assert_close(gptfast.rms_norm(x, None, None), F.rms_norm(x, (16,), None, None))
    assert not torch.allclose(gptfast.rms_norm(x, None, None), gptfast.rms_norm(x, None, 1e-2))


def test_autocast_runs_in_float32():
    x, w = torch.randn(4, 32), torch.randn(32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gptfast.rms_norm(x.bfloat16(), w)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.rms_norm(x.bfloat16().float(), (32,), w, 1e-6))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(x=torch.randn(4, 8, dtype=torch.float64).long()), TypeError, "x has dtype torch.int64"),
    (dict(weight=torch.randn(7)), ValueError, r"weight must have shape \(8,\)"),
    (dict(weight=torch.randn(8, dtype=torch.float64)), TypeError, "weight has dtype torch.float64"),
    (dict(eps=-1.0), ValueError, "eps must be a non-negative number"),
    (dict(offset=float("inf")), ValueError, "offset must be a finite number"),
    (dict(offset=True), ValueError, "offset must be a finite number"),
    (dict(residual=torch.randn(4, 9)), ValueError, r"residual must have shape \(4, 8\)"),
    (dict(residual=torch.randn(4, 8).half()), TypeError, "residual has dtype torch.float16"),
    (dict(x=torch.randn(4, 0)), ValueError, "x.shape\\[-1\\] must be > 0"),
])
def test_bad_inputs_name_the_argument(kwargs, error, match):
    args = dict(x=torch.randn(4, 8), weight=torch.randn(8), eps=1e-6, offset=0.0, residual=None)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        gptfast.rms_norm(args["x"], args["weight"], args["eps"], offset=args["offset"], residual=args["residual"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_path_and_custom_op_agree_bit_for_bit(backend, monkeypatch):
    x, r = (torch.randn(5, 40, requires_grad=True) for _ in range(2))
    w = torch.randn(40, requires_grad=True)
    dy, ds = torch.randn(5, 40), torch.randn(5, 40)

    def run():
        y1 = gptfast.rms_norm(x, w, offset=1.0, backend=backend)
        y2, s = gptfast.rms_norm(x, w, residual=r, prenorm=True, backend=backend)
        return (y1, y2, s, *torch.autograd.grad((y1, y2, s), (x, r, w), (dy, dy, ds)))

    eager = run()
    monkeypatch.setattr(_common, "EAGER_FUNCTIONS", False)
    for a, b in zip(eager, run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, r, w = torch.randn(6, 24, requires_grad=True), torch.randn(6, 24, requires_grad=True), torch.randn(24, requires_grad=True)
    y, rstd = ops.rms_norm_fwd(x, w, 1e-6, 0.0, backend)
    yr, rstd_r, s = ops.rms_norm_residual_fwd(x, r, w, 1e-6, 1.0, backend)
    d = lambda t: torch.randn_like(t).detach()  # noqa: E731
    for op, args in [(ops.rms_norm_fwd, (x, w, 1e-6, 0.0, backend)), (ops.rms_norm_fwd, (x, None, 1e-6, 0.0, backend)),
                     (ops.rms_norm_residual_fwd, (x, r, w, 1e-6, 1.0, backend)),
                     (ops.rms_norm_bwd, (d(y), x.detach(), w.detach(), rstd.detach(), 0.0, None, backend)),
                     (ops.rms_norm_bwd, (d(yr), s.detach(), w.detach(), rstd_r.detach(), 1.0, d(s), backend))]:
        torch.library.opcheck(op, args)


def test_compiles_fullgraph_and_matches_eager():
    torch._dynamo.reset()
    x, r = (torch.randn(2, 6, 32, requires_grad=True) for _ in range(2))
    w = torch.randn(32, requires_grad=True)

    def f(x, r, w):
        y, s = gptfast.rms_norm(x, w, residual=r, prenorm=True)
        return (gptfast.rms_norm(y, w, offset=1.0) * s).sum()

    want = f(x, r, w)
    g_want = torch.autograd.grad(want, (x, r, w))
    got = torch.compile(f, fullgraph=True)(x, r, w)
    g_got = torch.autograd.grad(got, (x, r, w))
    assert_close(got, want, atol=1e-4, name="loss")
    for a, b in zip(g_got, g_want):
        assert_close(a, b, atol=1e-4, name="grad")


def test_nn_rmsnorm_is_a_drop_in_for_torch_rmsnorm():
    ours, theirs = gptfast.nn.RMSNorm(24, eps=1e-5), nn.RMSNorm(24, eps=1e-5)
    with torch.no_grad():
        theirs.weight.normal_()
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, nn.RMSNorm) and list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(3, 5, 24, requires_grad=True)
    torch.testing.assert_close(ours(x), theirs(x))
    g = torch.autograd.grad(ours(x).sum(), (x, ours.weight))
    g_t = torch.autograd.grad(theirs(x).sum(), (x, theirs.weight))
    for a, b in zip(g, g_t):
        torch.testing.assert_close(a, b)
    gemma = gptfast.nn.RMSNorm(24, eps=1e-6, offset=1.0)
    nn.init.zeros_(gemma.weight)  # an identity scale: offset + 0
    torch.testing.assert_close(gemma(x), F.rms_norm(x, (24,), None, 1e-6))
    assert "offset=1" in repr(gemma)
    y, s = ours(x, residual=x, prenorm=True)
    torch.testing.assert_close(s, 2 * x)
    with pytest.raises(ValueError, match="normalises the last dimension only"):
        gptfast.nn.RMSNorm((4, 24))


class GemmaStyleNorm(nn.Module):  # weight stored as scale - 1, computed in fp32 (Gemma's structure)
    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.randn(c) * 0.1)

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class BiasedRMSNorm(nn.Module):  # an RMSNorm with a bias: no gptfast op computes it
    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c))
        self.bias = nn.Parameter(torch.randn(c))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight + self.bias


def test_patch_finds_rmsnorms_by_their_check_run():
    model = nn.Sequential(nn.RMSNorm(16), GemmaStyleNorm(16), BiasedRMSNorm(16), nn.LayerNorm(16))
    plain = copy.deepcopy(model)
    report = gptfast.patch(model, backend="reference")
    got = {e.path: (e.kind, e.action, e.reason) for e in report.entries}
    assert got["0"][:2] == ("rms_norm", "patched")
    assert got["1"] == ("rms_norm", "patched", "GemmaStyleNorm: checked to compute RMSNorm (eps=1e-06, offset 1)")
    assert got["2"][:2] == ("rms_norm", "skipped") and "with a bias" in got["2"][2]
    assert got["3"][:2] == ("layer_norm", "patched")
    x = torch.randn(2, 3, 16, requires_grad=True)
    torch.testing.assert_close(model(x), plain(x))
    torch.testing.assert_close(torch.autograd.grad(model(x).sum(), x)[0], torch.autograd.grad(plain(x).sum(), x)[0])
    only = gptfast.patch(copy.deepcopy(plain), ops=("layer_norm",))
    assert {e.path: e.reason for e in only.skipped}["0"] == "'rms_norm' not in ops"
    assert gptfast.unpatch(model) == 3
    assert "_gptfast_patch" not in model[0].__dict__


def test_patch_keeps_the_modules_result_dtype():
    # HF's Llama RMSNorm returns weight * x.to(input dtype): a bf16 input on fp32 weights gives fp32
    norm = nn.RMSNorm(16, eps=1e-6)
    gptfast.patch(norm, backend="reference")
    x = torch.randn(2, 16).bfloat16()
    assert norm(x).dtype == torch.float32
