"""gptfast.layer_norm's fused residual add (``residual=``, ``prenorm=``, ``residual_in_fp32=``) on
every CPU backend against the unfused computation (the add, then LayerNorm), its arguments'
errors, the eager and custom-op paths, torch.compile, and gptfast.model.Block's use of it.

Numerics: the fused op normalises s = x + r rounded once to the stream's dtype, exactly what the
unfused ``layer_norm(x + r)`` does, so its ground truth is the float64 LayerNorm of that rounded s
and DESIGN.md's rule applies with PyTorch's unfused result in the tested dtype as ``pt``.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import gptfast
from gptfast.ops import _backend, _common
from gptfast.testing import assert_results_match, layer_norm_magnitudes

CPU = torch.device("cpu")
BACKENDS = [b for b in ("reference", "cpu") if b in gptfast.available_backends("layer_norm", "cpu")]
if os.environ.get("TRITON_INTERPRET") == "1" and "triton" in gptfast.available_backends("layer_norm", "cpu"):
    BACKENDS.append("triton")


def _inputs(shape, dtype, affine=(True, True), seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = (torch.randn(shape, generator=g) * 2 + 1).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype)
    w = (torch.randn(n, generator=g) + 1).to(dtype) if affine[0] else None
    b = torch.randn(n, generator=g).to(dtype) if affine[1] else None
    return x, r, w, b


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def _unfused(x, r, w, b):
    s = x + r
    return F.layer_norm(s, (s.shape[-1],), w, b, 1e-5), s


def _fwd_bwd(fn, leaves, gy, gs):
    y, s = fn(*leaves)
    torch.autograd.backward([y, s], [gy.to(y.dtype), gs.to(s.dtype)])
    return y.detach(), s.detach(), [None if t is None else t.grad for t in leaves]


def _dtypes(backend):
    if backend == "triton":
        return [torch.float32, torch.float16]  # the interpreter has no bf16
    return [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,affine", [((3, 7, 48), (True, True)), ((1, 33), (False, False)),
                                          ((5, 100), (True, False))], ids=["3d", "no-affine", "no-bias"])
def test_fused_residual_matches_the_add_then_layer_norm(backend, shape, affine):
    for dtype in _dtypes(backend):
        x, r, w, b = _inputs(shape, dtype, affine)
        g = torch.Generator().manual_seed(5)
        gy, gs = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        fused = _fwd_bwd(lambda x, r, w, b: gptfast.layer_norm(x, w, b, residual=r, prenorm=True, backend=backend),
                         _leaves(x, r, w, b), gy, gs)
        pt = _fwd_bwd(_unfused, _leaves(x, r, w, b), gy, gs)
        s64 = (x.double() + r.double()).to(dtype).double()  # the stream as rounded, as both compute it
        ref = _fwd_bwd(lambda s, w, b: _unfused(s, torch.zeros_like(s), w, b), _leaves(s64, *(
            None if t is None else t.double() for t in (w, b))), gy.double(), gs.double())
        assert fused[0].dtype == fused[1].dtype == dtype
        assert torch.equal(fused[1], pt[1]), f"{dtype}: s must be x + r rounded once"
        mags = layer_norm_magnitudes(s64, *(None if t is None else t.double() for t in (w, b)), gy.double())
        mags[1] = mags[1] + float(gs.abs().max())  # dx = dLN + ds
        ref_g = [ref[2][0], ref[2][0], *ref[2][1:]]
        assert_results_match(fused[0], ref[0], pt[0], fused[2][:2] + fused[2][2:], ref_g, pt[2],
                             magnitudes=[mags[0], mags[1], mags[1], mags[2], mags[3]], name=f"{backend} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_prenorm_only_y_is_returned_and_its_backward_has_no_stream_gradient(backend, monkeypatch):
    x, r, w, b = _leaves(*_inputs((4, 32), torch.float32))
    seen = []
    real = _backend.resolve("layer_norm", CPU, torch.float32, backend)

    def spy_bwd(*args, **kwargs):
        seen.append(kwargs.get("dresidual"))
        return real.bwd(*args, **kwargs)

    monkeypatch.setitem(_backend._LOADED, ("layer_norm", real.backend),
                        _backend.Launchers(real.backend, real.fwd, spy_bwd))
    _backend._RESOLVED.clear()
    y = gptfast.layer_norm(x, w, b, residual=r, backend=backend)
    assert isinstance(y, torch.Tensor)
    y.sum().backward()
    assert seen == [None]  # s was not used: no zero tensor for its gradient
    y2, _ = _unfused(*_leaves(x, r, w, b))
    torch.testing.assert_close(y, y2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, r.grad)
    y, s = gptfast.layer_norm(x, w, b, residual=r, prenorm=True, backend=backend)
    (y.sum() + s.sum()).backward()
    assert seen[1] is not None and seen[1].shape == (4, 32)
    _backend._RESOLVED.clear()


def test_prenorm_without_residual_returns_x_as_the_stream():
    x, _, w, b = _inputs((2, 3, 16), torch.bfloat16)
    y, s = gptfast.layer_norm(x, w, b, prenorm=True, backend="reference")
    assert s is x and torch.equal(y, gptfast.layer_norm(x, w, b, backend="reference"))
    y, s = gptfast.layer_norm(x, w, b, prenorm=True, residual_in_fp32=True, backend="reference")
    assert s.dtype == torch.float32 and torch.equal(s, x.float()) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_float32_stream_under_16_bit_activations(backend):
    """residual_in_fp32 (or a float32 residual): the stream stays fp32, y is x's dtype, and the
    result is the float32 computation's rounded once."""
    dtype = torch.float16 if backend == "triton" else torch.bfloat16
    x, r, w, b = _inputs((6, 40), dtype)
    for r_in, flag in ((r, True), (r.float(), False)):
        y, s = gptfast.layer_norm(x, w, b, residual=r_in, prenorm=True, residual_in_fp32=flag, backend=backend)
        assert s.dtype == torch.float32 and y.dtype == dtype
        s32 = x.float() + r.float()
        assert torch.equal(s, s32)
        y32 = F.layer_norm(s32, (40,), w.float(), b.float(), 1e-5)
        torch.testing.assert_close(y, y32.to(dtype), atol=0, rtol=0) if backend == "reference" else \
            torch.testing.assert_close(y.float(), y32, atol=2e-2, rtol=2e-2)
    xl, rl, wl, bl = _leaves(x, r.float(), w, b)  # gradients reach the 16-bit x and the fp32 stream
    y, s = gptfast.layer_norm(xl, wl, bl, residual=rl, prenorm=True, backend=backend)
    (y.float().sum() + s.sum()).backward()
    assert xl.grad.dtype == dtype and rl.grad.dtype == torch.float32
    torch.testing.assert_close(xl.grad.float(), rl.grad, atol=1e-2, rtol=1e-2)


