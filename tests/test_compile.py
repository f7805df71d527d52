"""torch.compile-safety: the ops are torch.library custom ops with fake and autograd registrations.

``torch.library.opcheck`` checks each registration (schema, fake tensor metadata, autograd, AOT
dispatch with dynamic shapes) for every backend that runs on the CPU; the tiny GPT compiled with
``fullgraph=True`` (no graph breaks allowed) gives the eager model's loss and gradients.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gptfast
from gptfast.model import GPT, GPTConfig
from gptfast.testing import assert_close

CPU_BACKENDS = gptfast.available_backends(device="cpu")  # includes triton under TRITON_INTERPRET=1
ops = torch.ops.gptfast


def _t(*shape, grad=True, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _opcheck_cases(backend):
    q, k, v = _t(2, 5, 3, 16), _t(2, 5, 3, 16), _t(2, 5, 3, 16)
    plain = (-1, 0, 0.0, None, 0.0, None)  # window, softcap, alibi_slopes, dropout_p, rng_state
    out, lse = ops.attention_fwd(q, k, v, True, 0.25, *plain, False, backend)
    x, w, b = _t(6, 24), _t(24), _t(24)
    y, mean, rstd = ops.layer_norm_fwd(x, w, b, 1e-5, backend)
    r = _t(6, 24)
    yr, mean_r, rstd_r, s = ops.layer_norm_residual_fwd(x, r, w, b, 1e-5, backend)
    xf, w1, b1, w2, b2 = _t(6, 24), _t(40, 24), _t(40), _t(24, 40), _t(24)
    of, h = ops.gelu_ffn_fwd(xf, w1, b1, w2, b2, "tanh", backend)
    d = lambda t: torch.randn_like(t).detach()  # noqa: E731
    nog = lambda *ts: [t.detach() for t in ts]  # noqa: E731
    return [
        (ops.attention_fwd, (q, k, v, True, 0.25, *plain, False, backend)),
        (ops.attention_fwd, (q, k, v, False, 0.5, -1, -1, 0.0, None, 0.0, None, True, backend)),
        (ops.attention_bwd, (d(out), *nog(q, k, v, out, lse), True, 0.25, *plain, False, backend)),
        (ops.layer_norm_fwd, (x, w, b, 1e-5, backend)),
        (ops.layer_norm_fwd, (x, None, None, 1e-5, backend)),
        (ops.layer_norm_bwd, (d(y), *nog(x, w, mean, rstd), True, None, backend)),
        (ops.layer_norm_residual_fwd, (x, r, w, b, 1e-5, backend)),
        (ops.layer_norm_residual_fwd, (x, r, None, None, 1e-5, backend)),
        (ops.layer_norm_bwd, (d(yr), *nog(s, w, mean_r, rstd_r), True, d(s), backend)),
        (ops.gelu_ffn_fwd, (xf, w1, b1, w2, b2, "tanh", backend)),
        (ops.gelu_ffn_fwd, (xf, w1, None, w2.t().contiguous().t(), None, "none", backend)),
        (ops.gelu_ffn_bwd, (d(of), *nog(xf, h, w1, w2), True, False, "tanh", backend)),
    ]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend, seed):
    for op, args in _opcheck_cases(backend):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", ["reference"] + [b for b in CPU_BACKENDS if b == "cpu"])
def test_opcheck_attention_options(backend, seed):
    # GQA, unequal lengths, a window, softcap, ALiBi and dropout: the schema's optional inputs
    q, k, v = _t(2, 4, 6, 16), _t(2, 7, 2, 16), _t(2, 7, 2, 16)
    slopes = torch.rand(6)
    rng = torch.tensor([1234, 8], dtype=torch.int64)
    args = (3, 1, 30.0, slopes, 0.2, rng, False, backend)
    out, lse = ops.attention_fwd(q, k, v, False, 0.25, *args)
    torch.library.opcheck(ops.attention_fwd, (q, k, v, False, 0.25, *args))
    torch.library.opcheck(ops.attention_bwd, (torch.randn_like(out), *(t.detach() for t in (q, k, v, out, lse)),
                                              False, 0.25, *args))


TINY = GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32)


def _loss_and_grads(model, idx, compiled):
    fn = torch.compile(model, fullgraph=True, backend=compiled) if compiled else model
    _, loss = fn(idx[:, :-1], idx[:, 1:])
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss, grads


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_compiled_gpt_matches_eager(backend, seed):
    """fullgraph=True: a graph break fails the compile. Inductor compiles the rest of the model."""
    torch._dynamo.reset()
    model = GPT(TINY)
    idx = torch.randint(0, 64, (3, 33))
    with gptfast.use_backend(backend):
        loss_e, grads_e = _loss_and_grads(model, idx, None)
        loss_c, grads_c = _loss_and_grads(model, idx, "inductor")
    assert_close(loss_c, loss_e, atol=1e-5, name="loss")
    for (name, _), a, b in zip(model.named_parameters(), grads_c, grads_e):
        assert_close(a, b, atol=1e-5, name=name)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_attention_dropout_compiles_fullgraph(backend, seed):
    """The dropout key is drawn with tensor ops (gptfast.ops._philox.dropout_rng_state), so a
    compiled call with dropout has no graph break. Under aot_eager the draw runs on torch's
    generator as in eager: the same seed gives the eager result bit for bit, forward and backward."""
    q, k, v = (torch.randn(2, 9, 4, 16, requires_grad=True) for _ in range(3))
    kw = dict(causal=True, dropout_p=0.3, backend=backend)

    def fn(q, k, v):
        return gptfast.attention(q, k, v, **kw)

    results = []
    for compiled in (None, "aot_eager"):
        torch._dynamo.reset()
        f = torch.compile(fn, fullgraph=True, backend=compiled) if compiled else fn
        torch.manual_seed(21)
        out = f(q, k, v)
        results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
        torch.manual_seed(22)
        assert not torch.equal(f(q, k, v), out), "another seed, another mask"
    for a, b in zip(*results):
        assert torch.equal(a, b)
    no_drop = gptfast.attention(q, k, v, causal=True, backend=backend)
    assert not torch.allclose(results[0][0], no_drop, atol=1e-3)


def test_gpt_with_attention_dropout_compiles_fullgraph_with_inductor(seed):
    """Training a GPT with attention dropout under torch.compile(fullgraph=True): inductor draws the
    keys from its own generator, so the loss is reproducible under torch.manual_seed, not equal to
    eager's."""
    torch._dynamo.reset()
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, attn_dropout=0.2))
    model.train()
    idx = torch.randint(0, 64, (3, 33))
    compiled = torch.compile(model, fullgraph=True)
    losses = []
    for s in (5, 5, 6):
        torch.manual_seed(s)
        _, loss = compiled(idx[:, :-1], idx[:, 1:])
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == losses[1] and losses[0] != losses[2]
    model.eval()
    _, eval_loss = model(idx[:, :-1], idx[:, 1:])
    assert eval_loss.item() != losses[0]


