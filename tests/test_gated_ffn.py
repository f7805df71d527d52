"""gptfast.gated_ffn (SwiGLU / GeGLU) on every backend that runs here: the float64 truth by
DESIGN.md's rule for the three activations, with and without biases, the fused gate_up weight,
leading dimensions / a (K,) input / no rows, autocast, errors that name the argument, the eager
path against the custom ops, torch.compile, opcheck, gradcheck on the reference, what the
backward saves (never act(g) * u), and gptfast.nn.GatedFFN.

Backends: whatever ``available_backends("gated_ffn")`` lists on the CPU (the reference always;
cpu once built). Kernel-specific cases live in tests/test_cpu_gated_ffn.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gptfast
from gptfast.ops import _common
from gptfast.ops.gated_ffn import ACTIVATIONS, _act_backward, _torch_act, activation, activation_grad
from gptfast.testing import assert_close, assert_results_match, gated_ffn_magnitudes

# triton runs here only in its interpreter (no bf16, no float64): its op-level tests are in
# tests/test_triton_gated_ffn.py
BACKENDS = [b for b in gptfast.available_backends("gated_ffn", device="cpu") if b != "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ops = torch.ops.gptfast


def _params(k, h, n, dtype, biases=True, fused=False, grad=True):
    """x-independent arguments in gated_ffn's order: w_gate, w_up, w_down, b_gate, b_up, b_down."""
    ws = [(torch.randn(2 * h if fused else h, k) / k ** 0.5).to(dtype),
          None if fused else (torch.randn(h, k) / k ** 0.5).to(dtype),
          (torch.randn(n, h) / h ** 0.5).to(dtype)]
    bs = [(torch.randn(2 * h if fused else h) * 0.3).to(dtype), None if fused else (torch.randn(h) * 0.3).to(dtype),
          (torch.randn(n) * 0.3).to(dtype)] if biases else [None, None, None]
    return [None if t is None else t.requires_grad_(grad) for t in ws + bs]


def _call(f, x, p, act, **kw):
    wg, wu, wd, bg, bu, bd = p
    return f(x, wg, wu, wd, act, bg, bu, bd, **kw)


def _truth_and_pytorch(x, p, act, dy):
    """(float64 truth, PyTorch's own result in x's dtype): the output and the gradients of every
    tensor argument that is not None, by autograd through gated_ffn_ref."""
    outs = []
    for dt in (torch.float64, x.dtype):
        xx = x.detach().to(dt).requires_grad_()
        pp = [None if t is None else t.detach().to(dt).requires_grad_() for t in p]
        y = _call(gptfast.gated_ffn_ref, xx, pp, act)
        grads = torch.autograd.grad(y, [xx] + [t for t in pp if t is not None], dy.to(dt))
        outs.append((y.detach(), grads))
    return outs


