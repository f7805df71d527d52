"""Triton gated FFN (kernels/gated_ffn.py): its launchers against the launcher contract (in
gptfast/ops/_backend.py) evaluated in float64, and ``gptfast.gated_ffn(..., backend="triton")``.

Interpreter-sized (TRITON_INTERPRET=1 on CPU; the interpreter's tiles are 32x32x32, so the sizes
below leave ragged tails in M, K, H and N, and some hit EVEN_K): SiLU, GELU tanh and exact GELU,
each bias present or absent on its own, fp16 and fp32 (bf16 on a GPU only: tests/gpu runs
``check_gated_ffn_launchers`` there), weights as the two row halves of one fused (2H, K)
gate_up tensor (Phi-3), in column-major storage (stride swaps) or separate contiguous tensors.
Ground truth: the contract's formulas in float64; within 2x/3x PyTorch's own error in the dtype
(the same formulas with F.linear / matmul in the dtype and the elementwise math in fp32) plus the
rounding of the summed terms (gptfast.testing's rule; fp32 too).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import gptfast  # noqa: E402
import gptfast.testing  # noqa: E402
from gptfast.ops.gated_ffn import activation, activation_grad  # noqa: E402
from gptfast.testing import assert_matches_reference, assert_results_match  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")


# ---------------------------------------------------------------------------------------------
# The contract, in any dtype (float64 inputs: the ground truth)
# ---------------------------------------------------------------------------------------------
act, act_grad = activation, activation_grad  # the formulas every backend follows


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def contract_forward(x, w_gate, b_gate, w_up, b_up, w_down, b_down, activation):
    """out, g, u: matmuls in x's dtype, act(g) * u in fp32 from the rounded g, u, rounded once."""
    g = F.linear(x, w_gate, b_gate)
    u = F.linear(x, w_up, b_up)
    a = (act(g.to(_acc(x.dtype)), activation) * u.to(_acc(x.dtype))).to(x.dtype)
    return F.linear(a, w_down, b_down), g, u


def contract_backward(dout, x, g, u, w_gate, w_up, w_down, has_b_gate, has_b_up, has_b_down, activation):
    """dx, dw_gate, db_gate, dw_up, db_up, dw_down, db_down as the contract defines them."""
    acc = _acc(x.dtype)
    ga, ua = g.to(acc), u.to(acc)
    a = (act(ga, activation) * ua).to(x.dtype)
    da = (dout @ w_down).to(acc)
    dg = (da * ua * act_grad(ga, activation)).to(x.dtype)
    du = (da * act(ga, activation)).to(x.dtype)
    colsum = lambda t, has: t.sum(0, dtype=acc).to(x.dtype) if has else None  # noqa: E731
    return (dg @ w_gate + du @ w_up, dg.t() @ x, colsum(dg, has_b_gate), du.t() @ x, colsum(du, has_b_up),
            dout.t() @ a, colsum(dout, has_b_down))


def launcher_magnitudes(x, w_gate, b_gate, w_up, b_up, w_down, b_down, dout, activation):
    """Magnitudes ``[out, g, u, dx, dw_gate, db_gate, dw_up, db_up, dw_down, db_down]`` (the
    launchers' order) of the terms each result sums: gptfast.testing.gated_ffn_magnitudes; g, u:
    sqrt(K) max of their terms."""
    out, dx, dw_gate, dw_up, dw_down, db_gate, db_up, db_down = gptfast.testing.gated_ffn_magnitudes(
        x, w_gate, w_up, w_down, activation, b_gate, b_up, b_down, dout)
    terms = lambda w, b: x.double().abs() @ w.double().abs().t() + (0.0 if b is None else b.double().abs())  # noqa: E731
    root = math.sqrt(x.shape[1])
    return [out, root * float(terms(w_gate, b_gate).max()), root * float(terms(w_up, b_up).max()),
            dx, dw_gate, db_gate, dw_up, db_up, dw_down, db_down]


def make_inputs(M, K, H, N, dtype, biases=(True, True, True), weights="fused", seed=0):
    """x (M, K) and the weights in ``weights`` layout: "fused" (row halves of one (2H, K)
    tensor), "transposed" (the same, stored column-major; w_down too) or "separate"."""
    torch.manual_seed(seed + 7 * K + H)
    x = torch.randn(M, K, device=DEVICE)
    if weights == "separate":
        w_gate, w_up = (torch.randn(H, K, device=DEVICE) / K ** 0.5 for _ in range(2))
        w_down = torch.randn(N, H, device=DEVICE) / H ** 0.5
    else:
        fused = (torch.randn(K, 2 * H, device=DEVICE).t() if weights == "transposed"
                 else torch.randn(2 * H, K, device=DEVICE)) / K ** 0.5
        w_down = (torch.randn(H, N, device=DEVICE).t() if weights == "transposed"
                  else torch.randn(N, H, device=DEVICE)) / H ** 0.5
        w_gate, w_up = fused[:H], fused[H:]
    b_gate, b_up, b_down = (torch.randn(n, device=DEVICE) * 0.5 if has else None
                            for has, n in zip(biases, (H, H, N)))
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731  (keeps strides and views)
    return [cast(t) for t in (x, w_gate, b_gate, w_up, b_up, w_down, b_down)]


