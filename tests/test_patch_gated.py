"""gptfast.patch on gated MLPs (SwiGLU / GeGLU): Llama's gate_proj / up_proj / down_proj, the
Mixtral-style w1 / w3 / w2 names, Phi-3's fused gate_up_proj; the activation found by evaluating
it (SiLU, tanh GELU, exact GELU); lookalikes refused with the reason (an activation gated_ffn does
not have, projections of the wrong shapes, extra submodules, a forward that gates the other
projection, which only the check run can tell); HF Phi-3 / Qwen3 / Gemma-3 built from configs,
whose MLPs the HF families of tests/test_hf.py do not cover. DESIGN.md's numerics rule as in
tests/test_patch.py: logits and every gradient within 2x / 3x the unpatched model's own error
against its float64 copy, in fp32 and under bf16 autocast.
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn as nn
from gptfast.patch import patch, unpatch

from test_patch import compare, patched_copy


class LlamaStyle(nn.Module):
    def __init__(self, c=24, h=40, act=None, names=("gate_proj", "up_proj", "down_proj"), bias=False, swap=False):
        super().__init__()
        self.names, self.swap = names, swap
        g, u, d = names
        setattr(self, g, nn.Linear(c, h, bias=bias))
        setattr(self, u, nn.Linear(c, h, bias=bias))
        setattr(self, d, nn.Linear(h, c, bias=bias))
        self.act_fn = act if act is not None else nn.SiLU()

    def forward(self, x):
        g, u, d = (getattr(self, n) for n in self.names)
        if self.swap:  # gates the up projection instead: same structure, another function
            return d(self.act_fn(u(x)) * g(x))
        return d(self.act_fn(g(x)) * u(x))


class Phi3Style(nn.Module):
    def __init__(self, c=24, h=40, bias=False):
        super().__init__()
        self.gate_up_proj = nn.Linear(c, 2 * h, bias=bias)
        self.down_proj = nn.Linear(h, c, bias=bias)
        self.activation_fn = nn.SiLU()

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.activation_fn(gate))


class Net(nn.Module):
    """Embedding -> two residual gated-MLP blocks -> head: logits a test can compare."""

    def __init__(self, make, vocab=61, c=24):
        super().__init__()
        self.emb = nn.Embedding(vocab, c)
        self.blocks = nn.ModuleList([make() for _ in range(2)])
        self.head = nn.Linear(c, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        for b in self.blocks:
            x = x + b(x)
        return self.head(x), None


def _batch(vocab=61):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (3, 17), generator=g), None


CASES = {
    "llama-silu": lambda: LlamaStyle(),
    "gemma-gelu_tanh-bias": lambda: LlamaStyle(act=nn.GELU(approximate="tanh"), bias=True),
    "gelu": lambda: LlamaStyle(act=nn.GELU()),
    "w1w3w2": lambda: LlamaStyle(names=("w1", "w3", "w2")),
    "phi3-fused": lambda: Phi3Style(),
    "phi3-fused-bias": lambda: Phi3Style(bias=True),
}
ACTIVATION = {"llama-silu": "silu", "gemma-gelu_tanh-bias": "gelu_tanh", "gelu": "gelu", "w1w3w2": "silu",
              "phi3-fused": "silu", "phi3-fused-bias": "silu"}


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("case", list(CASES))
def test_gated_mlps_are_patched_and_match(case, dtype, monkeypatch):
    torch.manual_seed(0)
    model = Net(CASES[case])
    patched, report = patched_copy(model)
    entries = [e for e in report.entries if e.kind == "gated_ffn"]
    assert [(e.path, e.action) for e in entries] == [("blocks.0", "patched"), ("blocks.1", "patched")], str(report)
    assert f"activation {ACTIVATION[case]!r}" in entries[0].reason
    calls = []
    module = importlib.import_module("gptfast.ops.gated_ffn")  # (gptfast.ops.gated_ffn is the function)
    real = module.gated_ffn
    monkeypatch.setattr(module, "gated_ffn", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    idx, _ = _batch()
    compare(patched, model, idx, None, dtype)
    assert calls and set(calls) == {ACTIVATION[case]}  # the patched forward ran the op
    unpatch(patched)
    assert all("forward" not in b.__dict__ for b in patched.blocks)


def test_lookalikes_are_refused_with_the_reason():
    torch.manual_seed(0)
    bad = {
        "relu": LlamaStyle(act=nn.ReLU()),
        "swapped": LlamaStyle(swap=True),
        "shapes": LlamaStyle(),
        "extra": LlamaStyle(),
    }
    bad["shapes"].down_proj = nn.Linear(40, 16, bias=False)  # H -> 16, not back to C = 24
    bad["extra"].norm = nn.LayerNorm(40)
    model = nn.ModuleDict(bad)
    x = torch.randn(2, 5, 24)
    before = {k: m(x) for k, m in bad.items()}
    report = patch(model, ops=("gated_ffn",))
    why = {e.path: e.reason for e in report.skipped}
    assert "activation act_fn (ReLU) is none of ('silu', 'gelu_tanh', 'gelu')" in why["relu"]
    assert "does not compute down(act(gate(x)) * up(x)) with activation 'silu'" in why["swapped"]
    assert "projections' shapes are not gate, up (C -> H) and down (H -> C)" in why["shapes"]
    assert "further submodules ['norm']" in why["extra"]
    assert not report.patched
    for k, m in bad.items():
        assert "forward" not in m.__dict__
        torch.testing.assert_close(m(x), before[k])


def test_ops_subset_leaves_gated_mlps_alone():
    model = Net(LlamaStyle)
    report = patch(model, ops=("rms_norm",))
    assert not [e for e in report.entries if e.kind == "gated_ffn" and e.action == "patched"]
    assert all("forward" not in b.__dict__ for b in model.blocks)


def _hf(family):
    T = pytest.importorskip("transformers")
    common = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    cfg = {"phi3": lambda: T.Phi3Config(pad_token_id=0, eos_token_id=1, bos_token_id=1, **common),
           "qwen3": lambda: T.Qwen3Config(head_dim=8, **common),
           "gemma3": lambda: T.Gemma3TextConfig(head_dim=8, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                                                **common)}[family]()
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("family", ["phi3", "qwen3", "gemma3"])
def test_hf_gated_families_patched_match_unpatched(family, dtype):
    model = _hf(family)
    patched, report = patched_copy(model)
    kinds = {(e.kind, e.action) for e in report.entries}
    assert ("gated_ffn", "patched") in kinds and ("attention", "patched") in kinds, str(report)
    assert not [e for e in report.entries if e.kind == "gated_ffn" and e.action != "patched"], str(report)
    idx, _ = _batch()
    compare(patched, model, idx, None, dtype, call=lambda m, i: m(i).logits)
    with torch.no_grad():  # greedy decoding: the same tokens
        prompt = idx[:1, :5]
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(patched.generate(prompt, **kw), model.generate(prompt, **kw))