def test_autocast_runs_in_float32_like_pytorchs_layer_norm():
    x, r, w, b = _inputs((4, 24), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = gptfast.layer_norm(x.bfloat16(), w, b, residual=r, prenorm=True, backend="reference")
        y_pt = F.layer_norm(x.bfloat16().float() + r, (24,), w, b)
    assert y.dtype == s.dtype == torch.float32
    torch.testing.assert_close(y, y_pt, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad, error, match", [
    (lambda x: x[:, :-1], ValueError, r"residual must have shape \(4, 16\)"),
    (lambda x: x.to(torch.float16), TypeError, "residual has dtype torch.float16"),
    (lambda x: x.to(torch.int64), TypeError, "residual has dtype torch.int64"),
    (lambda x: x.to("meta"), ValueError, "residual is on meta"),
    (lambda x: x.tolist(), TypeError, "residual must be a torch.Tensor"),
])
def test_bad_residual_names_the_argument(bad, error, match):
    x, r, w, b = _inputs((4, 16), torch.bfloat16)
    with pytest.raises(error, match=match):
        gptfast.layer_norm(x, w, b, residual=bad(r), backend="reference")


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_path_and_custom_op_agree_bit_for_bit(backend, monkeypatch):
    x, r, w, b = _inputs((3, 5, 32), torch.float32)
    g = torch.Generator().manual_seed(3)
    gy, gs = torch.randn(3, 5, 32, generator=g), torch.randn(3, 5, 32, generator=g)

    def fused(x, r, w, b):
        return gptfast.layer_norm(x, w, b, residual=r, prenorm=True, backend=backend)

    eager = _fwd_bwd(fused, _leaves(x, r, w, b), gy, gs)
    monkeypatch.setattr(_common, "EAGER_FUNCTIONS", False)
    custom = _fwd_bwd(fused, _leaves(x, r, w, b), gy, gs)
    for a, c in zip(eager[:2] + tuple(eager[2]), custom[:2] + tuple(custom[2])):
        assert torch.equal(a, c)


def test_compiles_fullgraph_and_matches_eager():
    torch._dynamo.reset()
    x, r, w, b = _inputs((2, 8, 32), torch.float32)

    def step(x, r, w, b):
        y, s = gptfast.layer_norm(x, w, b, residual=r, prenorm=True, backend="reference")
        return (y * 2 + s).sum()

    leaves = _leaves(x, r, w, b)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled(*leaves).backward()
    grads = [t.grad.clone() for t in leaves]
    leaves2 = _leaves(x, r, w, b)
    step(*leaves2).backward()
    for a, c in zip(grads, leaves2):
        torch.testing.assert_close(a, c.grad, atol=1e-6, rtol=1e-6)


def test_gpt_blocks_fuse_every_residual_add_into_a_layer_norm(monkeypatch):
    """Each LayerNorm after the first reads the residual stream through residual= (2 per block:
    ln_2 and the next block's ln_1 / ln_f), and the model equals its unfused self."""
    from gptfast import GPT, GPTConfig
    from gptfast.bench import eagerize
    torch.manual_seed(0)
    config = GPTConfig.from_preset("tiny", n_layer=2, block_size=16)
    model, plain = GPT(config), GPT(config)
    plain.load_state_dict(model.state_dict())
    eagerize(plain)
    import gptfast.nn as gnn
    calls = []
    real = gnn.layer_norm
    monkeypatch.setattr(gnn, "layer_norm", lambda *a, **k: calls.append(k.get("residual") is not None) or real(*a, **k))
    idx = torch.randint(0, config.vocab_size, (2, 16))
    with gptfast.use_backend("reference"):
        loss = model(idx, idx)[1]
        loss.backward()
    assert calls == [False] + [True] * (2 * config.n_layer)
    plain_loss = plain(idx, idx)[1]
    plain_loss.backward()
    assert abs(loss.item() - plain_loss.item()) < 1e-5
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
