"""The native ``cpu`` backend (csrc/cpu) beyond tests/test_ops.py's shared grid.

- attention against fp64 truth and against the reference backend's launchers (out, lse, dq, dk,
  dv), bf16 and fp32, T in {1, 3, 97, 130, 257} x head dims {16, 40, 64, 128} x causal/full (axes
  varied together so the grid stays small), strided q/k/v views of one packed projection;
- one thread and two threads give the same results within tolerance;
- LayerNorm's fused residual add (s = x + r rounded once, normalised as rounded; dx + dresidual
  rounded once) against the float64 truth and the reference launchers on the unfused s, every
  dtype the kernels take, awkward N and M;
- bad input to the extension itself raises a Python exception naming the argument;
- (the tiny GPT trained on `cpu` tracking the reference loss curve is tests/test_convergence.py);
- attention at T = 4096 does not allocate anything T x T (peak RSS in a subprocess).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import gptfast
from gptfast.ops.attention import attention_backward_reference, attention_forward_reference
from gptfast.ops.layer_norm import layer_norm_backward_reference, layer_norm_forward_reference
from gptfast.testing import (assert_close, assert_matches_reference, assert_results_match, attention_magnitudes,
                             layer_norm_magnitudes, rounding_atol, sdpa_bthd)

if "cpu" not in gptfast.available_backends(device="cpu"):
    from gptfast import _build
    pytest.skip(f"cpu backend unavailable: {_build.unavailable_reason()}", allow_module_level=True)

from gptfast.ops import _cpu  # noqa: E402  (builds / loads the extension)

ext = _cpu._ext


def _packed_qkv(b, t, h, d, dtype):
    """q, k, v as strided views of one (B, T, 3, H, D) projection, as in a GPT block."""
    packed = torch.randn(b, t, 3, h, d).to(dtype)
    return packed.unbind(2)


# T and head dim vary together: every T and every head dim appears, both dtypes, both masks.
GRID = [(1, 16), (3, 40), (97, 64), (130, 128), (257, 40), (257, 128), (130, 16), (3, 128)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("seqlen,headdim", GRID)
def test_attention_against_truth_and_reference(seqlen, headdim, causal, dtype, seed):
    q, k, v = _packed_qkv(2, seqlen, 3, headdim, dtype)
    scale = headdim ** -0.5
    out, lse = _cpu.attention_forward(q, k, v, causal, scale)
    ref_out, ref_lse = attention_forward_reference(q, k, v, causal, scale)
    assert out.dtype == dtype and out.is_contiguous() and lse.dtype == torch.float32
    assert lse.shape == (2, 3, seqlen)
    # lse = max + log(sum of seqlen terms): off by the rounding of the scores' terms
    # (scale |q|.|k|) and of the sum and the log
    s_mag = scale * (q.double().abs().transpose(1, 2) @ k.double().abs().permute(0, 2, 3, 1)).max().item()
    lse_mag = seqlen ** 0.5 * (s_mag + ref_lse.abs().max().item())
    assert_close(lse, ref_lse, atol=rounding_atol(lse_mag, torch.float32), name="lse")

    dout = torch.randn(2, seqlen, 3, headdim).to(dtype)
    grads = _cpu.attention_backward(dout, q, k, v, out, lse, causal, scale)
    ref_grads = attention_backward_reference(dout, q, k, v, ref_out, ref_lse, causal, scale)

    # fp64 truth and PyTorch's own same-dtype error (SDPA) -- DESIGN.md's tolerance rule
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    leaves_pt = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    truth, pt = sdpa_bthd(*leaves64, causal), sdpa_bthd(*leaves_pt, causal)
    truth.backward(dout.double())
    pt.backward(dout)
    magnitudes = attention_magnitudes(q, k, v, dout, causal, scale)
    assert_results_match(out, truth, pt, grads, [t.grad for t in leaves64], [t.grad for t in leaves_pt],
                         magnitudes=magnitudes)
    # the reference backend's launchers, on the same inputs, by the same rule
    for name, r, t, p, m in zip("qkv", ref_grads, leaves64, leaves_pt, magnitudes[1:]):
        assert_matches_reference(r, t.grad, p.grad, magnitude=m, factor=3, name=f"d{name} (reference backend)")


def test_attention_numerics_policy(seed):
    # large logits stay finite; NaN propagates (to its row in forward)
    q, k, v = (torch.randn(1, 70, 2, 32) for _ in range(3))
    out, lse = _cpu.attention_forward(q * 100, k * 100, v, True, 32 ** -0.5)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    ref, _ = attention_forward_reference(q * 100, k * 100, v, True, 32 ** -0.5)
    assert_close(out, ref, atol=1e-4, name="large logits")
    q[0, 5, 1, 3] = float("nan")
    out, _ = _cpu.attention_forward(q, k, v, True, 32 ** -0.5)
    assert torch.isnan(out[0, 5, 1]).all()
    assert not torch.isnan(out[0, :, 0]).any(), "NaN leaked into another head"


# --------------------------------------------------------------------------- layer_norm + residual

_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
         torch.float16: torch.int16}


def _check_stats(name, got, truth, dtype):
    """fp32 statistics within 1e-5 of the float64 truth, fp64 ones within 1e-12 (relative to
    max(1, |truth|)), as the cuda emulation tests hold them."""
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), name
    err = ((got.double() - truth).abs() / truth.abs().clamp_min(1.0)).max().item()
    assert err <= rtol, f"{name}: error {err:.3g} > {rtol:g} (relative to max(1, |truth|))"


# N = 1, 17, 123, 1000: not multiples of the 16-lane fp32 / 8-lane fp64 vectors (nor of the two
# chains' 32); M = 1, odd M, and 301 rows of 768 (several parallel tasks: grain(768) = 42 rows).
LN_RESIDUAL_SHAPES = [(1, 123), (3, 17), (5, 1), (7, 768), (33, 1000), (301, 768)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("M,N", LN_RESIDUAL_SHAPES)
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "bias", "none"])
def test_layer_norm_residual_against_reference(M, N, dtype, affine, seed):
    """Forward: s must be x + r rounded once, bit for bit; y, mean, rstd those of LayerNorm of that
    s. Backward, given s and a dresidual: dx = LayerNorm's dx + dresidual. Held to the float64
    truth by DESIGN.md's rule, with the reference launchers on the unfused s (the brief's
    "PyTorch in the dtype": dx rounded, then + dresidual rounded again) as the comparison."""
    eps = 1e-5
    x = (torch.randn(M, N) * 3 + 1.5).to(dtype)  # offset mean: catches a one-pass variance
    r = (torch.randn(M, N) * 2 - 0.5).to(dtype)
    w = (1 + 0.5 * torch.randn(N)).to(dtype) if "weight" in affine else None
    b = torch.randn(N).to(dtype) if "bias" in affine else None
    dy, dres = torch.randn(M, N).to(dtype), torch.randn(M, N).to(dtype)

    out = _cpu.layer_norm_forward(x, w, b, eps, residual=r)
    assert len(out) == 4
    y, mean, rstd, s = out
    s_ref = (x.double() + r.double()).to(dtype)
    assert s.dtype == dtype and s.shape == (M, N) and s.is_contiguous()
    assert torch.equal(s.view(_BITS[dtype]), s_ref.view(_BITS[dtype])), \
        f"s is not x + r rounded once: max |s - ref| {(s.double() - s_ref.double()).abs().max().item():.3e}"

    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    y64, mean64, rstd64 = layer_norm_forward_reference(s_ref.double(), f64(w), f64(b), eps)
    y_pt, mean_pt, rstd_pt = layer_norm_forward_reference(s_ref, w, b, eps)
    mags = layer_norm_magnitudes(s_ref, w, b, dy, eps)
    assert y.dtype == dtype
    assert_matches_reference(y, y64, y_pt, magnitude=mags[0], factor=2, name="y")
    _check_stats("mean", mean, mean64, dtype)
    _check_stats("rstd", rstd, rstd64, dtype)

    dx, dw, db = _cpu.layer_norm_backward(dy, s, w, mean, rstd, b is not None, dresidual=dres)
    dx64, dw64, db64 = layer_norm_backward_reference(dy.double(), s_ref.double(), f64(w), mean64, rstd64,
                                                     b is not None)
    dx_pt, dw_pt, db_pt = layer_norm_backward_reference(dy, s_ref, w, mean_pt, rstd_pt, b is not None)
    # the final add's own rounding: one more term of |dres|
    assert_matches_reference(dx, dx64 + dres.double(), dx_pt + dres, magnitude=mags[1] + dres.abs().max().item(),
                             factor=3, name="dx")
    assert (dw is None) == (w is None) and (db is None) == (b is None)
    if w is not None:
        assert_matches_reference(dw, dw64, dw_pt, magnitude=mags[2], factor=3, name="dweight")
    if b is not None:
        assert_matches_reference(db, db64, db_pt, magnitude=mags[3], factor=3, name="dbias")


@pytest.mark.parametrize("shape", [(2, 3, 40), (40,), (1, 1, 2, 40), (0, 4, 40)], ids=str)
def test_layer_norm_launchers_take_leading_dimensions(shape):
    # (..., N) is the (M, N) of its flattened rows: the same numbers, outputs in x's shape
    g = torch.Generator().manual_seed(0)
    x, r, dy, ds = (torch.randn(shape, generator=g) for _ in range(4))
    w, b = torch.randn(40, generator=g), torch.randn(40, generator=g)
    flat = [t.reshape(-1, 40) for t in (x, r, dy, ds)]
    y, mean, rstd, s = ext.layer_norm_forward(x, w, b, 1e-5, r)
    y2, mean2, rstd2, s2 = ext.layer_norm_forward(flat[0], w, b, 1e-5, flat[1])
    assert y.shape == s.shape == x.shape and mean.shape == rstd.shape == (flat[0].shape[0],)
    for got, want in ((y, y2), (s, s2), (mean, mean2), (rstd, rstd2)):
        assert torch.equal(got.reshape(want.shape), want)
    dx, dw, db = ext.layer_norm_backward(dy, s, w, mean, rstd, True, ds)
    dx2, dw2, db2 = ext.layer_norm_backward(flat[2], s2, w, mean2, rstd2, True, flat[3])
    assert dx.shape == x.shape
    for got, want in ((dx, dx2), (dw, dw2), (db, db2)):
        assert torch.equal(got.reshape(want.shape), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_residual_leaves_the_plain_paths_alone(dtype, seed):
    """Without residual/dresidual the launchers return what they returned before (three outputs;
    dx not shifted), and the fused forward's y equals the plain forward of its own s bit for bit
    (the same row kernels run on the same rounded row)."""
    x, r, dy = (torch.randn(37, 200).to(dtype) for _ in range(3))
    w, b = torch.randn(200).to(dtype), torch.randn(200).to(dtype)
    plain = _cpu.layer_norm_forward(x, w, b, 1e-5)
    assert len(plain) == 3
    y, mean, rstd, s = _cpu.layer_norm_forward(x, w, b, 1e-5, residual=r)
    y_s, mean_s, rstd_s = _cpu.layer_norm_forward(s, w, b, 1e-5)
    assert torch.equal(y, y_s) and torch.equal(mean, mean_s) and torch.equal(rstd, rstd_s)
    dx0, dw0, db0 = _cpu.layer_norm_backward(dy, s, w, mean, rstd, True)
    dx1, dw1, db1 = _cpu.layer_norm_backward(dy, s, w, mean, rstd, True, dresidual=torch.zeros_like(dy))
    assert torch.equal(dx0, dx1) and torch.equal(dw0, dw1) and torch.equal(db0, db1)


def test_layer_norm_residual_bad_input_raises_named_errors():
    x = torch.randn(4, 10)
    stats = (torch.zeros(4), torch.ones(4))
    bad = [(ValueError, "residual must have x's shape", torch.randn(4, 9)),
           (ValueError, "residual must have x's shape", torch.randn(40)),
           (TypeError, "residual has dtype BFloat16 but x has Float", x.bfloat16()),
           (ValueError, "residual is on meta but x is on cpu", torch.empty(4, 10, device="meta")),
           (ValueError, "residual must be contiguous", torch.randn(10, 4).t())]
    for exc, msg, r in bad:
        with pytest.raises(exc, match="gptfast.layer_norm: " + msg):
            ext.layer_norm_forward(x, None, None, 1e-5, r)
        with pytest.raises(exc, match="gptfast.layer_norm: " + msg):  # through the launcher too
            _cpu.layer_norm_forward(x, None, None, 1e-5, residual=r)
        with pytest.raises(exc, match="gptfast.layer_norm: d" + msg):
            _cpu.layer_norm_backward(x, x, None, *stats, False, dresidual=r)


# --------------------------------------------------------------------------- threads

def _run_all_ops(dtype):
    torch.manual_seed(0)
    results = []
    q, k, v = (torch.randn(2, 150, 3, 64, dtype=dtype, requires_grad=True) for _ in range(3))
    out = gptfast.attention(q, k, v, causal=True, backend="cpu")
    out.backward(torch.randn_like(out))
    results += [out, q.grad, k.grad, v.grad]
    x = torch.randn(300, 768, dtype=dtype, requires_grad=True)
    w, b = (torch.randn(768, dtype=dtype, requires_grad=True) for _ in range(2))
    y = gptfast.layer_norm(x, w, b, backend="cpu")
    y.backward(torch.randn_like(y))
    results += [y, x.grad, w.grad, b.grad]
    x = torch.randn(77, 96, dtype=dtype, requires_grad=True)
    w1 = (torch.randn(384, 96, dtype=dtype) / 10).requires_grad_()
    w2 = (torch.randn(96, 384, dtype=dtype) / 20).requires_grad_()
    b1, b2 = torch.randn(384, dtype=dtype, requires_grad=True), torch.randn(96, dtype=dtype, requires_grad=True)
    z = gptfast.gelu_ffn(x, w1, b1, w2, b2, backend="cpu")
    z.backward(torch.randn_like(z))
    results += [z, x.grad, w1.grad, b1.grad, w2.grad, b2.grad]
    return [r.detach().clone() for r in results]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_and_two_threads_agree(dtype):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_all_ops(dtype)
        torch.set_num_threads(2)
        two = _run_all_ops(dtype)
    finally:
        torch.set_num_threads(before)
    # Only the order of the per-thread partial sums (dW, dB, db1) and BLAS blocking may differ.
    atol = 1e-4 if dtype == torch.float32 else 0.0
    for i, (a, b) in enumerate(zip(one, two)):
        scale = max(1.0, b.abs().max().item())
        if dtype == torch.float32:
            assert_close(a, b, atol=atol * scale, name=f"result {i}")
        else:  # one bf16 ulp of the magnitude
            assert_close(a, b, atol=scale * 2 ** -7, name=f"result {i}")


# --------------------------------------------------------------------------- bad input

def test_bad_input_raises_named_errors_from_cpp():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(TypeError, match="gptfast.attention: q has unsupported dtype"):
        ext.attention_forward(q.to(torch.int32), q, q, True, 0.25)
    with pytest.raises(TypeError, match="gptfast.attention: k has dtype BFloat16 but q has Float"):
        ext.attention_forward(q, q.bfloat16(), q, True, 0.25)
    with pytest.raises(ValueError, match="v must have k's shape"):
        ext.attention_forward(q, q, q[:, :4], True, 0.25)
    with pytest.raises(ValueError, match="head dim"):
        big = torch.randn(1, 2, 1, 300)
        ext.attention_forward(big, big, big, True, 0.25)
    with pytest.raises(ValueError, match="k must have stride 1 in its last dimension"):
        ext.attention_forward(q, q.transpose(-1, -2).contiguous().transpose(-1, -2), q, True, 0.25)
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        ext.attention_forward(q[0], q[0], q[0], True, 0.25)
    out, lse = ext.attention_forward(q, q, q, True, 0.25)
    with pytest.raises(ValueError, match="lse must have shape"):
        ext.attention_backward(out, q, q, q, out, lse[:, :1], True, 0.25)
    with pytest.raises(TypeError, match="lse must have dtype"):
        ext.attention_backward(out, q, q, q, out, lse.double(), True, 0.25)

    x = torch.randn(4, 10)
    for bad in (torch.randn(()), torch.randn(3, 0)):
        with pytest.raises(ValueError, match=r"x must be \(\.\.\., N\) with N > 0"):
            ext.layer_norm_forward(bad, None, None, 1e-5)
    with pytest.raises(ValueError, match="dy must have x's shape"):
        ext.layer_norm_backward(x[:2], x, None, torch.zeros(4), torch.ones(4), False)
    with pytest.raises(ValueError, match="gptfast.layer_norm: weight must have shape"):
        ext.layer_norm_forward(x, torch.ones(9), None, 1e-5)
    with pytest.raises(ValueError, match="x must be contiguous"):
        ext.layer_norm_forward(x.t(), None, None, 1e-5)
    with pytest.raises(TypeError, match="bias has dtype"):
        ext.layer_norm_forward(x, None, torch.ones(10, dtype=torch.float64), 1e-5)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        ext.layer_norm_forward(x, None, None, -1.0)

    w1, w2 = torch.randn(6, 10), torch.randn(3, 6)
    with pytest.raises(ValueError, match="gptfast.gelu_ffn: approximate must be"):
        ext.gelu_ffn_forward(x, w1, None, w2, None, "sigmoid")
    with pytest.raises(ValueError, match="w2 must have shape"):
        ext.gelu_ffn_forward(x, w1, None, w2[:, :5], None, "tanh")
    with pytest.raises(ValueError, match="b1 must have shape"):
        ext.gelu_ffn_forward(x, w1, torch.zeros(5), w2, None, "tanh")
    with pytest.raises(TypeError, match="w1 has dtype"):
        ext.gelu_ffn_forward(x, w1.half(), None, w2, None, "tanh")


# --------------------------------------------------------------------------- gelu_ffn's element-wise passes
# GELU(h) and GELU'(h) read exactly off the launchers: one row, dout = 1, x = 1, w1 = w2 = 1, so
# that dw2 = GELU(h) and db1 = GELU'(h) (GEMMs and sums of a single term each).

_SQRT2 = 2.0 ** 0.5


def _gelu_sweep() -> torch.Tensor:
    """2^20 points on [-12, 12], magnitudes 1e-45 .. 3e38 of both signs, and every float within
    4096 ulps of each end of vec::erf_f32's intervals (|h| / sqrt(2) = 0.8125, 1.3125, 3.925)."""
    parts = [torch.linspace(-12, 12, 2 ** 20, dtype=torch.float64).float()]
    mags = torch.logspace(-45, 38.5, 2 ** 16, dtype=torch.float64).float()
    parts += [mags, -mags]
    for x in (0.8125, 1.3125, 3.925):
        bits = torch.tensor([x * _SQRT2], dtype=torch.float32).view(torch.int32)
        seam = (bits + torch.arange(-4096, 4097, dtype=torch.int32)).view(torch.float32)
        parts += [seam, -seam]
    return torch.cat(parts)


