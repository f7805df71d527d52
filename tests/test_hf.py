"""Hugging Face decoders on gptfast: ``attn_implementation="gptfast"`` (gptfast.hf) and
``gptfast.patch`` on 13 families built from small configs (transformers 5.x).

Numerics follow DESIGN.md's rule through tests/test_patch.py's ``compare``: the unpatched model in
float64 is the truth, the unpatched model in the tested precision sets the error budget.
"""
from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="Hugging Face tests need transformers "
                                                          "(pip install 'gptfast[hf]')")

import gptfast  # noqa: E402
import gptfast.hf  # noqa: E402
from gptfast.testing import assert_within_pytorch_error  # noqa: E402
from test_patch import compare  # noqa: E402

from gptfast.bench_drop_in import FAMILIES, build  # noqa: E402

V = 61
T = transformers
INTERFACE = [f for f in FAMILIES if f not in ("gpt_neo", "bloom", "falcon")]

# What gptfast.patch reports for each 2-layer model: Counter of (kind, action).
REPORTS = {
    "gpt2": {("layer_norm", "patched"): 5, ("attention", "patched"): 2, ("gelu_ffn", "patched"): 2},
    "gpt_neo": {("layer_norm", "patched"): 5, ("attention", "patched"): 2, ("gelu_ffn", "patched"): 2},
    "gptj": {("layer_norm", "patched"): 3, ("attention", "patched"): 2, ("gelu_ffn", "patched"): 2},
    "gpt_neox": {("layer_norm", "patched"): 5, ("attention", "patched"): 2, ("gelu_ffn", "patched"): 2},
    "phi": {("layer_norm", "patched"): 3, ("attention", "patched"): 2, ("gelu_ffn", "patched"): 2},
    "gpt_bigcode": {("layer_norm", "patched"): 5, ("attention", "patched"): 2, ("gelu_ffn", "patched"): 2},
    "bloom": {("layer_norm", "patched"): 6, ("attention", "patched"): 2, ("gelu_ffn", "patched"): 2},
    "opt": {("layer_norm", "patched"): 5, ("attention", "patched"): 2, ("gelu_ffn", "skipped"): 2},
    "falcon": {("layer_norm", "patched"): 3, ("attention", "patched"): 2, ("gelu_ffn", "patched"): 2},
    "llama": {("attention", "patched"): 2, ("gated_ffn", "patched"): 2, ("rms_norm", "patched"): 5},
    "mistral": {("attention", "patched"): 2, ("gated_ffn", "patched"): 2, ("rms_norm", "patched"): 5},
    "qwen2": {("attention", "patched"): 2, ("gated_ffn", "patched"): 2, ("rms_norm", "patched"): 5},
    "gemma2": {("attention", "patched"): 2, ("gated_ffn", "patched"): 2, ("rms_norm", "patched"): 9},
}


def make(family: str):
    model = build(family, "test")
    with torch.no_grad():  # non-trivial norm affine parameters and biases
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.2)
    return model


def batch(b=3, t=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (b, t), generator=g)


def logits(model, idx):
    return model(idx).logits


@pytest.fixture(autouse=True)
def _clear_fallbacks():
    gptfast.hf.fallbacks.clear()
    yield


def no_fallbacks(model):
    direct = {type(m).__name__: m._gptfast_patch.fallbacks for m in model.modules()
              if "_gptfast_patch" in m.__dict__ and m._gptfast_patch.config.get("flavour") == "direct"}
    assert gptfast.hf.fallbacks == {} and all(not f for f in direct.values()), (gptfast.hf.fallbacks, direct)


# ----------------------------------------------------------------------------- gptfast.patch


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_report_lists_every_norm_attention_and_mlp(family):
    model = make(family)
    report = gptfast.patch(model, backend="cpu")
    got = Counter((e.kind, e.action) for e in report.entries)
    assert got == Counter(REPORTS[family]), str(report)
    assert all(e.reason for e in report.skipped), str(report)
    text = str(report)
    assert text.splitlines()[0] == f"gptfast.patch: {len(report.patched)} patched, {len(report.skipped)} skipped"
    only_norms = gptfast.patch(make(family), ops=("layer_norm",), backend="cpu")
    for e in only_norms.entries:  # what ops leave out is reported as such, not as unrecognised
        assert e.kind in ("layer_norm", "rms_norm") or e.reason == f"{e.kind!r} not in ops", str(only_norms)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("family", FAMILIES)
