"""gptfast.hf_direct: GPT-Neo, BLOOM and Falcon attention patched directly, against transformers.

Every family is built from a small config (2 layers, hidden 32, 4 heads, vocab 61) and compared
patched vs unpatched by DESIGN.md's rule: ``ref`` the unpatched model in float64, ``pt`` the
unpatched model in the tested precision (fp32, bf16 autocast, or bf16 parameters), ``out`` the patched one;
max|out-ref| <= 2*max|pt-ref| + atol for logits and loss, 3x for every parameter gradient. With
a left-padded batch only real positions are compared (no label predicted from padding): gptfast's outputs
at padded query rows are 0, transformers' are whatever its mask leaves there. Greedy generation
with the KV cache must give the same tokens, with every attention call on gptfast (the ops are
counted, the fallback counters stay empty); each fallback path is shown to fall back, counted,
with the original's result.
"""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="gptfast.hf_direct patches transformers models")

import gptfast  # noqa: E402
import gptfast.hf_direct as hf_direct  # noqa: E402
from gptfast.testing import assert_within_pytorch_error  # noqa: E402

transformers.logging.set_verbosity_error()

T = 11          # longer than GPT-Neo's local window below
WINDOW = 4
COMMON = dict(vocab_size=61, bos_token_id=1, eos_token_id=None, pad_token_id=None)


def _neo(**kw):
    cfg = transformers.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4,
                                    attention_types=[[["global", "local"], 1]], window_size=WINDOW,
                                    max_position_embeddings=64, **COMMON, **kw)
    return transformers.GPTNeoForCausalLM(cfg)


def _bloom(**kw):
    kw = {"hidden_size": 32, "n_head": 4, **kw}
    return transformers.BloomForCausalLM(transformers.BloomConfig(n_layer=2, **COMMON, **kw))


def _falcon(eager=False, **kw):
    kw = {"hidden_size": 32, "num_attention_heads": 4, **kw}
    model = transformers.FalconForCausalLM(transformers.FalconConfig(num_hidden_layers=2, **COMMON, **kw))
    if eager:  # FalconPreTrainedModel forces sdpa at construction; its attention reads this per call
        model.config._attn_implementation = "eager"
    return model


FAMILIES = {
    "gpt_neo": _neo,
    "bloom": _bloom,
    "falcon": _falcon,                                                     # rotary, multi_query
    "falcon-gqa": lambda **kw: _falcon(new_decoder_architecture=True, num_kv_heads=2, **kw),
    "falcon-mha": lambda **kw: _falcon(multi_query=False, **kw),
    "falcon-alibi": lambda **kw: _falcon(alibi=True, **kw),               # sdpa path: alibi once
    "falcon-alibi-eager": lambda **kw: _falcon(alibi=True, eager=True, **kw),  # eager path: alibi twice
}


def build(family, **kw):
    torch.manual_seed(0)
    return FAMILIES[family](**kw).eval()