def _gelu_via_backward(h: torch.Tensor, approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    n = h.numel()
    one = torch.ones(1, 1, dtype=h.dtype)
    _, _, db1, dw2, _ = ext.gelu_ffn_backward(one, one, h.reshape(1, n), torch.ones(n, 1, dtype=h.dtype),
                                              torch.ones(1, n, dtype=h.dtype), True, False, approximate)
    return dw2.reshape(n), db1.reshape(n)


def _gelu_f64(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = h.double()
    phi = 0.5 * (1.0 + torch.special.erf(h / _SQRT2))
    return h * phi, phi + h * torch.exp(-0.5 * h * h) / (2.0 * torch.pi) ** 0.5


def _assert_gelu_within(act: torch.Tensor, truth: torch.Tensor, h: torch.Tensor) -> None:
    """|GELU error| <= 1.5e-7 |h| (+ one denormal rounding of 0.5 h) wherever the truth is finite."""
    err = (act.double() - truth).abs()
    bad = torch.isfinite(truth) & ~(err <= 1.5e-7 * h.double().abs() + 2.0 ** -149)
    assert not bad.any(), (f"GELU({h[bad][0].item()!r}) = {act[bad][0].item()!r}, float64 erf gives "
                           f"{truth[bad][0].item()!r}; {int(bad.sum())} values beyond 1.5e-7 |h|")


def test_exact_gelu_matches_float64_erf_over_a_dense_sweep():
    h = _gelu_sweep()
    act, grad = _gelu_via_backward(h, "none")
    truth, gtruth = _gelu_f64(h)
    # Bounds from vec::erf_f32's measured 0.8-0.9 ulp and the formula's roundings: measured
    # 1.08e-7 |h| and 1.44e-7 here; eager PyTorch's fp32 GELU is off by up to 3.6e-7 |h|, its
    # GELU' by 2.6e-7. A coefficient or interval slip in the erf moves these by orders of magnitude.
    finite = torch.isfinite(truth)
    _assert_gelu_within(act, truth, h)
    gfinite = torch.isfinite(gtruth)
    assert_close(grad[gfinite], gtruth[gfinite], atol=2e-7, name="GELU'(h)")
    # the tolerance rule of DESIGN.md against PyTorch's own fp32 error, where PyTorch stays finite
    # (its fp32 GELU overflows to inf above |h| ~ 1.7e38 and returns NaN at +inf)
    pt = torch.nn.functional.gelu(h)
    pt_grad = torch.ops.aten.gelu_backward(torch.ones_like(h), h)
    ok = finite & torch.isfinite(pt)
    within = gptfast.testing.assert_within_pytorch_error
    within(act[ok], truth[ok], pt[ok], atol=0.0, name="GELU(h)")
    within(grad[gfinite], gtruth[gfinite], pt_grad[gfinite], atol=0.0, name="GELU'(h)")


def test_exact_gelu_special_values():
    tiny = torch.finfo(torch.float32).tiny
    h = torch.tensor([0.0, -0.0, 1e-45, -1e-45, tiny, -tiny, 3e38, -3e38, float("inf"), float("-inf"),
                      float("nan"), 5.6, -5.6, -13.0, -20.0])
    act, grad = _gelu_via_backward(h, "none")
    truth, gtruth = _gelu_f64(h)
    # As the float64 formula: GELU(+inf) = inf, GELU(-inf) = -inf * 0 = NaN, GELU'(+-inf) NaN, NaN -> NaN;
    # GELU(-5.6) is 0 where float64 gives -6e-8 (1 + erf(-3.96) is below float's resolution at 1).
    # (The sign of GELU(-0) cannot be checked here: the GEMM that reads it out adds it to +0.)
    _assert_gelu_within(act, truth, h)
    assert_close(grad, gtruth.float(), atol=2e-7, name="GELU'(h)")
    assert torch.equal(torch.isnan(act), torch.isnan(truth))
    assert torch.equal(torch.isnan(grad), torch.isnan(gtruth))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_forward_pass_gelu_matches_backward_pass(approximate):
    # The forward's bias+GELU pass (fp32: the bias joins it) computes what the backward recomputes.
    h = _gelu_sweep()
    h = h[torch.isfinite(h) & (h.abs() < 1e30)][::37].contiguous()  # finite: out picks a column by a GEMM
    m, hidden = h.numel(), 40  # 40 columns: two 16-lane vectors and a remainder
    w2 = torch.zeros(1, hidden)
    w2[0, 37] = 1.0
    out, hh = ext.gelu_ffn_forward(h.reshape(m, 1), torch.ones(hidden, 1), torch.zeros(hidden), w2, None,
                                   approximate)
    act, _ = _gelu_via_backward(hh[:, 37].contiguous(), approximate)
    assert_close(out.reshape(m), act, atol=0.0, name=f"forward GELU ({approximate})")


def _not_subnormal(t: torch.Tensor) -> torch.Tensor:
    """Where a 16-bit GEMM's denormal flushing (oneDNN may flush) cannot change a value."""
    return (t == 0) | ~torch.isfinite(t) | (t.abs() >= torch.finfo(t.dtype).tiny)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_gelu_rows_are_the_fp32_pass_rounded(dtype, approximate):
    # The backward widens bf16/fp16 rows, runs the fp32 GELU and GELU' and narrows inside one
    # vectorised loop (32 lanes wide in the AVX-512 clone): every element must equal the fp32
    # launcher's result rounded once. 1300 columns: whole vectors and a remainder.
    h = _gelu_sweep().to(dtype)
    h = h[torch.isfinite(h)]
    hidden = 1300
    h = h[: (h.numel() // hidden) * hidden]
    for row in h.reshape(-1, hidden)[::50]:
        act, grad = _gelu_via_backward(row, approximate)
        act32, grad32 = _gelu_via_backward(row.float(), approximate)
        keep = _not_subnormal(act32.to(dtype))  # act is read out through a 16-bit GEMM
        assert_close(act[keep], act32.to(dtype)[keep], atol=0.0, name=f"{dtype} GELU (backward pass)")
        assert_close(grad, grad32.to(dtype), atol=0.0, name=f"{dtype} dh = 1 * GELU' (backward pass)")
    # The forward looks GELU up in a table of all 65536 inputs: check every entry (one hidden unit
    # and w2 = 1, so that out = GELU(h) exactly, inf and NaN included), against the fp32 GELU of
    # the h that the 16-bit GEMM returned.
    every = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(-1, 1)
    one = torch.ones(1, 1, dtype=dtype)
    out, hh = ext.gelu_ffn_forward(every, one, None, one, None, approximate)
    want = _gelu_via_backward(hh.reshape(-1).float(), approximate)[0].to(dtype)
    keep = _not_subnormal(want)
    assert keep.sum() > 60000
    assert_close(out.reshape(-1)[keep], want[keep], atol=0.0, name=f"{dtype} GELU (forward pass)")


# --------------------------------------------------------------------------- memory

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_attention_at_4096_does_not_allocate_t_by_t():
    # Peak RSS (VmHWM, reset just before) above the RSS before the call, fwd+bwd in a fresh
    # process, against one fp32 T x T score matrix for all heads (512 MiB here); the reference
    # backend materialises several of those.
    script = textwrap.dedent("""
        import json, torch
        from gptfast.ops import _cpu

        def status_kib(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1])

        torch.manual_seed(0)
        b, t, h, d = 1, 4096, 8, 64
        q, k, v, dout = (torch.randn(b, t, h, d) for _ in range(4))
        _cpu.attention_forward(q[:, :64], k[:, :64], v[:, :64], True, 0.125)  # warm up threads
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (VmHWM)
        before = status_kib("VmRSS")
        out, lse = _cpu.attention_forward(q, k, v, True, 0.125)
        grads = _cpu.attention_backward(dout, q, k, v, out, lse, True, 0.125)
        peak = status_kib("VmHWM")
        print(json.dumps({"growth_bytes": (peak - before) * 1024, "tt_bytes": t * t * h * 4}))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    # out + dq, dk, dv are 4 x 8 MiB, per-thread O(T * D) buffers ~1 MiB (measured: ~35 MiB)
    assert stats["growth_bytes"] < stats["tt_bytes"] / 8, stats


def test_extension_refuses_broadcast_rows():
    """Called directly (not through gptfast.attention, which copies such inputs), the C++ launcher
    refuses a seqlen stride below the head dim instead of handing BLAS an invalid row pitch."""
    from gptfast.ops import _cpu

    q = torch.randn(1, 8, 2, 16)
    k = torch.randn(1, 1, 2, 16).expand(1, 8, 2, 16)
    with pytest.raises(ValueError, match="k must not have broadcast or overlapping rows"):
        _cpu.attention_forward(q, k, q, True, 0.25)