# ---------------------------------------------------------------------------------------------
# Launchers against the contract in float64
# ---------------------------------------------------------------------------------------------
def check_gated_ffn_launchers(M, K, H, N, dtype, activation="silu", biases=(True, True, True), weights="fused",
                              seed=0):
    from gptfast.kernels.gated_ffn import gated_ffn_backward, gated_ffn_forward

    x, w_gate, b_gate, w_up, b_up, w_down, b_down = inputs = make_inputs(M, K, H, N, dtype, biases, weights, seed)
    if weights == "transposed":
        assert not w_gate.is_contiguous() and not w_up.is_contiguous() and not w_down.is_contiguous()
    f64 = [None if t is None else t.double() for t in inputs]
    dout = torch.randn(M, N, device=DEVICE).to(dtype)
    name = f"M={M} K={K} H={H} N={N} {dtype} {activation} biases={biases} {weights}"
    mags = launcher_magnitudes(*inputs, dout, activation)

    out, g, u = gated_ffn_forward(*inputs, activation)
    ref = contract_forward(*f64, activation)
    pt = contract_forward(*inputs, activation)
    for label, got, r, p, mag in zip(("out", "g", "u"), (out, g, u), ref, pt, mags[:3]):
        assert got.dtype == dtype and got.shape == r.shape and got.is_contiguous(), f"{name} {label}"
        assert_matches_reference(got, r, p, magnitude=mag, factor=2, name=f"{name} {label}")

    has = tuple(b is not None for b in (b_gate, b_up, b_down))
    grads = gated_ffn_backward(dout, x, g, u, w_gate, w_up, w_down, *has, activation)
    ref_b = contract_backward(dout.double(), f64[0], ref[1], ref[2], f64[1], f64[3], f64[5], *has, activation)
    pt_b = contract_backward(dout, x, pt[1], pt[2], w_gate, w_up, w_down, *has, activation)
    labels = ("dx", "dw_gate", "db_gate", "dw_up", "db_up", "dw_down", "db_down")
    assert len(grads) == 7
    for label, got, r, p, mag in zip(labels, grads, ref_b, pt_b, mags[3:]):
        if r is None:
            assert got is None, f"{name} {label} should be None"
            continue
        assert got.dtype == dtype and got.shape == r.shape and got.is_contiguous(), f"{name} {label}"
        assert_matches_reference(got, r, p, magnitude=mag, factor=3, name=f"{name} {label}")


GRID = [  # (M, K, H, N, dtype, activation, (b_gate, b_up, b_down), weights)
    (37, 45, 70, 29, torch.float32, "silu", (True, True, True), "fused"),
    (37, 45, 70, 29, torch.float16, "silu", (True, True, True), "transposed"),
    (19, 64, 50, 40, torch.float16, "gelu_tanh", (False, False, False), "separate"),  # EVEN_K forward
    (33, 40, 96, 33, torch.float32, "gelu", (True, False, True), "transposed"),
    (50, 33, 64, 64, torch.float16, "gelu", (False, True, False), "fused"),  # EVEN_K da and dx
    (40, 45, 70, 29, torch.float32, "gelu_tanh", (False, False, False), "separate"),
    (70, 130, 33, 70, torch.float16, "gelu_tanh", (True, True, False), "fused"),  # 3 row tiles of db partials
    (1, 17, 20, 9, torch.float16, "silu", (True, True, True), "transposed"),  # one token, everything a tail
]


@pytest.mark.parametrize("M,K,H,N,dtype,activation,biases,weights", GRID,
                         ids=[f"M{m}-K{k}-H{h}-N{n}-{str(d)[6:]}-{a}-b{''.join(str(int(b)) for b in bs)}-{w}"
                              for m, k, h, n, d, a, bs, w in GRID])
def test_gated_ffn_triton_launchers_match_float64(M, K, H, N, dtype, activation, biases, weights):
    check_gated_ffn_launchers(M, K, H, N, dtype, activation, biases, weights)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gated_ffn_contract_derivatives(activation):
    # the float64 ground truth's act' is the derivative of its act (autograd), and act is torch's
    g = torch.linspace(-8, 8, 401, dtype=torch.float64, requires_grad=True)
    a = act(g, activation)
    (grad,) = torch.autograd.grad(a.sum(), g)
    torch.testing.assert_close(act_grad(g.detach(), activation), grad, atol=1e-12, rtol=1e-12)
    builtin = {"silu": F.silu(g), "gelu_tanh": F.gelu(g, approximate="tanh"), "gelu": F.gelu(g)}[activation]
    torch.testing.assert_close(a, builtin, atol=1e-12, rtol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="bf16 tl.dot returns garbage in the Triton interpreter; bf16 runs on a GPU only")
def test_gated_ffn_triton_bf16():
    check_gated_ffn_launchers(200, 96, 200, 72, torch.bfloat16, "silu")