def inputs(padded, b: int = 2, t: int = T):
    """ids and a mask: no padding (False), left padding (True or "left"), right padding ("right")."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 61, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    if padded in (True, "left"):
        mask[0, :3] = 0
        mask[1, :1] = 0
    elif padded == "right":
        mask[0, -3:] = 0
        mask[1, -1:] = 0
    return ids, mask


def patched(model):
    other = copy.deepcopy(model)
    report = gptfast.patch(other, backend="cpu")
    attn = [e for e in report.entries if e.kind == "attention"]
    assert len(attn) == 2 and all(e.action == "patched" for e in attn), str(report)
    return other


def fallbacks(model) -> dict:
    out = {}
    for m in model.modules():
        state = m.__dict__.get("_gptfast_patch")
        if state is not None and type(m).__name__ in hf_direct.DIRECT_ATTENTION:
            for k, v in state.fallbacks.items():
                out[k] = out.get(k, 0) + v
    return out


def logits_loss_grads(model, ids, mask, dtype):
    model.zero_grad(set_to_none=True)
    keep = mask.bool()
    # the loss shifts: position j's logits predict token j+1, so a padded position's logits
    # (whatever each implementation leaves there) must not predict the first real token either
    labels = ids.masked_fill(~keep, -100)
    labels[:, 1:].masked_fill_(~keep[:, :-1], -100)
    ctx = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
    with ctx:
        out = model(ids, attention_mask=mask, labels=labels)
    logits = out.logits[keep]                                       # real positions only
    g = torch.Generator().manual_seed(1)
    upstream = torch.randn(logits.shape, generator=g, dtype=torch.float64).to(logits.dtype)
    ((logits * upstream).sum() + out.loss).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("padded", [False, "left", "right"], ids=["nopad", "leftpad", "rightpad"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, "bf16-weights"], ids=["fp32", "bf16-autocast", "bf16-weights"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_matches_unpatched(family, dtype, padded):
    if family == "bloom" and padded == "left":
        pytest.skip("no float64 reference: transformers' BLOOM softmaxes in float32, where float64's mask minimum "
                    "is -inf, so left padding's fully masked rows give NaN that reaches every row through the "
                    "values (left padding is checked by test_generate_matches_unpatched and "
                    "test_alibi_with_holes_runs_on_gptfast)")
    check_against_reference(build(family), padded, dtype)


def check_against_reference(plain, padded, dtype, used=None):
    ids, mask = inputs(padded)
    ref = logits_loss_grads(copy.deepcopy(plain).double(), ids, mask, None)
    if dtype == "bf16-weights":  # bf16 parameters: BLOOM's and Falcon's alibi tensors are bf16 too
        plain, dtype = plain.bfloat16(), None
    fast = patched(plain)
    pt = logits_loss_grads(plain, ids, mask, dtype)
    out = logits_loss_grads(fast, ids, mask, dtype)
    assert fallbacks(fast) == {}
    assert out[0].dtype == pt[0].dtype
    assert_within_pytorch_error(out[0], ref[0], pt[0], factor=2, atol=1e-5, name="logits")
    # one scalar: PyTorch's own error on it can be small by chance; mean cross-entropy moves by at
    # most 2 * max|d logits| (its gradient per token has L1 norm <= 2), so bound it by ours
    loss_err = (out[1].double() - ref[1]).abs().item()
    assert loss_err <= 2 * (out[0].double() - ref[0]).abs().max().item() + 1e-5, loss_err
    assert ref[2].keys() == out[2].keys()
    if used is None:
        used = dict(plain.named_parameters()).keys()
    assert out[2].keys() == used
    for name in ref[2]:
        assert_within_pytorch_error(out[2][name], ref[2][name], pt[2][name], factor=3, atol=1e-5, name=f"grad {name}")


@pytest.fixture
def op_calls(monkeypatch):
    calls = {"attention": 0, "attention_varlen": 0}
    for name in calls:
        fn = getattr(hf_direct, name)

        def counted(*a, _fn=fn, _name=name, **k):
            calls[_name] += 1
            return _fn(*a, **k)
        monkeypatch.setattr(hf_direct, name, counted)
    return calls


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_matches_unpatched(family, padded, op_calls):
    plain = build(family)
    fast = patched(plain)
    ids, mask = inputs(padded, t=6)
    new = 8
    with torch.no_grad():
        want = plain.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, use_cache=True)
        got = fast.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, use_cache=True)
    assert want.shape == (2, 6 + new)
    assert torch.equal(got, want)
    assert fallbacks(fast) == {}
    # every layer of every step (prefill + new - 1 decoding steps) ran on gptfast: dense without
    # padding, the packed varlen path with it
    steps = 2 * new
    want_calls = {"attention": 0, "attention_varlen": steps} if padded else {"attention": steps, "attention_varlen": 0}
    assert op_calls == want_calls


# ------------------------------------------------------------------------------- dropout


def _attention_modules(model):
    return [m for m in model.modules() if type(m).__name__ in hf_direct.DIRECT_ATTENTION]


def _first_attention_call(model, ids, mask):
    """(module, args, kwargs) of the first attention module's call in a forward of ``model``."""
    m = _attention_modules(model)[0]
    seen = []
    handle = m.register_forward_pre_hook(lambda mod, a, k: seen.append((a, k)), with_kwargs=True)
    with torch.no_grad():
        model(ids, attention_mask=mask, use_cache=False)
    handle.remove()
    return m, *seen[0]