def _check_against_truth(backend, x, p, act, dtype, name):
    dy = torch.randn(*x.shape[:-1], p[2].shape[0]).to(dtype)
    y = _call(gptfast.gated_ffn, x, p, act, backend=backend)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], p[2].shape[0])
    grads = torch.autograd.grad(y, [x] + [t for t in p if t is not None], dy)
    (ref, ref_g), (pt, pt_g) = _truth_and_pytorch(x, p, act, dy)
    mags = gated_ffn_magnitudes(x, *p[:3], act, *p[3:], dout=dy)
    # magnitudes come as [out, dx, dw_gate, dw_up, dw_down, db_gate, db_up, db_down]: keep those of
    # the arguments given (fused: w_up and b_up are None)
    present = [True, True] + [t is not None for t in p]
    assert_results_match(y, ref, pt, grads, ref_g, pt_g, magnitudes=[m for m, keep in zip(mags, present) if keep],
                         name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("shape, h, n, biases", [((4, 9, 64), 96, 40, False), ((7, 123), 200, 123, True),
                                                 ((96,), 40, 17, True), ((3, 1, 5, 33), 59, 16, False)], ids=str)
def test_matches_the_float64_truth(backend, act, shape, h, n, biases, seed):
    # 16-bit: a = act(g) * u is rounded once (the contract), PyTorch's eager product twice; both are
    # about an ulp off, and below ~128 outputs PyTorch's max error is too small a sample for the
    # 2x rule (a reference-backend sweep of M*N < 100 shapes failed 16% of the time, M*N >= 128 never)
    rows = 1 if len(shape) == 1 else int(torch.tensor(shape[:-1]).prod())
    for dtype in DTYPES if rows * n >= 128 else [torch.float32]:
        x = torch.randn(shape).to(dtype).requires_grad_()
        p = _params(shape[-1], h, n, dtype, biases)
        _check_against_truth(backend, x, p, act, dtype, f"{backend} {dtype} {act} {shape}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("biases", [False, True], ids=["nobias", "bias"])
def test_fused_gate_up_weight_is_the_split_call(backend, biases, seed):
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 7, 48).to(dtype).requires_grad_()
        p = _params(48, 80, 32, dtype, biases, fused=True)
        _check_against_truth(backend, x, p, "silu", dtype, f"{backend} {dtype} fused")
        # the same launchers on the two halves: bitwise the unfused op, gradients concatenated
        wgu, _, wd, bgu, _, bd = p
        y = gptfast.gated_ffn(x, wgu, None, wd, "gelu_tanh", bgu, None, bd, backend=backend)
        halves = [t.detach().clone().requires_grad_() for t in wgu.chunk(2)]
        bh = [None, None] if bgu is None else [t.detach().clone().requires_grad_() for t in bgu.chunk(2)]
        y2 = gptfast.gated_ffn(x, halves[0], halves[1], wd, "gelu_tanh", bh[0], bh[1], bd, backend=backend)
        assert torch.equal(y, y2)
        dy = torch.randn_like(y)
        fused_grads = torch.autograd.grad(y, [t for t in (wgu, bgu) if t is not None], dy)
        split_grads = torch.autograd.grad(y2, halves + [t for t in bh if t is not None], dy)
        assert torch.equal(fused_grads[0], torch.cat(split_grads[:2]))
        if biases:
            assert torch.equal(fused_grads[1], torch.cat(split_grads[2:]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dimensions_one_row_vector_and_no_rows(backend, seed):
    p = _params(24, 40, 16, torch.float32)
    x = torch.randn(2, 3, 4, 24)
    y = _call(gptfast.gated_ffn, x, p, "silu", backend=backend)
    flat = _call(gptfast.gated_ffn, x.reshape(24, 24), p, "silu", backend=backend)
    assert y.shape == (2, 3, 4, 16) and torch.equal(y.reshape(24, 16), flat)
    v = x[0, 0, 0]  # (K,) -> (N,)
    y1 = _call(gptfast.gated_ffn, v, p, "gelu", backend=backend)
    assert y1.shape == (16,)
    assert_close(y1, _call(gptfast.gated_ffn_ref, v, p, "gelu"), atol=1e-5, name="(K,) input")
    # a permuted (non-contiguous) x and transposed-storage weights give the same result
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    pt = [t.detach().t().contiguous().t().requires_grad_() if t is not None and t.dim() == 2 else t for t in p]
    assert torch.equal(_call(gptfast.gated_ffn, xt, pt, "silu", backend=backend), y)
    empty = torch.randn(0, 3, 24, requires_grad=True)
    y0 = _call(gptfast.gated_ffn, empty, p, "silu", backend=backend)
    assert y0.shape == (0, 3, 16)
    grads = torch.autograd.grad(y0.sum(), [empty] + p)
    assert grads[0].shape == empty.shape
    for g, t in zip(grads[1:], p):
        assert g.shape == t.shape and not g.any()


def test_autocast_casts_to_the_autocast_dtype_like_nn_linear(seed):
    x = torch.randn(6, 32, requires_grad=True)
    p = _params(32, 48, 32, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = _call(gptfast.gated_ffn, x, p, "silu")
        want = _call(gptfast.gated_ffn_ref, x, p, "silu")  # F.linear under autocast: bf16
    assert y.dtype == torch.bfloat16 == want.dtype
    bf = [None if t is None else t.detach().bfloat16() for t in p]
    assert torch.equal(y, _call(gptfast.gated_ffn, x.detach().bfloat16(), bf, "silu"))
    assert_close(y.float(), want.float(), atol=0.05, name="autocast")
    gx, gw = torch.autograd.grad(y.float().sum(), (x, p[0]))
    assert gx.dtype == torch.float32 and gw.dtype == torch.float32  # back through the casts


_K, _H, _N = 8, 12, 6


def _bad(**kw):
    args = dict(x=torch.randn(4, _K), w_gate=torch.randn(_H, _K), w_up=torch.randn(_H, _K), w_down=torch.randn(_N, _H),
                activation="silu", b_gate=None, b_up=None, b_down=None)
    args.update(kw)
    return args


@pytest.mark.parametrize("kwargs, error, match", [
    (_bad(x=torch.randn(4, _K).long()), TypeError, "x has dtype torch.int64"),
    (_bad(x=torch.randn(4, _K + 1)), ValueError, "w_gate must have shape"),
    (_bad(w_gate=torch.randn(_H)), ValueError, "w_gate must have 2 dimensions"),
    (_bad(w_up=torch.randn(_H + 1, _K)), ValueError, r"w_up must have shape \(12, 8\)"),
    (_bad(w_down=torch.randn(_N, _H + 2)), ValueError, r"w_down must have shape \(out_features, hidden\)"),
    (_bad(b_gate=torch.randn(_H + 1)), ValueError, r"b_gate must have shape \(12,\)"),
    (_bad(b_up=torch.randn(3)), ValueError, r"b_up must have shape \(12,\)"),
    (_bad(b_down=torch.randn(_H)), ValueError, r"b_down must have shape \(6,\)"),
    (_bad(activation="relu"), ValueError, "activation must be one of"),
    (_bad(activation="gelu_new"), ValueError, "activation must be one of"),
    (_bad(w_up=torch.randn(_H, _K).double()), TypeError, "w_up has dtype torch.float64"),
    (_bad(b_down=torch.randn(_N).half()), TypeError, "b_down has dtype torch.float16"),
    (_bad(w_up=None, w_gate=torch.randn(2 * _H + 1, _K)), ValueError, "needs an even number of rows"),
    (_bad(w_up=None, w_gate=torch.randn(2 * _H, _K), b_up=torch.randn(_H)), ValueError,
     "b_up must be None when w_up is None"),
    (_bad(w_up=None, w_gate=torch.randn(2 * _H, _K), b_gate=torch.randn(_H)), ValueError,
     r"b_gate must have shape \(24,\)"),
    (_bad(w_up=None, w_gate=torch.randn(2 * _H, _K), w_down=torch.randn(_N, 2 * _H)), ValueError,
     "to match the gate's hidden size 12"),
    (_bad(w_down=torch.randn(_N, _H, device="meta")), ValueError, "w_down is on meta but x is on cpu"),
])
def test_bad_inputs_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        gptfast.gated_ffn(kwargs["x"], kwargs["w_gate"], kwargs["w_up"], kwargs["w_down"], kwargs["activation"],
                          kwargs["b_gate"], kwargs["b_up"], kwargs["b_down"])


def test_activations_and_their_derivatives_match_torch():
    g = torch.cat([torch.linspace(-12, 12, 2001, dtype=torch.float64), torch.tensor([0.0, -100.0, 100.0]).double()])
    for act in ACTIVATIONS:
        gg = g.clone().requires_grad_()
        want = _torch_act(gg, act)
        (want_grad,) = torch.autograd.grad(want.sum(), gg)
        torch.testing.assert_close(activation(g, act), want.detach(), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(activation_grad(g, act), want_grad, rtol=1e-12, atol=1e-13)
        dy = torch.randn_like(g)
        torch.testing.assert_close(_act_backward(dy, g, act), dy * activation_grad(g, act), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_reference_gradcheck(act):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    p = [t.double().detach().requires_grad_() for t in _params(7, 10, 5, torch.float64) if t is not None]
    f = lambda x, *p: _call(gptfast.gated_ffn, x, p, act, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, *p))
    wgu, bgu = torch.randn(20, 7, dtype=torch.float64, requires_grad=True), torch.randn(20, dtype=torch.float64,
                                                                                         requires_grad=True)
    fused = lambda x, w, b, wd: gptfast.gated_ffn(x, w, None, wd, act, b, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fused, (x, wgu, bgu, p[2]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eager_functions", [True, False], ids=["eager", "custom_op"])
def test_backward_saves_x_g_u_and_the_weights_never_the_product(backend, eager_functions, monkeypatch, seed):
    monkeypatch.setattr(_common, "EAGER_FUNCTIONS", eager_functions)
    x = torch.randn(10, 16, requires_grad=True)
    wg, wu, wd, bg, bu, bd = _params(16, 24, 8, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = gptfast.gated_ffn(x, wg, wu, wd, "silu", bg, bu, bd, backend=backend)
    g, u = F.linear(x, wg, bg).detach(), F.linear(x, wu, bu).detach()
    a = F.silu(g) * u
    hidden = [t for t in saved if tuple(t.shape) == (10, 24)]
    assert len(hidden) == 2, [tuple(t.shape) for t in saved]  # g and u, nothing else of (M, H)
    assert_close(hidden[0], g, atol=1e-5, name="saved g")
    assert_close(hidden[1], u, atol=1e-5, name="saved u")
    assert not any(torch.allclose(t, a) for t in hidden)
    assert sorted(tuple(t.shape) for t in saved) == sorted([(10, 16), (10, 24), (10, 24), (24, 16), (24, 16), (8, 24)])
    y.sum().backward()
    assert x.grad is not None and bd.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_path_and_custom_op_agree_bit_for_bit(backend, monkeypatch, seed):
    x = torch.randn(5, 40, requires_grad=True)
    p = _params(40, 64, 24, torch.float32)
    wgu = torch.randn(128, 40, requires_grad=True)
    dy = torch.randn(5, 24)

    def run():
        y1 = _call(gptfast.gated_ffn, x, p, "gelu_tanh", backend=backend)
        y2 = gptfast.gated_ffn(x, wgu, None, p[2], "silu", backend=backend)
        return (y1, y2, *torch.autograd.grad((y1, y2), [x, wgu] + p, (dy, dy)))

    eager = run()
    monkeypatch.setattr(_common, "EAGER_FUNCTIONS", False)
    for a, b in zip(eager, run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", gptfast.available_backends("gated_ffn", device="cpu"))  # triton too: fp32
def test_opcheck(backend, seed):
    x = torch.randn(6, 24, requires_grad=True)
    wg, wu, wd, bg, bu, bd = _params(24, 40, 16, torch.float32)
    out, g, u = ops.gated_ffn_fwd(x, wg, bg, wu, bu, wd, bd, "silu", backend)
    d = lambda t: torch.randn_like(t).detach()  # noqa: E731
    nog = lambda *ts: [t.detach() for t in ts]  # noqa: E731
    for op, args in [(ops.gated_ffn_fwd, (x, wg, bg, wu, bu, wd, bd, "silu", backend)),
                     (ops.gated_ffn_fwd, (x, wg, None, wu.t().contiguous().t(), None, wd, None, "gelu", backend)),
                     (ops.gated_ffn_fwd, (x, wg, None, wu, bu, wd, None, "gelu_tanh", backend)),
                     (ops.gated_ffn_bwd, (d(out), *nog(x, g, u, wg, wu, wd), True, False, True, "silu", backend)),
                     (ops.gated_ffn_bwd, (d(out), *nog(x, g, u, wg, wu, wd), False, True, False, "gelu", backend))]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", gptfast.available_backends("gated_ffn", device="cpu"))
def test_compiles_fullgraph_and_matches_eager(backend, seed):
    torch._dynamo.reset()
    x = torch.randn(2, 6, 32, requires_grad=True)
    wg, wu, wd, bg, bu, bd = _params(32, 48, 32, torch.float32)
    wgu = torch.randn(96, 32, requires_grad=True)

    def f(x, wg, wu, wd, bd, wgu):
        y = gptfast.gated_ffn(x, wg, wu, wd, "silu", b_down=bd, backend=backend)
        return (gptfast.gated_ffn(y, wgu, None, wd, "gelu_tanh", backend=backend) * x).sum()

    args = (x, wg, wu, wd, bd, wgu)
    want = f(*args)
    g_want = torch.autograd.grad(want, args)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    g_got = torch.autograd.grad(got, args)
    assert_close(got, want, atol=1e-4, name="loss")
    for a, b in zip(g_got, g_want):
        assert_close(a, b, atol=1e-4, name="grad")


class LlamaStyleMLP(nn.Module):  # Hugging Face's LlamaMLP structure, written out
    def __init__(self, c, h, act=F.silu, bias=False):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(c, h, bias=bias), nn.Linear(c, h, bias=bias)
        self.down_proj = nn.Linear(h, c, bias=bias)
        self.act = act

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("bias", [False, True])
def test_nn_gated_ffn_loads_a_llama_mlp_state_dict(bias, seed):
    theirs = LlamaStyleMLP(24, 40, bias=bias)
    ours = gptfast.nn.GatedFFN(24, 40, bias=bias)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 24, requires_grad=True)
    torch.testing.assert_close(ours(x), theirs(x))
    g = torch.autograd.grad(ours(x).sum(), [x] + list(ours.parameters()))
    g_t = torch.autograd.grad(theirs(x).sum(), [x] + list(theirs.parameters()))
    for a, b in zip(g, g_t):
        torch.testing.assert_close(a, b)
    fused = gptfast.nn.GatedFFN(24, 40, out_features=24, bias=bias, fused=True)
    assert set(fused.state_dict()) == {f"{n}.{p}" for n in ("gate_up_proj", "down_proj")
                                       for p in (("weight", "bias") if bias else ("weight",))}
    assert fused.gate_up_proj.weight.shape == (80, 24)
    with torch.no_grad():
        fused.gate_up_proj.weight.copy_(torch.cat([theirs.gate_proj.weight, theirs.up_proj.weight]))
        fused.down_proj.weight.copy_(theirs.down_proj.weight)
        if bias:
            fused.gate_up_proj.bias.copy_(torch.cat([theirs.gate_proj.bias, theirs.up_proj.bias]))
            fused.down_proj.bias.copy_(theirs.down_proj.bias)
    torch.testing.assert_close(fused(x), theirs(x))
    gemma = gptfast.nn.GatedFFN(24, 40, out_features=8, activation="gelu_tanh")
    assert gemma(x).shape == (3, 5, 8) and "activation='gelu_tanh'" in repr(gemma)
    assert "fused=True" in repr(fused)
    with pytest.raises(ValueError, match="activation must be one of"):
        gptfast.nn.GatedFFN(24, 40, activation="relu")


def test_a_native_build_without_the_kernel_raises_not_implemented():
    # an extension built before gated_ffn existed: its launchers say so by name
    import types

    from gptfast.ops import _native
    launchers = _native.NativeLaunchers.__new__(_native.NativeLaunchers)
    launchers.backend, launchers.ext = "cuda", types.SimpleNamespace()
    a = _bad()
    with pytest.raises(NotImplementedError, match="the 'cuda' backend has no gated_ffn kernel"):
        launchers.gated_ffn_forward(a["x"], a["w_gate"], None, a["w_up"], None, a["w_down"], None, "silu")
    with pytest.raises(NotImplementedError, match="gptfast.gated_ffn"):
        launchers.gated_ffn_backward(None, a["x"], None, None, a["w_gate"], a["w_up"], a["w_down"], False, False,
                                     False, "silu")