# numpy warns while computing sigmoid(g) = 1/(1+exp(-g)) for very negative g: exp overflows to
# inf and the sigmoid correctly becomes 0 (the test asserts the results are finite).
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gated_ffn_triton_large_activations_stay_finite(activation):
    from gptfast.kernels.gated_ffn import gated_ffn_backward, gated_ffn_forward
    torch.manual_seed(1)
    x = torch.randn(8, 16, device=DEVICE) * 100  # |g| ~ 1e3
    w_gate, w_up = torch.randn(24, 16, device=DEVICE), torch.randn(24, 16, device=DEVICE) * 1e-3
    w_down = torch.randn(5, 24, device=DEVICE) * 1e-3
    out, g, u = gated_ffn_forward(x, w_gate, None, w_up, None, w_down, None, activation)
    grads = gated_ffn_backward(torch.randn(8, 5, device=DEVICE), x, g, u, w_gate, w_up, w_down,
                               False, False, True, activation)
    for t in (out, g, u) + tuple(t for t in grads if t is not None):
        assert torch.isfinite(t).all()


def test_gated_ffn_triton_nan_propagates_to_its_rows():
    # a NaN in row 1 of x reaches exactly row 1 of out, g, u and dx (the wrapped row indices of
    # the tiles duplicate rows only into masked-off lanes), and every weight/bias gradient
    from gptfast.kernels.gated_ffn import gated_ffn_backward, gated_ffn_forward
    x, w_gate, b_gate, w_up, b_up, w_down, b_down = make_inputs(37, 45, 70, 29, torch.float32)
    x[1, 3] = float("nan")
    out, g, u = gated_ffn_forward(x, w_gate, b_gate, w_up, b_up, w_down, b_down, "silu")
    grads = gated_ffn_backward(torch.randn(37, 29, device=DEVICE), x, g, u, w_gate, w_up, w_down,
                               True, True, True, "silu")
    for name, t in (("out", out), ("g", g), ("u", u), ("dx", grads[0])):
        assert torch.isnan(t[1]).all() and not torch.isnan(t[torch.arange(37) != 1]).any(), name
    for t in grads[1:6]:
        assert torch.isnan(t).all()
    assert not torch.isnan(grads[6]).any()  # db_down = column sums of dout


# ---------------------------------------------------------------------------------------------
# The public op (gptfast/ops/gated_ffn.py, landed separately): backend="triton" against float64
# ---------------------------------------------------------------------------------------------
def check_gated_ffn_op(B, T, K, H, N, dtype, activation="silu", fused=True, backend="triton"):
    """Forward and every gradient of ``gptfast.gated_ffn`` against the float64 reference
    backend, with a fused (2H, K) gate_up weight (w_up=None: gradients summed into it) or
    separate weights, a 3-D input and a random upstream gradient."""
    x, w_gate, b_gate, w_up, b_up, w_down, b_down = make_inputs(B * T, K, H, N, torch.float32, weights="transposed")
    x = x.reshape(B, T, K)
    if fused:  # one (2H, K) leaf (its storage column-major) and one (2H,) bias
        w_gate, b_gate, w_up, b_up = torch.cat([w_gate, w_up]), torch.cat([b_gate, b_up]), None, None
    params = [x, w_gate, w_up, w_down, b_gate, b_up, b_down]

    def leaves(dt):
        return [None if t is None else t.to(dt, copy=True).requires_grad_() for t in params]

    def run(ts, be):
        return gptfast.gated_ffn(ts[0], ts[1], ts[2], ts[3], activation, ts[4], ts[5], ts[6], backend=be)

    x64, xpt, xtr = leaves(torch.float64), leaves(dtype), leaves(dtype)
    ref, pt, out = run(x64, "reference"), run(xpt, "reference"), run(xtr, backend)
    assert out.dtype == dtype and out.shape == (B, T, N)
    dout = torch.randn(B, T, N, device=DEVICE).to(dtype)
    for y, d in ((ref, dout.double()), (pt, dout), (out, dout)):
        y.backward(d)
    grads = lambda ts: [None if t is None else t.grad for t in ts]  # noqa: E731
    mags = gptfast.testing.gated_ffn_magnitudes(x64[0], x64[1], x64[2], x64[3], activation, *x64[4:],
                                                dout=dout.double())
    assert_results_match(out, ref, pt, grads(xtr), grads(x64), grads(xpt), magnitudes=mags,
                         name=f"B={B} T={T} K={K} H={H} N={N} {dtype} {activation} fused={fused}")


@pytest.mark.skipif(not hasattr(gptfast, "gated_ffn") or not hasattr(gptfast.testing, "gated_ffn_magnitudes"),
                    reason="gptfast.gated_ffn (the op) is not in this tree")
@pytest.mark.parametrize("dtype,activation,fused", [(torch.float32, "silu", True), (torch.float16, "gelu_tanh", False),
                                                    (torch.float16, "gelu", True)])
def test_gated_ffn_triton_op_matches_float64(dtype, activation, fused):
    check_gated_ffn_op(2, 9, 40, 36, 23, dtype, activation, fused)