DROPOUT = {
    "gpt_neo": lambda: build("gpt_neo", attention_dropout=0.5, resid_dropout=0.0, embed_dropout=0.0),
    "bloom": lambda: build("bloom", attention_dropout=0.5, hidden_dropout=0.0),
    "falcon-alibi": lambda: build("falcon-alibi", attention_dropout=0.5, hidden_dropout=0.0),
}


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("family", list(DROPOUT))
def test_attention_dropout_runs_in_gptfast(family, padded, op_calls):
    fast = patched(DROPOUT[family]())
    ids, mask = inputs(padded)
    m, args, kwargs = _first_attention_call(fast, ids, mask)
    keep = mask.bool()
    with torch.no_grad():
        m.eval()
        eval_out = m(*args, **kwargs)[0][keep]
        m.train()
        torch.manual_seed(0)
        samples = torch.stack([m(*args, **kwargs)[0][keep] for _ in range(200)])
    assert fallbacks(fast) == {}
    assert op_calls["attention" if not padded else "attention_varlen"] >= 201
    one = (samples[0] - eval_out).abs().mean()
    assert one > 0                                                 # dropout did something
    assert not torch.equal(samples[0], samples[1])                 # a fresh mask per call
    # the probabilities' dropout keeps the expectation (the rest of the module is linear in them)
    assert (samples.mean(0) - eval_out).abs().mean() < 0.2 * one


def test_falcon_rotary_has_no_attention_dropout():
    """transformers applies no attention dropout on Falcon's rotary path, not even in training:
    neither does the patch (patched training-mode logits equal the unpatched ones)."""
    plain = build("falcon", attention_dropout=0.5, hidden_dropout=0.0).train()
    fast = patched(plain).train()
    ids, mask = inputs(True)
    with torch.no_grad():
        want, got = plain(ids, attention_mask=mask).logits, fast(ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-5)
    assert fallbacks(fast) == {}


# ------------------------------------------------------------------------------ fallbacks


def _same_as_plain(plain, fast, ids, mask, **kw):
    with torch.no_grad():
        want, got = plain(ids, attention_mask=mask, **kw), fast(ids, attention_mask=mask, **kw)
    keep = mask.bool()
    torch.testing.assert_close(got.logits[keep], want.logits[keep], atol=1e-5, rtol=1e-5)
    return want, got


def test_gpt_neo_local_window_over_holes_falls_back():
    plain = build("gpt_neo")
    fast = patched(plain)
    ids, mask = inputs(False)
    mask[0, 5:7] = 0                                                   # a hole inside the window range
    _same_as_plain(plain, fast, ids, mask)
    assert fallbacks(fast) == {"local attention over a padding mask with holes": 1}
    # the global layer packs the holes away exactly
    assert fast.transformer.h[0].attn.attention._gptfast_patch.fallbacks == {}


@pytest.mark.parametrize("family", ["bloom", "falcon-alibi"])
def test_alibi_with_holes_runs_on_gptfast(family):
    """ALiBi counts positions over the real tokens (cumsum of the mask): packing is exact."""
    plain = build(family)
    fast = patched(plain)
    ids, mask = inputs(True)
    mask[1, 5:7] = 0
    _same_as_plain(plain, fast, ids, mask)
    assert fallbacks(fast) == {}


@pytest.mark.parametrize("family", ["gpt_neo", "bloom", "falcon"])
def test_output_attentions_falls_back(family):
    plain = build(family)
    fast = patched(plain)
    ids, mask = inputs(True)
    want, got = _same_as_plain(plain, fast, ids, mask, output_attentions=True)
    assert fallbacks(fast) == {"attention weights requested (output_attentions)": 2}
    assert got.attentions is not None and len(got.attentions) == 2
    for a, b in zip(got.attentions, want.attentions):
        torch.testing.assert_close(a, b)