def test_patch_matches_unpatched_logits_loss_and_grads(family, dtype):
    plain = make(family)
    patched = copy.deepcopy(plain)
    gptfast.patch(patched, backend="cpu")
    idx = batch()
    atol = 1e-5 if dtype is None else 1e-3
    compare(patched, plain, idx, None, dtype, call=logits, atol=atol)
    with torch.no_grad():
        ref = copy.deepcopy(plain).double()(idx, labels=idx).loss
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            pt, out = (m(idx, labels=idx).loss for m in (plain, patched))
    assert_within_pytorch_error(out, ref, pt, factor=2, atol=atol, name="loss")
    no_fallbacks(patched)


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_greedy_generate_is_identical_with_and_without_left_padding(family, monkeypatch):
    plain = make(family).eval()
    patched = copy.deepcopy(plain)
    gptfast.patch(patched, backend="cpu")
    calls = Counter()
    for fn in ("attention", "attention_varlen"):
        real = getattr(gptfast.hf, fn)
        monkeypatch.setattr(gptfast.hf, fn, lambda *a, _r=real, _f=fn, **kw: calls.update([_f]) or _r(*a, **kw))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    idx = batch(b=2, t=7)
    mask = torch.ones_like(idx)
    mask[0, :3] = 0
    with torch.no_grad():
        assert torch.equal(patched.generate(idx, **kw), plain.generate(idx, **kw))
        assert torch.equal(patched.generate(idx, attention_mask=mask, **kw),
                           plain.generate(idx, attention_mask=mask, **kw))
    no_fallbacks(patched)
    if family in INTERFACE:  # prefill + 5 decode steps, 2 layers, 2 prompts; padding: varlen
        assert sum(calls.values()) == 2 * 2 * 6, calls
        if family in ("mistral", "gemma2"):  # once the padding slides out of the window: dense
            assert calls["attention_varlen"] >= 2, calls
        else:
            assert calls == {"attention": 2 * 6, "attention_varlen": 2 * 6}, calls


# ------------------------------------------------------------ attn_implementation="gptfast"


@pytest.mark.parametrize("family", INTERFACE)
def test_attn_implementation_gptfast_from_config_and_set(family):
    plain = make(family).eval()
    gptfast.hf.register()
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(plain.config, attn_implementation="gptfast").eval()
    model.load_state_dict(plain.state_dict())
    assert model.config._attn_implementation == "gptfast"
    switched = copy.deepcopy(plain)
    switched.set_attn_implementation("gptfast")
    idx = batch()
    mask = torch.ones_like(idx)
    mask[1, :4] = 0
    with torch.no_grad():
        want = plain(idx).logits
        want_padded = plain(idx, attention_mask=mask).logits
        for m in (model, switched):
            torch.testing.assert_close(m(idx).logits, want, atol=1e-5, rtol=1e-5)
            got = m(idx, attention_mask=mask).logits
            torch.testing.assert_close(got[mask.bool()], want_padded[mask.bool()], atol=1e-5, rtol=1e-5)
    assert gptfast.hf.fallbacks == {}


# ------------------------------------------------------------------------------- fallbacks


def _qkv(b=2, h=4, hk=2, tq=9, tk=9, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, tq, d, generator=g), torch.randn(b, hk, tk, d, generator=g),
            torch.randn(b, hk, tk, d, generator=g))


class _Module(torch.nn.Module):  # what the interface reads off an attention module
    is_causal = True
    num_key_value_groups = 2


