"""gptfast.patch on a nanoGPT-style model (bench/nanogpt.py) and on Hugging Face GPT-2 built from a config.

Numerics follow DESIGN.md's rule: ``ref`` is the unpatched model in float64, ``pt`` the unpatched
model in the tested precision, ``out`` the patched one; max|out-ref| <= 2*max|pt-ref| + atol for
logits, 3x for every parameter gradient.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from gptfast.patch import PatchReport, patch, unpatch
from gptfast.testing import assert_within_pytorch_error

from bench.nanogpt import MLP, NanoConfig as Cfg, NanoGPT  # the nanoGPT-structured model


# ------------------------------------------------------------------------------- helpers


def batch(vocab=61, b=3, t=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g), torch.randint(0, vocab, (b, t), generator=g)


def logits_and_grads(model, idx, targets, dtype=None, call=None):
    """logits and {name: grad} after backward of a random-weighted logit sum plus the loss."""
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
    with ctx:
        logits = call(model, idx) if call else model(idx)[0]
    g = torch.Generator().manual_seed(1)
    upstream = torch.randn(logits.shape, generator=g, dtype=torch.float64).to(logits.dtype)
    (logits * upstream).sum().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def compare(patched, plain, idx, targets, dtype=None, call=None, atol=1e-5):
    ref_model = copy.deepcopy(plain).double()
    ref_logits, ref_grads = logits_and_grads(ref_model, idx, targets, None, call)
    pt_logits, pt_grads = logits_and_grads(plain, idx, targets, dtype, call)
    out_logits, out_grads = logits_and_grads(patched, idx, targets, dtype, call)
    assert out_logits.dtype == pt_logits.dtype
    assert_within_pytorch_error(out_logits, ref_logits, pt_logits, factor=2, atol=atol, name="logits")
    assert ref_grads.keys() == out_grads.keys()
    for name in ref_grads:
        assert_within_pytorch_error(out_grads[name], ref_grads[name], pt_grads[name], factor=3, atol=atol,
                                    name=f"grad {name}")


def patched_copy(model, **kwargs):
    other = copy.deepcopy(model)
    return other, patch(other, **kwargs)


# ---------------------------------------------------------------------------- nanoGPT-style


@pytest.mark.parametrize("flash,bias", [(True, True), (False, False)], ids=["sdpa-bias", "masked-softmax-nobias"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_nanogpt_patched_matches_unpatched(flash, bias, dtype):
    torch.manual_seed(0)
    plain = NanoGPT(Cfg(flash=flash, bias=bias, gelu="none" if flash else "tanh"))
    patched, report = patched_copy(plain)
    assert {e.kind for e in report.patched} == {"layer_norm", "attention", "gelu_ffn"}
    assert len(report.patched) == 5 + 2 + 2 and not report.skipped, str(report)
    norms = [e.reason for e in report.patched if e.kind == "layer_norm"]
    assert norms == ["LayerNorm: checked to compute F.layer_norm (eps=1e-05)"] * 5, norms
    idx, targets = batch()
    # bf16: outputs and gradients are compared with the same relative rule; the atol only
    # covers gradients PyTorch itself gets (nearly) exactly right.
    compare(patched, plain, idx, targets, dtype, atol=1e-5 if dtype is None else 1e-3)


def test_patch_keeps_parameters_state_dict_and_optimizer_state():
    torch.manual_seed(0)
    model = NanoGPT(Cfg())
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx, targets = batch()
    model(idx, targets)[1].backward()
    opt.step()
    state_before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    patch(model)
    assert {n: p for n, p in model.named_parameters()}.items() == params.items()
    assert all(model.get_parameter(n) is p for n, p in params.items())
    assert list(model.state_dict()) == keys
    assert {id(p) for p in opt.state} == {id(p) for p in model.parameters()}
    for p, s in opt.state.items():  # untouched by patching, and still keyed by the live parameters
        assert all(torch.equal(v, state_before[id(p)][k]) for k, v in s.items())
    opt.zero_grad()
    model(idx, targets)[1].backward()
    opt.step()  # the optimizer keeps training the patched model
    assert all(p.grad is not None for p in model.parameters())


def test_unpatch_restores_the_original_forwards_exactly():
    torch.manual_seed(0)
    model = NanoGPT(Cfg())
    idx, _ = batch()
    before = model(idx)[0]
    report = patch(model)
    assert all("forward" in model.get_submodule(e.path).__dict__ for e in report.patched)
    assert unpatch(model) == len(report.patched)
    assert not any("forward" in m.__dict__ or "_gptfast_patch" in m.__dict__ for m in model.modules())
    assert torch.equal(model(idx)[0], before)
    assert unpatch(model) == 0


def test_patch_twice_reports_already_patched_and_deepcopy_works():
    torch.manual_seed(0)
    model = NanoGPT(Cfg())
    patch(model)
    again = patch(model)
    assert not again.patched and all(e.reason == "already patched" for e in again.skipped)
    clone = copy.deepcopy(model)  # the patched forwards are bound to the copy, not the original
    idx, _ = batch()
    assert torch.equal(clone(idx)[0], model(idx)[0])
    assert clone.transformer.h[0].attn.forward.args[0] is clone.transformer.h[0].attn


def test_report_table_and_ops_subset():
    torch.manual_seed(0)
    model = NanoGPT(Cfg())
    report = patch(model, ops=("layer_norm",))
    assert isinstance(report, PatchReport)
    assert [e.path for e in report.patched] == ["transformer.h.0.ln_1", "transformer.h.0.ln_2",
                                                "transformer.h.1.ln_1", "transformer.h.1.ln_2", "transformer.ln_f"]
    assert {e.reason for e in report.skipped} == {"'attention' not in ops", "'gelu_ffn' not in ops"}
    text = str(report)
    assert text.splitlines()[0] == "gptfast.patch: 5 patched, 4 skipped"
    row = next(line for line in text.splitlines() if line.startswith("transformer.h.1.mlp "))
    assert row.split(None, 3) == ["transformer.h.1.mlp", "gelu_ffn", "skipped", "'gelu_ffn' not in ops"]
    with pytest.raises(ValueError, match="ops must be a subset"):
        patch(model, ops=("softmax",))


def test_attention_dropout_runs_in_gptfast_attention_in_training(monkeypatch):
    import importlib
    gp = importlib.import_module("gptfast.patch")
    torch.manual_seed(0)
    plain = NanoGPT(Cfg(dropout=0.1))
    patched, report = patched_copy(plain)
    attn = [e for e in report.patched if e.kind == "attention"]
    assert len(attn) == 2 and all("attention dropout p=0.1" in e.reason for e in attn), str(report)
    seen = []
    real = gp.attention
    monkeypatch.setattr(gp, "attention", lambda *a, **kw: seen.append(kw["dropout_p"]) or real(*a, **kw))
    idx, _ = batch()
    patched.train()
    outs = []
    for _ in range(2):
        torch.manual_seed(5)
        outs.append(patched(idx)[0])
    state = patched.transformer.h[0].attn._gptfast_patch
    assert state.fallbacks == {} and seen == [0.1] * 4
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)  # one seed, one mask
    plain.eval(), patched.eval()  # no dropout: the same function
    eval_out = patched(idx)[0]
    assert seen[4:] == [0.0, 0.0]
    torch.testing.assert_close(eval_out, plain(idx)[0], atol=1e-5, rtol=1e-5)
    assert (outs[0] - eval_out).abs().max() > 1e-3  # training mode did drop


def test_unsupported_modules_are_skipped_with_a_reason():
    torch.manual_seed(0)
    model = NanoGPT(Cfg(causal=False))  # bidirectional attention with nanoGPT's structure
    model.transformer.h[0].mlp.gelu = nn.SiLU()
    model.transformer.h[1].mlp.c_gate = nn.Linear(32, 128)  # a gated MLP: not c_fc -> GELU -> c_proj
    model.extra_norm = nn.LayerNorm((4, 8))
    idx, _ = batch()
    before = model(idx)[0]
    report = patch(model)
    why = {e.path: e.reason for e in report.skipped}
    assert "does not compute causal attention" in why["transformer.h.0.attn"]
    assert "neither exact nor tanh GELU" in why["transformer.h.0.mlp"]
    assert "but also submodules ['c_gate']" in why["transformer.h.1.mlp"]
    assert "spans several dims" in why["extra_norm"]
    assert len(report.patched) == 5  # the single-dim LayerNorms
    for e in report.skipped:
        assert "forward" not in model.get_submodule(e.path).__dict__
    torch.testing.assert_close(model(idx)[0], before, atol=1e-5, rtol=1e-5)


def test_patched_nanogpt_trains_like_the_unpatched_one():
    """50 AdamW steps from the same seed, fp32. Tolerance: every step's loss within 1e-3 (absolute,
    nats) of the unpatched run's; measured max gap is printed (about 1e-6 on the CPU)."""
    losses = {}
    for patched in (False, True):
        torch.manual_seed(0)
        model = NanoGPT(Cfg(n_layer=2, n_embd=32))
        if patched:
            patch(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[patched] = []
        for step in range(50):
            idx, _ = batch(b=4, t=16, seed=step)
            targets = idx.roll(1, dims=1)  # predict the previous token: learnable, the loss must fall
            loss = model(idx, targets)[1]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[patched].append(loss.item())
    gap = max(abs(a - b) for a, b in zip(losses[False], losses[True]))
    print(f"patched vs unpatched nanoGPT, 50 steps: max |loss gap| {gap:.2e}, "
          f"loss {losses[False][0]:.3f} -> {losses[False][-1]:.3f}")
    assert losses[True][-1] < losses[True][0] - 1.0
    assert gap <= 1e-3


# ------------------------------------------------------------------------ Hugging Face GPT-2


def hf_model(impl="sdpa", activation="gelu_new", **overrides):
    transformers = pytest.importorskip("transformers", reason="Hugging Face tests need transformers "
                                                              "(pip install 'gptfast[hf]')")
    kw = dict(vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=4, activation_function=activation,
              attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    kw.update(overrides)
    config = transformers.GPT2Config(**kw)
    config._attn_implementation = impl
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", ".bias")):
                p.normal_(0.0 if ".bias" in name else 1.0, 0.2)
    return model


def hf_logits(model, idx, **kwargs):
    return model(idx, **kwargs).logits


@pytest.mark.parametrize("impl,activation,options", [
    ("sdpa", "gelu_new", {}),
    ("eager", "gelu", {"scale_attn_by_inverse_layer_idx": True}),
], ids=["sdpa-gelu_new", "eager-gelu-scaled"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_hf_gpt2_patched_matches_unpatched(impl, activation, options, dtype):
    plain = hf_model(impl, activation, **options)
    plain.train()  # dropout probabilities are 0: train mode must still take the fused paths
    patched, report = patched_copy(plain)
    kinds = sorted(e.kind for e in report.patched)
    assert kinds == ["attention"] * 2 + ["gelu_ffn"] * 2 + ["layer_norm"] * 5 and not report.skipped, str(report)
    idx, targets = batch()
    compare(patched, plain, idx, targets, dtype, call=hf_logits, atol=1e-5 if dtype is None else 1e-3)
    for block in patched.transformer.h:
        assert block.attn._gptfast_patch.fallbacks == {}, block.attn._gptfast_patch.fallbacks


def test_hf_reorder_and_upcast_attn_is_the_same_function():
    # HF's upcast path refuses float64, so no fp64 reference here: fp32 against fp32, tightly.
    plain = hf_model("eager", reorder_and_upcast_attn=True)
    patched, report = patched_copy(plain)
    assert "reorder_and_upcast_attn" in {e.path: e.reason for e in report.patched}["transformer.h.0.attn"]
    idx, targets = batch()
    want, want_grads = logits_and_grads(plain, idx, targets, call=hf_logits)
    got, got_grads = logits_and_grads(patched, idx, targets, call=hf_logits)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_hf_conv1d_weights_reach_the_kernels_as_views_not_copies(monkeypatch):
    import importlib
    gp = importlib.import_module("gptfast.patch")  # the module: gptfast.patch is the function

    model = hf_model()
    patch(model)
    seen = []
    real = gp.gelu_ffn

    def spy(x, w1, b1, w2, b2, **kw):
        seen.append((w1, w2))
        return real(x, w1, b1, w2, b2, **kw)

    monkeypatch.setattr(gp, "gelu_ffn", spy)
    model(batch()[0])
    mlp = model.transformer.h[0].mlp
    w1, w2 = seen[0]
    assert w1.data_ptr() == mlp.c_fc.weight.data_ptr() and w1.shape == mlp.c_fc.weight.t().shape
    assert w2.data_ptr() == mlp.c_proj.weight.data_ptr() and not w1.is_contiguous()


def test_hf_state_dict_and_parameters_unchanged_and_unpatch():
    model = hf_model()
    keys, params = list(model.state_dict()), list(model.parameters())
    idx, _ = batch()
    before = model(idx).logits
    patch(model)
    assert list(model.state_dict()) == keys and all(a is b for a, b in zip(model.parameters(), params))
    unpatch(model)
    assert torch.equal(model(idx).logits, before)


def padding_masks(idx):
    left, right, holes = (torch.ones_like(idx) for _ in range(3))
    left[0, :5] = 0
    left[2, :1] = 0
    right[1, 9:] = 0
    holes[0, 3] = holes[2, 7:9] = 0
    holes[1, :] = 0  # a row of padding only
    return {"left": left, "right": right, "holes": holes}


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_padding_masks_run_the_varlen_path(impl):
    plain = hf_model(impl).eval()
    patched, _ = patched_copy(plain)
    idx, targets = batch()
    attn = patched.transformer.h[0].attn._gptfast_patch
    # an all-ones mask is the causal mask: the dense path
    torch.testing.assert_close(patched(idx, attention_mask=torch.ones_like(idx)).logits,
                               plain(idx, attention_mask=torch.ones_like(idx)).logits, atol=1e-5, rtol=1e-5)
    for name, mask in padding_masks(idx).items():
        real = mask.bool()
        upstream = torch.randn(3, 17, 61, generator=torch.Generator().manual_seed(2))
        got, want = [], []
        for model, into in ((patched, got), (plain, want)):
            model.zero_grad(set_to_none=True)
            logits = model(idx, attention_mask=mask).logits
            (logits * upstream * real[..., None]).sum().backward()  # padded positions' outputs are discarded
            into.append(logits.detach()[real])
            into.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5, msg=name)
        for n in want[1]:
            torch.testing.assert_close(got[1][n], want[1][n], atol=1e-5, rtol=1e-4, msg=f"{name} grad {n}")
    assert attn.fallbacks == {}, attn.fallbacks


def test_hf_other_masks_and_output_attentions_fall_back():
    from gptfast.patch import _mask_keep
    t = 6
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    assert _mask_keep(causal.expand(2, 1, t, t).clone(), t, t) is True
    keep = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    padded = (causal & keep[:, None, :])[:, None]
    assert torch.equal(_mask_keep(padded, t, t), keep)
    bidirectional = torch.ones(2, 1, t, t, dtype=torch.bool)
    assert _mask_keep(bidirectional, t, t) is None
    window = (causal & ~torch.ones(t, t, dtype=torch.bool).tril(-3)).expand(2, 1, t, t).clone()
    assert _mask_keep(window, t, t) is None
    decode = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    decode[0, 0, 0, :2] = False
    assert torch.equal(_mask_keep(decode, 1, 9), decode[:, 0, 0])

    import gptfast.hf
    plain = hf_model("eager").eval()
    patched, _ = patched_copy(plain)
    idx, _ = batch()
    gptfast.hf.fallbacks.clear()
    t = idx.shape[1]
    band = torch.ones(t, t, dtype=torch.bool).tril() & ~torch.ones(t, t, dtype=torch.bool).tril(-3)
    float_window = torch.zeros(3, 1, t, t).masked_fill(~band, torch.finfo(torch.float32).min)
    torch.testing.assert_close(patched(idx, attention_mask=float_window).logits,
                               plain(idx, attention_mask=float_window).logits, atol=1e-5, rtol=1e-5)
    reason = "a 4-D attention mask (custom, packed, bidirectional, chunked or static-cache)"
    assert gptfast.hf.fallbacks == {reason: 2}  # one per layer
    gptfast.hf.fallbacks.clear()
    out = patched(idx, output_attentions=True)
    want = plain(idx, output_attentions=True)
    assert gptfast.hf.fallbacks == {"attention weights requested (output_attentions)": 2}
    assert len(out.attentions) == len(want.attentions) == 2
    for a, b in zip(out.attentions, want.attentions):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, want.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_generate_decodes_on_gptfast_with_the_kv_cache(impl, monkeypatch):
    import gptfast.hf as gp
    gp.fallbacks.clear()
    plain = hf_model(impl).eval()
    patched, _ = patched_copy(plain)
    shapes = []
    for fn in ("attention", "attention_varlen"):
        real = getattr(gp, fn)
        monkeypatch.setattr(gp, fn, lambda q, k, *a, _r=real, _f=fn, **kw: shapes.append((_f, q.shape[-3], k.shape[-3]))
                            or _r(q, k, *a, **kw))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    idx = batch(b=1, t=6)[0]
    assert torch.equal(patched.generate(idx, **kw), plain.generate(idx, **kw))
    layer0 = shapes[::2]  # two layers per step
    assert layer0 == [("attention", 6, 6)] + [("attention", 1, 6 + i) for i in range(1, 5)], layer0
    shapes.clear()
    idx = batch(b=3, t=7)[0]  # a left-padded batch: prefill and decode on the varlen path
    mask = torch.ones_like(idx)
    mask[0, :3] = mask[2, :1] = 0
    assert torch.equal(patched.generate(idx, attention_mask=mask, **kw),
                       plain.generate(idx, attention_mask=mask, **kw))
    assert shapes[::2] == [("attention_varlen", 3 * 7 - 4, 3 * 7 - 4)] + [
        ("attention_varlen", 3, 3 * (7 + i) - 4) for i in range(1, 5)], shapes[::2]
    assert gp.fallbacks == {}


def test_hf_attention_dropout_runs_on_gptfast_and_cross_attention_falls_back():
    import gptfast.hf
    gptfast.hf.fallbacks.clear()
    plain = hf_model(attn_pdrop=0.1, add_cross_attention=True)
    model, report = patched_copy(plain)
    why = {e.path: e.reason for e in report.patched}
    assert "attn_pdrop=0.1 in training mode runs in gptfast's kernels" in why["transformer.h.0.attn"]
    assert "attention interface" in why["transformer.h.0.crossattention"]
    encoder = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(6))
    model.eval(), plain.eval()
    torch.testing.assert_close(model(batch()[0], encoder_hidden_states=encoder).logits,
                               plain(batch()[0], encoder_hidden_states=encoder).logits, atol=1e-5, rtol=1e-5)
    # the encoder's (bidirectional) mask is one gptfast does not take apart: sdpa, per layer
    assert gptfast.hf.fallbacks == {"a 4-D attention mask (custom, packed, bidirectional, chunked or static-cache)": 2}
    gptfast.hf.fallbacks.clear()
    model.train()
    torch.manual_seed(4)
    first = model(batch()[0]).logits
    torch.manual_seed(4)
    assert torch.equal(model(batch()[0]).logits, first)  # gptfast's dropout: one seed, one mask
    assert gptfast.hf.fallbacks == {}
    model.eval()
    assert (model(batch()[0]).logits - first).abs().max() > 1e-3


def test_backend_is_checked_by_name_and_a_gpu_backend_may_patch_a_cpu_model():
    plain = NanoGPT(Cfg())
    with pytest.raises(ValueError, match="gptfast.patch: backend: unknown gptfast backend 'nope'"):
        patch(copy.deepcopy(plain), backend="nope")
    model, report = patched_copy(plain, backend="cuda")  # e.g. before model.to("cuda")
    assert not report.skipped and sorted(e.kind for e in report.patched) == (
        ["attention"] * 2 + ["gelu_ffn"] * 2 + ["layer_norm"] * 5), str(report)
    assert all(m._gptfast_patch.backend == "cuda" for m in model.modules() if hasattr(m, "_gptfast_patch"))
    if not torch.cuda.is_available():  # on the CPU the op says why when it runs
        with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu"):
            model(batch()[0])
    model, report = patched_copy(plain, backend="reference")  # a runnable pin: checked with it
    assert not report.skipped
    torch.testing.assert_close(model(batch()[0])[0], plain(batch()[0])[0], atol=1e-5, rtol=1e-5)


class HiddenDropoutMLP(MLP):
    """c_fc -> GELU -> dropout -> c_proj: the same function as MLP in eval mode, not in training."""

    def forward(self, x):
        return self.c_proj(self.dropout(self.gelu(self.c_fc(x))))


def test_mlp_dropout_placement_is_checked_in_training_mode():
    torch.manual_seed(0)
    model = NanoGPT(Cfg(dropout=0.1))
    model.transformer.h[0].mlp.__class__ = HiddenDropoutMLP
    report = patch(model)
    why = {e.path: e.reason for e in report.entries}
    assert "in training mode its forward does not compute c_fc -> GELU" in why["transformer.h.0.mlp"], str(report)
    assert "transformer.h.0.mlp" in {e.path for e in report.skipped}
    assert "transformer.h.1.mlp" in {e.path for e in report.patched}  # dropout after c_proj: as gptfast
    assert "forward" not in model.transformer.h[0].mlp.__dict__
    model.train()
    torch.manual_seed(1)
    idx, _ = batch()
    first = model(idx)[0]
    torch.manual_seed(1)
    torch.testing.assert_close(model(idx)[0], first, rtol=0, atol=0)


def test_hf_mlps_with_dropout_pass_the_training_check():
    transformers = pytest.importorskip("transformers", reason="needs transformers (pip install 'gptfast[hf]')")
    bloom = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=61, hidden_size=32, n_layer=1,
                                                                   n_head=4, hidden_dropout=0.1))
    gptj = transformers.GPTJForCausalLM(transformers.GPTJConfig(vocab_size=61, n_embd=32, n_layer=1, n_head=4,
                                                                rotary_dim=4, resid_pdrop=0.1))
    for model, path in ((bloom, "transformer.h.0.mlp"), (gptj, "transformer.h.0.mlp")):
        report = patch(model, ops=("gelu_ffn",))
        assert path in {e.path for e in report.patched}, str(report)
        mlp = model.get_submodule(path)
        mlp.train()
        x = torch.randn(2, 5, 32)
        args = (x, torch.randn(2, 5, 32)) if "bloom" in type(mlp).__module__ else (x,)
        torch.manual_seed(2)
        got = mlp(*args)
        torch.manual_seed(2)
        want = original_forward(mlp, *args)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # same dropout draws, same place


def original_forward(module, *args):
    from gptfast.patch import _call_original
    return _call_original(module, *args)