def test_falcon_alibi_rounded_in_bfloat16_falls_back():
    """16 heads: slopes 2^(-k/2) are rounded to bf16, and bf16 * position is rounded again, so
    Falcon's alibi is not linear in position: it falls back."""
    plain = build("falcon-alibi", hidden_size=64, num_attention_heads=16)
    fast = patched(plain)
    ids, mask = inputs(False)
    _same_as_plain(plain, fast, ids, mask)
    assert list(fallbacks(fast)) == ["the alibi tensor is not linear in position (bfloat16 rounding, or not the "
                                     "standard slopes)"]


def test_bloom_non_power_of_two_heads_runs():
    plain = build("bloom", hidden_size=48, n_head=6)
    fast = patched(plain)
    ids, mask = inputs(True)
    _same_as_plain(plain, fast, ids, mask)
    assert fallbacks(fast) == {}


def test_bloom_foreign_alibi_falls_back():
    plain = build("bloom")
    fast = patched(plain)
    ids, mask = inputs(False)
    m, args, kwargs = _first_attention_call(fast, ids, mask)
    hidden, residual, alibi, attn_mask = args if len(args) == 4 else (args[0], args[1], kwargs.pop("alibi"),
                                                                       kwargs.pop("attention_mask"))
    with torch.no_grad():
        got = m(hidden, residual, alibi * 2, attn_mask, **kwargs)[0]
        want = type(m).forward(m, hidden, residual, alibi * 2, attn_mask, **kwargs)[0]
    torch.testing.assert_close(got, want)
    assert m._gptfast_patch.fallbacks == {"the alibi tensor is not the standard slopes times the token positions": 1}


def test_alibi_slopes_match_transformers():
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes
    for n in (1, 4, 6, 16, 24, 112):
        assert torch.equal(hf_direct.alibi_slopes(n), _get_alibi_slopes(n, torch.device("cpu")))


def test_falcon_mismatched_kv_heads_is_skipped():
    """Without new_decoder_architecture and multi_query, transformers' own forward cannot reshape
    num_kv_heads != heads: nothing to patch."""
    model = build("falcon", multi_query=False, num_kv_heads=2)
    report = gptfast.patch(model, backend="cpu")
    attn = [e for e in report.entries if e.kind == "attention"]
    assert [e.action for e in attn] == ["skipped"] * 2
    assert attn[0].reason == "num_kv_heads=2 != 4 heads without new_decoder_architecture"


def test_falcon_attention_without_an_alibi_argument_is_skipped():
    """transformers >= 5.25 rewrote FalconAttention.forward (no alibi argument, ALiBi inside the
    mask): the direct patch, written for the older forward, must leave such a module alone with
    that reason instead of failing at its first call."""
    model = build("falcon")
    attention_type = type(model.transformer.h[0].self_attention)
    if "alibi" not in __import__("inspect").signature(attention_type.forward).parameters:
        pytest.skip("this transformers' FalconAttention is already the rewritten one")

    def forward(self, hidden_states, attention_mask, position_ids=None, **kwargs):
        return attention_type.forward(self, hidden_states, None, attention_mask, position_ids, **kwargs)

    rewritten = type("FalconAttention", (attention_type,), {"forward": forward})
    for block in model.transformer.h:
        block.self_attention.__class__ = rewritten
    report = gptfast.patch(model, backend="cpu")
    attn = [e for e in report.entries if e.kind == "attention"]
    assert [e.action for e in attn] == ["skipped"] * 2
    assert "takes no alibi argument" in attn[0].reason