def _sdpa_truth(q, k, v, allowed, scale=None):
    k, v = (z.repeat_interleave(q.shape[1] // z.shape[1], dim=1) for z in (k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    return out.transpose(1, 2)


def test_interface_sliding_window_and_padding_follow_transformers_masks():
    from gptfast.hf import _dense_mask, attention_forward
    q, k, v = _qkv(tq=3, tk=9)  # decoding 3 tokens against 6 cached
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, :2] = False  # left padding
    for window in (None, 4):
        for mask in (None, keep):
            got, weights = attention_forward(_Module(), q, k, v, mask, sliding_window=window, scaling=0.5)
            allowed = _dense_mask(mask, 2, 3, 9, True, window, q.device)
            want = _sdpa_truth(q, k, v, allowed, scale=0.5)
            assert weights is None and got.shape == (2, 3, 4, 8)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # transformers' rule: with sliding_window w, query i sees keys i-w+1 .. i
    allowed = _dense_mask(None, 1, 5, 5, True, 2, "cpu")[0, 0]
    assert torch.equal(allowed, torch.eye(5, dtype=torch.bool) | torch.eye(5, dtype=torch.bool).roll(-1, 1).tril())
    assert gptfast.hf.fallbacks == {}


@pytest.mark.parametrize("case", ["s_aux", "holes+window", "headdim", "weights", "extra-arg"])
def test_interface_falls_back_where_gptfast_cannot_and_counts_why(case, monkeypatch):
    from gptfast.hf import _dense_mask, attention_forward
    q, k, v = _qkv()
    kw, mask, d = {}, None, 8
    if case == "s_aux":
        pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
        kw["s_aux"] = torch.zeros(4)
    elif case == "holes+window":
        mask = torch.ones(2, 9, dtype=torch.bool)
        mask[1, 4] = False
        kw["sliding_window"] = 3
    elif case == "headdim":
        d = 264
        q, k, v = _qkv(d=d)
    elif case == "weights":
        kw["output_attentions"] = True
    else:
        kw["position_bias"] = torch.zeros(1, 4, 9, 9)
    module = _Module()
    if case in ("s_aux", "weights"):  # sinks and weights need the model's eager function
        import importlib
        home = importlib.import_module("transformers.models." + ("gpt_oss.modeling_gpt_oss" if case == "s_aux"
                                                                 else "llama.modeling_llama"))
        module = type("SomeAttention", (_Module,), {"__module__": home.__name__})()
        module.sinks = kw.get("s_aux")
    out, weights = attention_forward(module, q, k, v, mask, **kw)
    assert out.shape == (2, 9, 4, d)
    (reason, calls), = gptfast.hf.fallbacks.items()
    assert calls == 1 and {"s_aux": "sinks", "holes+window": "holes", "headdim": "head dim 264",
                           "weights": "weights", "extra-arg": "position_bias"}[case] in reason
    if case in ("holes+window", "headdim"):
        allowed = _dense_mask(mask, 2, 9, 9, True, kw.get("sliding_window"), q.device)
        torch.testing.assert_close(out, _sdpa_truth(q, k, v, allowed), atol=1e-5, rtol=1e-5)
    if case == "weights":
        assert weights is not None and weights.shape == (2, 4, 9, 9)


# ------------------------------------------------------------------- gptfast bench drop_in


def test_bench_drop_in_times_patched_against_unpatched(tmp_path, capsys):
    from gptfast.cli import main
    main(["bench", "drop_in", "--sizes", "gpt2,llama", "--repeats", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "drop_in.json").read_text())["rows"]
    assert [r["family"] for r in rows] == ["gpt2", "llama"] and all(r["status"] == "ok" for r in rows)
    assert all(r["patched_ms"] > 0 and r["x_unpatched"] == r["unpatched_ms"] / r["patched_ms"] for r in rows)
    assert rows[0]["runs_on_gptfast"] == "norm 9/9, attention 4/4, mlp 4/4"
    assert rows[1]["runs_on_gptfast"] == "norm 9/9, attention 4/4, mlp 4/4"  # RMSNorms and gated MLPs
    assert rows[1]["left"] == ""
    assert "x unpatched" in out and (tmp_path / "drop_in.txt").read_text().count("\n") == 6
    with pytest.raises(SystemExit) as exc:
        main(["bench", "drop_in", "--sizes", "gpt3"])
    assert exc.value.code != 0 and "drop_in takes family names" in capsys.readouterr().err


def test_interface_reads_query_key_value_as_views_without_copies(monkeypatch):
    from gptfast.hf import attention_forward
    q, k, v = _qkv()
    seen = []
    real = gptfast.hf.attention
    monkeypatch.setattr(gptfast.hf, "attention", lambda *a, **kw: seen.append(a) or real(*a, **kw))
    attention_forward(_Module(), q, k, v, None)
    (gq, gk, gv), = seen
    for got, given in ((gq, q), (gk, k), (gv, v)):
        assert got.data_ptr() == given.data_ptr() and got.shape == given.transpose(1, 2).shape
    assert gk.shape[2] == 2  # GQA: the two kv heads, not repeated to four


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_lm_loss_is_the_models_loss_without_the_logits(family):
    """gptfast.hf.causal_lm_loss (the opt-in fused lm_head + loss) against the model's own
    ``labels=`` loss: value and every gradient, with ignored labels (no padding mask: several of
    these models give NaN rows for left padding in float64 eager mode themselves); on an
    unpatched and a patched model alike (Gemma-2: the final logit softcap inside the op). The
    model runs in float64 but transformers' loss casts the logits to float32: fp32 tolerances."""
    model = make(family).double()
    idx = batch()
    labels = idx.clone()
    labels[0, :3] = -100
    labels[1, 5] = -100
    params = [p for p in model.parameters() if p.requires_grad]
    want = model(idx, labels=labels).loss
    want_g = torch.autograd.grad(want, params, allow_unused=True)
    for patched in (False, True):
        if patched:
            gptfast.patch(model)
        got = gptfast.hf.causal_lm_loss(model, idx, labels)
        torch.testing.assert_close(got.float(), want, rtol=1e-6, atol=1e-6)
        got_g = torch.autograd.grad(got, params, allow_unused=True)
        for (name, _), a, b in zip(model.named_parameters(), got_g, want_g):
            if b is None:
                assert a is None or not a.any(), name
                continue
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_causal_lm_loss_refuses_rescaled_logits():
    model = make("llama")
    model.config.logit_scale = 0.5
    with pytest.raises(NotImplementedError, match="logit_scale=0.5"):
        gptfast.hf.causal_lm_loss(model, batch())
    with pytest.raises(TypeError, match="not a transformers"):
        gptfast.hf.causal_lm_loss(model.model, batch())