def test_compiled_model_follows_backend_selection_at_run_time(seed, monkeypatch):
    """The backend is picked when the op runs, so use_backend applies to an already-compiled model."""
    import importlib
    ln_module = importlib.import_module("gptfast.ops.layer_norm")
    calls = []
    real = ln_module.layer_norm_forward_reference
    monkeypatch.setattr(ln_module, "layer_norm_forward_reference",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    from gptfast.ops import _backend
    monkeypatch.setattr(_backend, "_LOADED", {})
    torch._dynamo.reset()
    model = GPT(TINY)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    idx = torch.randint(0, 64, (2, 8))
    compiled(idx)  # auto: whatever runs first on this machine
    calls.clear()
    with gptfast.use_backend("reference"):
        compiled(idx)
    assert len(calls) == 2 * TINY.n_layer + 1, "every LayerNorm ran on the reference backend"


def test_no_graph_breaks_in_gpt():
    torch._dynamo.reset()
    model = GPT(TINY)
    explanation = torch._dynamo.explain(model)(torch.randint(0, 64, (2, 8)))
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_compiled_patched_nanogpt_matches_eager(backend, seed):
    """A nanoGPT-style model patched by gptfast.patch compiles with fullgraph=True (aot_eager:
    dynamo and AOT autograd trace everything, without inductor's code generation) and matches eager."""
    from test_patch import Cfg, NanoGPT, batch

    torch._dynamo.reset()
    model = NanoGPT(Cfg())
    report = gptfast.patch(model, backend=backend)
    assert report.patched and not report.skipped, str(report)
    idx, targets = batch()
    _, loss_e = model(idx, targets)
    grads_e = torch.autograd.grad(loss_e, list(model.parameters()))
    _, loss_c = torch.compile(model, fullgraph=True, backend="aot_eager")(idx, targets)
    grads_c = torch.autograd.grad(loss_c, list(model.parameters()))
    assert_close(loss_c, loss_e, atol=1e-5, name="loss")
    for (name, _), a, b in zip(model.named_parameters(), grads_c, grads_e):
        assert_close(a, b, atol=1e-5, name=name)


def _train_losses(model, steps, idx_of, loss_of, compiled: bool):
    """Losses of ``steps`` AdamW steps from one seed; with ``compiled``, the model is compiled
    fullgraph (aot_eager) and the number of graphs dynamo built after the first step is returned."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    run = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, graphs_after_first = [], None
    torch.manual_seed(3)
    for step in range(steps):
        loss = loss_of(run, idx_of(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step == 0:
            graphs_after_first = counters["stats"]["unique_graphs"]
    return losses, counters["stats"]["unique_graphs"] - graphs_after_first


def _assert_compiled_training_matches_eager(make_model, idx_of, loss_of):
    eager, _ = _train_losses(make_model(), 20, idx_of, loss_of, compiled=False)
    compiled, new_graphs = _train_losses(make_model(), 20, idx_of, loss_of, compiled=True)
    assert new_graphs == 0, f"{new_graphs} recompiles after the first step"
    # dropout draws the same random numbers compiled and eager (aot_eager runs the eager RNG ops)
    np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-5)
    assert len(set(eager)) == len(eager)  # the steps changed the model


def test_patched_nanogpt_with_dropout_trains_compiled_without_recompiles():
    """nanoGPT's shakespeare-char recipe compiles a model with dropout: 20 training steps of the
    patched model compiled fullgraph, no recompile after the first, the same losses as eager."""
    from test_patch import Cfg, NanoGPT, batch

    def make():
        torch.manual_seed(0)
        model = NanoGPT(Cfg(dropout=0.1))
        report = gptfast.patch(model, backend="cpu")
        assert len(report.patched) == 9 and not report.skipped, str(report)
        return model.train()

    _assert_compiled_training_matches_eager(
        make, lambda step: batch(b=4, t=16, seed=step)[0],
        lambda model, idx: model(idx, idx.roll(1, dims=1))[1])


def test_patched_hf_gpt2_default_config_trains_compiled_without_recompiles():
    transformers = pytest.importorskip("transformers", reason="needs transformers (pip install 'gptfast[hf]')")

    def make():
        torch.manual_seed(0)  # GPT-2's default dropouts (0.1 on attention, residual, embeddings)
        config = transformers.GPT2Config(vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=4)
        model = transformers.GPT2LMHeadModel(config)
        report = gptfast.patch(model, backend="cpu")
        assert len(report.patched) == 9 and not report.skipped, str(report)
        return model.train()

    def loss_of(model, idx):  # (HF's own loss warns through logging on its first call: dynamo refuses that)
        logits = model(idx).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx.roll(1, dims=1)[:, 1:].flatten())

    _assert_compiled_training_matches_eager(
        make, lambda step: torch.randint(0, 61, (4, 16), generator=torch.Generator().manual_seed(step)), loss_of)


def test_hf_fallback_under_compile_neither_breaks_the_graph_nor_recompiles():
    """A call gptfast hands to sdpa (here a custom 4-D mask) compiles into the graph; the fallback
    counter is not touched under compile, so nothing dynamo guards on changes between calls."""
    transformers = pytest.importorskip("transformers", reason="needs transformers (pip install 'gptfast[hf]')")
    import gptfast.hf
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    gptfast.patch(model, backend="cpu")
    torch._dynamo.reset()
    counters.clear()
    gptfast.hf.fallbacks.clear()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    band = torch.ones(8, 8, dtype=torch.bool).tril() & ~torch.ones(8, 8, dtype=torch.bool).tril(-3)
    for step in range(4):
        idx = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(step))
        mask = torch.zeros(2, 1, 8, 8).masked_fill(~band, torch.finfo(torch.float32).min)
        got = compiled(idx, attention_mask=mask).logits
        if step == 0:
            graphs = counters["stats"]["unique_graphs"]
        assert gptfast.hf.fallbacks == {}
        want = model(idx, attention_mask=mask).logits  # eager: the fallback is counted
        assert sum(gptfast.hf.fallbacks.values()) == 2
        assert_close(got, want, atol=1e-5, name="logits")
        gptfast.hf.fallbacks.clear()
    assert counters["stats"]["unique_graphs"] == graphs