def test_report_notes():
    notes = {}
    for family in ("gpt_neo", "bloom", "falcon", "falcon-gqa", "falcon-alibi"):
        report = gptfast.patch(build(family), backend="cpu")
        notes[family] = [e.reason for e in report.entries if e.kind == "attention"]
    assert notes["gpt_neo"][1].startswith("GPT-Neo: unscaled scores (softmax_scale=1), local window of 4 keys "
                                          "(window_size=(3, 0))")
    assert "local window" not in notes["gpt_neo"][0]
    assert notes["bloom"][0].startswith("BLOOM: ALiBi")
    assert "one key/value head (multi_query)" in notes["falcon"][0]
    assert "2 key/value group(s) (new_decoder_architecture)" in notes["falcon-gqa"][0]
    assert notes["falcon-alibi"][0].startswith("Falcon: ALiBi")


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_chunked_prefill_with_cache(family, padded):
    """A second chunk of 4 queries over a cache of 7 keys (Tq != Tk > 1): the causal mask, GPT-Neo's
    window and ALiBi aligned to the last key, as transformers has them."""
    plain = build(family)
    fast = patched(plain)
    ids, mask = inputs(padded)
    outs = []
    for model in (plain, fast):
        with torch.no_grad():
            first = model(ids[:, :7], attention_mask=mask[:, :7], use_cache=True)
            second = model(ids[:, 7:], attention_mask=mask, cache=first.cache, use_cache=True)
        outs.append((first.logits, second.logits))
    keep = mask.bool()
    for want, got, k in zip(outs[0], outs[1], (keep[:, :7], keep[:, 7:])):
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)
    assert fallbacks(fast) == {}


def test_calls_without_a_usable_mask_fall_back():
    """Direct module calls: BLOOM with no mask and several queries attends to every key (not
    causal); Falcon's eager path needs a mask; a Falcon alibi mask must hold alibi / sqrt(d)."""
    ids, mask = inputs(False)
    bloom = patched(build("bloom"))
    m, args, kwargs = _first_attention_call(bloom, ids, mask)
    hidden, residual, alibi = args[:3] if len(args) >= 3 else (args[0], args[1], kwargs.pop("alibi"))
    kwargs.pop("attention_mask", None)
    with torch.no_grad():
        got = m(hidden, residual, alibi, None, **kwargs)[0]
        want = type(m).forward(m, hidden, residual, alibi, None, **kwargs)[0]
    torch.testing.assert_close(got, want)
    assert m._gptfast_patch.fallbacks == {"no attention mask (BLOOM is then not causal)": 1}

    for eager, reason in ((True, "no attention mask on the eager path"),
                          (False, "the alibi mask does not hold alibi / sqrt(head_dim)")):
        falcon = patched(build("falcon-alibi-eager" if eager else "falcon-alibi"))
        m, args, kwargs = _first_attention_call(falcon, ids, mask)
        kwargs = dict(kwargs)
        bad = None if eager else kwargs["attention_mask"] * 2
        kwargs["attention_mask"] = bad
        with torch.no_grad():
            if eager:
                with pytest.raises(TypeError):  # transformers' own forward: scores + None
                    m(*args, **kwargs)
            else:
                torch.testing.assert_close(m(*args, **kwargs)[0], type(m).forward(m, *args, **kwargs)[0])
        assert m._gptfast_patch.fallbacks == {reason: 1}


def test_bloom_sliced_output_projection():
    """pretraining_tp > 1 with slow_but_exact: BLOOM sums its output projection over slices; the
    patch does the same after gptfast's attention (BLOOM's MLP is then left alone)."""
    model = build("bloom", pretraining_tp=2, slow_but_exact=True)
    # transformers' sliced projection leaves dense.bias out (so does the patch); the MLP's too
    unused = {n for n, _ in model.named_parameters() if n.endswith(("self_attention.dense.bias", "dense_4h_to_h.bias"))}
    assert len(unused) == 4
    check_against_reference(model, "right", None, used={n for n, _ in model.named_parameters()} - unused)


@pytest.mark.parametrize("family", ["gpt_neo", "bloom", "falcon"])
def test_static_cache_falls_back(family):
    """A static cache returns all max_cache_len keys (unfilled ones too): the patch does not read
    its layout and falls back, before touching the cache, to the same tokens."""
    plain = build(family)
    fast = patched(plain)
    ids, mask = inputs(True, t=6)
    with torch.no_grad():
        kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, cache_implementation="static")
        want, got = plain.generate(ids, **kw), fast.generate(ids, **kw)
    assert torch.equal(got, want)
    assert fallbacks(fast) == {"a KV cache that is not a plain DynamicCache layer": 2 * 4}
