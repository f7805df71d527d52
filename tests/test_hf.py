"""Hugging Face decoders on gptfast: ``attn_implementation="gptfast"`` (gptfast.hf) and
``gptfast.patch`` on 13 families built from small configs (transformers 5.x).

Numerics follow DESIGN.md's rule through tests/test_patch.py's ``compare``: the unpatched model in
float64 is the truth, the unpatched model in the tested precision sets the error budget.
"""
from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="Hugging Face tests need transformers "
                                                          "(pip install 'gptfast[hf]')")

import gptfast  # noqa: E402
import gptfast.hf  # noqa: E402
from gptfast.testing import assert_within_pytorch_error  # noqa: E402
from test_patch import compare  # noqa: E402

V = 61
T = transformers
NO_DROPOUT = ("attn_pdrop", "resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_dropout", "dropout",
              "activation_dropout", "resid_dropout", "embed_dropout", "summary_first_dropout")


def _configs():
    small = dict(vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    gpt = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, **small)
    hf = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, **small)
    return {
        "gpt2": lambda: T.GPT2Config(**gpt),
        "gpt_neo": lambda: T.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, window_size=5,
                                          attention_types=[[["global", "local"], 1]],
                                          max_position_embeddings=64, **small),
        "gptj": lambda: T.GPTJConfig(rotary_dim=4, **gpt),
        "gpt_neox": lambda: T.GPTNeoXConfig(intermediate_size=64, **hf),
        "phi": lambda: T.PhiConfig(intermediate_size=64, num_key_value_heads=2, **hf),
        "gpt_bigcode": lambda: T.GPTBigCodeConfig(multi_query=True, **gpt),
        "bloom": lambda: T.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **small),
        "opt": lambda: T.OPTConfig(ffn_dim=64, word_embed_proj_dim=32, activation_function="gelu", **hf),
        "falcon": lambda: T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **small),
        "llama": lambda: T.LlamaConfig(intermediate_size=64, num_key_value_heads=2, **hf),
        "mistral": lambda: T.MistralConfig(intermediate_size=64, num_key_value_heads=1, sliding_window=5, **hf),
        "qwen2": lambda: T.Qwen2Config(intermediate_size=64, num_key_value_heads=2, **hf),
        "gemma2": lambda: T.Gemma2Config(intermediate_size=64, num_key_value_heads=2, head_dim=8, sliding_window=5,
                                         **hf),
    }


CONFIGS = _configs()
FAMILIES = list(CONFIGS)
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
    "llama": {("attention", "patched"): 2, ("gated_ffn", "skipped"): 2, ("rms_norm", "skipped"): 5},
    "mistral": {("attention", "patched"): 2, ("gated_ffn", "skipped"): 2, ("rms_norm", "skipped"): 5},
    "qwen2": {("attention", "patched"): 2, ("gated_ffn", "skipped"): 2, ("rms_norm", "skipped"): 5},
    "gemma2": {("attention", "patched"): 2, ("gated_ffn", "skipped"): 2, ("rms_norm", "skipped"): 9},
}


def make(family: str, impl: str | None = None, dropout: bool = False):
    config = CONFIGS[family]()
    if not dropout:
        for name in NO_DROPOUT:
            if isinstance(getattr(config, name, None), float):
                setattr(config, name, 0.0)
    torch.manual_seed(0)
    impl = impl or ("eager" if family == "gemma2" else "sdpa" if family in INTERFACE else None)
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation=impl)
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
