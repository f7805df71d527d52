"""gptfast.linear_cross_entropy on the reference, cpu and triton (interpreter) backends against F.cross_entropy of the
full logits: every reduction, ignore_index, label smoothing, softcap, bias, chunk sizes that do
and do not divide the rows, float64 (exact up to rounding; reference and cpu) and fp32 / bf16 / fp16 by DESIGN.md's rule;
the logits epilogue of the cpu extension against the reference epilogue; bad input; the custom
op under torch.compile(fullgraph=True); GPT.forward's fused loss against its unfused one.
(The Triton epilogue against the reference one: tests/test_triton_linear_cross_entropy.py;
the CUDA one: tests/test_cuda_emulated.py.)"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import gptfast
from gptfast.ops.linear_cross_entropy import (cross_entropy_logits_reference, linear_cross_entropy,
                                              linear_cross_entropy_ref)
from gptfast.testing import assert_results_match, linear_cross_entropy_magnitudes

HAVE_CPU = "cpu" in gptfast.available_backends("linear_cross_entropy", device="cpu")
BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(not HAVE_CPU, reason="cpu extension unavailable"))]
# triton's logits are float32 (no float64 kernels): every test but the float64 one
HAVE_TRITON = "triton" in gptfast.available_backends("linear_cross_entropy", device="cpu")
KERNEL_BACKENDS = BACKENDS + [pytest.param("triton", marks=pytest.mark.skipif(
    not HAVE_TRITON, reason="triton unavailable (needs TRITON_INTERPRET=1 on the CPU)"))]


def _inputs(m, k, v, dtype=torch.float64, bias=False, ignore_every=5, device="cpu"):
    x = torch.randn(m, k, dtype=torch.float64, device=device)
    w = torch.randn(v, k, dtype=torch.float64, device=device) * 0.5
    b = torch.randn(v, dtype=torch.float64, device=device) if bias else None
    t = torch.randint(0, v, (m,), device=device)
    if ignore_every:
        t[::ignore_every] = -100
    cast = [None if a is None else a.to(dtype).requires_grad_() for a in (x, w, b)]
    return (*cast, t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing, softcap, bias", [(0.0, None, False), (0.1, None, True), (0.0, 30.0, True),
                                                      (0.2, 5.0, False)])
@pytest.mark.parametrize("chunk_rows", [None, 1, 7])
def test_float64_matches_cross_entropy_of_the_full_logits(backend, reduction, smoothing, softcap, bias, chunk_rows,
                                                          seed):
    x, w, b, t = _inputs(23, 16, 50, bias=bias)
    params = [p for p in (x, w, b) if p is not None]
    got = linear_cross_entropy(x, w, t, b, reduction=reduction, label_smoothing=smoothing, softcap=softcap,
                               chunk_rows=chunk_rows, backend=backend)
    want = linear_cross_entropy_ref(x, w, t, b, reduction=reduction, label_smoothing=smoothing, softcap=softcap)
    assert got.dtype == torch.float64 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("smoothing, softcap", [(0.0, None), (0.1, 20.0)])
def test_low_precision_within_pytorch_error(backend, dtype, reduction, smoothing, softcap, seed):
    check_low_precision(backend, dtype, reduction, smoothing, softcap)


def check_low_precision(backend, dtype, reduction, smoothing, softcap, m=100, k=64, v=1000, device="cpu"):
    """Against the float64 truth, within 2x (loss) / 3x (gradients) PyTorch's own error in this
    dtype (F.linear in the dtype, then F.cross_entropy in fp32, as under autocast) plus the
    rounding term of the op's magnitudes; by default V = 1000 over 3 chunks of 37 rows. Also run
    on a GPU (tests/gpu/test_cuda_gpu.py)."""
    x64, w64, _, t = _inputs(m, k, v, device=device)
    x64, w64 = x64.detach().requires_grad_(), w64.detach().requires_grad_()
    xs = [x64.detach().to(dtype).requires_grad_() for _ in range(2)]
    ws = [w64.detach().to(dtype).requires_grad_() for _ in range(2)]
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    ref = linear_cross_entropy_ref(x64, w64, t, softcap=softcap, **kw)

    def pytorch(x, w):
        z = F.linear(x, w).float()
        if softcap:
            z = softcap * torch.tanh(z / softcap)
        return F.cross_entropy(z, t, **kw)

    pt = pytorch(xs[0], ws[0])
    out = linear_cross_entropy(xs[1], ws[1], t, softcap=softcap, chunk_rows=37, backend=backend, **kw)
    assert out.dtype == torch.float32
    g = torch.randn(ref.shape, dtype=torch.float64, device=device)
    ref_g = torch.autograd.grad(ref, (x64, w64), g)
    pt_g = torch.autograd.grad(pt, (xs[0], ws[0]), g.float())
    out_g = torch.autograd.grad(out, (xs[1], ws[1]), g.float())
    assert [a.dtype for a in out_g] == [dtype, dtype]
    mags = linear_cross_entropy_magnitudes(x64, w64, None, t, g, **kw)
    assert_results_match(out, ref, pt, out_g, ref_g, pt_g, magnitudes=mags)


@pytest.mark.skipif(not HAVE_CPU, reason="cpu extension unavailable")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("v", [1, 15, 16, 17, 1000, 4099])
@pytest.mark.parametrize("smoothing, softcap, scaled", [(0.0, 0.0, True), (0.3, 0.0, True), (0.0, 7.0, True),
                                                        (0.1, 2.0, False)])
def test_cpu_epilogue_matches_the_reference_epilogue(dtype, v, smoothing, softcap, scaled, seed):
    from gptfast.ops import _cpu
    c = 9
    z = torch.randn(c, v, dtype=dtype) * 4
    z[1, 0] = 80.0  # one dominant logit: exp must not overflow
    z[2] = 50.0  # a row of equal large logits: loss log(V), the softmax uniform
    t = torch.randint(0, v, (c,))
    t[3] = -100
    t[4] = v - 1
    scale = torch.rand(c, dtype=dtype) + 0.5 if scaled else None
    want_z = z.clone()
    want = cross_entropy_logits_reference(want_z, t, scale, -100, smoothing, softcap)
    got_z = z.clone()
    got = _cpu._ext.cross_entropy_logits_(got_z, t, scale, -100, smoothing, softcap)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, **tol)
    assert got[3] == 0
    if scaled:
        torch.testing.assert_close(got_z, want_z, **tol)
        assert (got_z[3] == 0).all()
        if not softcap:  # the gradient of a (smoothed) softmax cross-entropy sums to zero over each row
            assert got_z.sum(1).abs().max() < (1e-5 if dtype == torch.float32 else 1e-12) * math.sqrt(v)
    torch.testing.assert_close(got[2], torch.tensor(math.log(v), dtype=dtype), **tol)


@pytest.mark.skipif(not HAVE_CPU, reason="cpu extension unavailable")
def test_cpu_epilogue_rejects_bad_input():
    from gptfast.ops import _cpu
    z, t = torch.randn(4, 10), torch.randint(0, 10, (4,))
    ce = _cpu._ext.cross_entropy_logits_
    with pytest.raises(IndexError, match=r"targets\[2\] = 10 is outside \[0, 10\)"):
        ce(z.clone(), torch.tensor([1, 2, 10, 3]), None, -100, 0.0, 0.0)
    with pytest.raises(TypeError, match="z must be float32"):
        ce(z.half(), t, None, -100, 0.0, 0.0)
    with pytest.raises(ValueError, match="z must be contiguous"):
        ce(torch.randn(10, 4).t(), t, None, -100, 0.0, 0.0)
    with pytest.raises(TypeError, match="targets must be int64"):
        ce(z, t.int(), None, -100, 0.0, 0.0)
    with pytest.raises(ValueError, match="row_scale must be contiguous"):
        ce(z, t, torch.ones(3), -100, 0.0, 0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        ce(z, t, None, -100, 1.5, 0.0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_shapes_empty_and_all_ignored(backend, seed):
    x, w = torch.randn(2, 3, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    t = torch.randint(0, 11, (2, 3))
    out = linear_cross_entropy(x, w, t, reduction="none", backend=backend)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out, F.cross_entropy(F.linear(x, w).reshape(6, 11), t.reshape(6),
                                                    reduction="none").view(2, 3))
    empty = linear_cross_entropy(x[:0], w, t[:0], backend=backend)
    assert empty.isnan() and linear_cross_entropy(x[:0], w, t[:0], reduction="sum", backend=backend) == 0
    ignored = torch.full((2, 3), -100)
    assert linear_cross_entropy(x, w, ignored, backend=backend).isnan()  # as F.cross_entropy: 0 / 0
    loss = linear_cross_entropy(x, w, ignored, reduction="sum", backend=backend)
    loss.backward()
    assert loss == 0 and (x.grad == 0).all() and (w.grad == 0).all()


def test_bad_input_names_the_argument():
    x, w = torch.randn(2, 3, 8), torch.randn(11, 8)
    t = torch.randint(0, 11, (2, 3))
    cases = [
        (dict(weight=torch.randn(11, 9)), ValueError, r"weight must be \(V, 8\)"),
        (dict(targets=t[:, :2]), ValueError, "targets must have x's leading shape"),
        (dict(targets=t.float()), TypeError, "targets must be an int64"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(bias=torch.randn(10)), ValueError, r"bias must be \(11,\)"),
        (dict(weight=w.double()), TypeError, "weight has dtype torch.float64 but x has torch.float32"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing must be in"),
        (dict(softcap=0.0), ValueError, "softcap must be a positive"),
        (dict(ignore_index=1.0), TypeError, "ignore_index must be an int"),
        (dict(chunk_rows=0), ValueError, "chunk_rows must be a positive int"),
        (dict(x=x.long()), TypeError, "x must be a floating-point tensor"),
    ]
    for kw, exc, match in cases:
        args = dict(x=x, weight=w, targets=t) | kw
        with pytest.raises(exc, match=match):
            linear_cross_entropy(**args)
    bad = t.clone()
    bad[1, 2] = 11
    with pytest.raises(IndexError, match=r"targets\[5\] = 11 is outside \[0, 11\)"):
        linear_cross_entropy(x, w, bad)
    with pytest.raises(ValueError, match="unknown gptfast backend"):
        linear_cross_entropy(x, w, t, backend="nope")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_autocast_runs_the_gemms_in_the_autocast_dtype(backend, seed):
    x, w, _, t = _inputs(40, 32, 300, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(x, w, t, backend=backend)
        pt = F.cross_entropy(F.linear(x, w).float(), t)
    assert out.dtype == torch.float32
    gx, gw = torch.autograd.grad(out, (x, w))
    px, pw = torch.autograd.grad(pt, (x, w))
    assert gx.dtype == gw.dtype == torch.float32  # the gradients come back in the parameters' dtype
    torch.testing.assert_close(out, pt, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw, pw, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compiles_fullgraph(backend, seed):
    x, w, b, t = _inputs(24, 16, 40, dtype=torch.float32, bias=True)

    def step(x, w, b):
        return linear_cross_entropy(x, w, t, b, label_smoothing=0.1, chunk_rows=10, backend=backend) * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(x, w, b)
    want = step(x, w, b)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, (x, w, b)), torch.autograd.grad(want, (x, w, b)))


def test_gpt_forward_fuses_the_loss_unless_logits_are_asked_for(seed):
    from gptfast import GPT, GPTConfig
    model = GPT(GPTConfig(block_size=16, vocab_size=70, n_layer=1, n_head=2, n_embd=32)).double()
    idx = torch.randint(0, 70, (2, 16))
    targets = idx.roll(-1, 1)
    targets[:, -1] = -1
    logits, fused = model(idx, targets)
    assert logits is None
    grads = torch.autograd.grad(fused, list(model.parameters()))
    logits, _ = model(idx, targets, return_logits=True)
    assert logits.shape == (2, 16, 70)
    plain = F.cross_entropy(logits.reshape(-1, 70), targets.reshape(-1), ignore_index=-1)  # fp64, unlike the model's
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, torch.autograd.grad(plain, list(model.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert model(idx)[1] is None and model(idx)[0].shape == (2, 16, 70)
    with pytest.raises(ValueError, match="return_logits=False without targets"):
        model(idx, return_logits=False)
