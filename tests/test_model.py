"""The GPT decoder: shapes, weight tying, it learns, generation, and GPT-2 checkpoint loading."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import gptfast
from gptfast.model import GPT, PRESETS, GPTConfig
from gptfast.testing import assert_close

TINY = GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=16)


def test_presets():
    gpt2 = GPTConfig.from_preset("gpt2")
    assert (gpt2.n_layer, gpt2.n_head, gpt2.n_embd, gpt2.vocab_size, gpt2.block_size) == (12, 12, 768, 50304, 1024)
    assert GPTConfig.from_preset("tiny", n_layer=1).n_layer == 1
    with pytest.raises(ValueError, match="unknown GPT preset"):
        GPTConfig.from_preset("gpt5")
    # 124M with the 50257 vocabulary, as GPT-2 reports it (non-embedding count + wpe)
    meta = torch.device("meta")
    with meta:
        m = GPT(GPTConfig.from_preset("gpt2", vocab_size=50257))
    assert round(m.num_params(non_embedding=False) / 1e6) == 124
    assert set(PRESETS) >= {"tiny", "gpt2"}


def test_forward_shapes_and_tying(seed):
    model = GPT(TINY)
    idx = torch.randint(0, 32, (3, 11))
    logits, loss = model(idx)
    assert logits.shape == (3, 11, 32) and loss is None
    _, loss = model(idx, idx)
    assert loss.ndim == 0 and abs(loss.item() - torch.log(torch.tensor(32.0)).item()) < 0.5
    assert model.lm_head.weight is model.transformer.wte.weight
    assert isinstance(model.transformer.h[0].ln_1, nn.LayerNorm)  # drop-in type


def test_model_uses_only_gptfast_ops(seed, monkeypatch):
    """Every block's LayerNorm, attention and MLP go through the gptfast ops."""
    import gptfast.nn as gnn
    seen = []
    for name in ("attention", "layer_norm", "gelu_ffn"):
        real = getattr(gnn, name)
        monkeypatch.setattr(gnn, name, lambda *a, _r=real, _n=name, **k: seen.append(_n) or _r(*a, **k))
    GPT(TINY)(torch.randint(0, 32, (1, 4)))
    assert seen.count("attention") == 2 and seen.count("gelu_ffn") == 2 and seen.count("layer_norm") == 5


def test_loss_drops_over_30_steps(seed):
    model = GPT(TINY)
    opt = model.configure_optimizer(0.0, 1e-2)
    data = torch.arange(16).repeat(4, 2)[:, :17] % 32  # a learnable counting pattern
    losses = []
    for _ in range(30):
        _, loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_configure_optimizer_is_fused_adamw_with_the_loop_s_updates(seed):
    # fused on the CPU too (one kernel instead of a Python loop over parameters): the same
    # AdamW, decay on matrices and embeddings only, as torch's per-parameter loop computes it
    model = GPT(TINY)
    twin = GPT(TINY)
    twin.load_state_dict(model.state_dict())
    opt = model.configure_optimizer(0.1, 1e-2, device_type="cpu")
    assert opt.defaults["fused"] is True
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert decayed == {id(p) for p in model.parameters() if p.dim() >= 2}
    loop = torch.optim.AdamW([{"params": [p for p in twin.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                              {"params": [p for p in twin.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.95), foreach=False)
    idx = torch.randint(0, 32, (2, 16))
    for _ in range(3):
        for m, o in ((model, opt), (twin, loop)):
            o.zero_grad()
            m(idx, idx)[1].backward()
            o.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert_close(p.detach(), q.detach(), atol=1e-5, name=name)


def test_trains_under_cpu_autocast(seed):
    model = GPT(TINY)
    idx = torch.randint(0, 32, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx, return_logits=True)
        assert model(idx, idx)[0] is None  # the fused loss: no logits
    assert logits.dtype == torch.bfloat16
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_generate(seed):
    model = GPT(TINY).eval()
    idx = torch.randint(0, 32, (2, 3))
    out = model.generate(idx, 20, temperature=0.8, top_k=5)  # runs past block_size: context is cropped
    assert out.shape == (2, 23) and torch.equal(out[:, :3], idx)
    greedy1 = model.generate(idx, 5, temperature=0)
    greedy2 = model.generate(idx, 5, temperature=0)
    assert torch.equal(greedy1, greedy2)
    top1 = model.generate(idx, 5, top_k=1)
    assert torch.equal(top1, greedy1), "top_k=1 sampling is greedy decoding"


def _hf_state_dict(model: GPT, lm_model: bool) -> dict:
    """The model's weights renamed and laid out as Hugging Face's GPT2Model / GPT2LMHeadModel."""
    out = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            if lm_model:
                out[k] = v.clone()
            continue
        if k.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            v = v.t().contiguous()  # Conv1D: (in, out)
        out[k if lm_model else k.removeprefix("transformer.")] = v.clone()
    for i in range(model.config.n_layer):  # HF's causal-mask buffers
        prefix = "transformer." if lm_model else ""
        out[f"{prefix}h.{i}.attn.bias"] = torch.ones(1, 1, 16, 16, dtype=torch.bool).tril()
        out[f"{prefix}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return out


@pytest.mark.parametrize("layout", ["nanogpt", "nanogpt-ckpt", "hf-lm", "hf-base", "hf-dir"])
def test_load_gpt2_state_dict(layout, tmp_path, seed):
    cfg = GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=4, n_embd=32)
    model = GPT(cfg).eval()
    path = tmp_path / "weights.pt"
    overrides = {}
    if layout == "nanogpt":
        torch.save({"_orig_mod." + k: v for k, v in model.state_dict().items()}, path)
        overrides = dict(n_head=4)  # a bare state dict cannot tell the head count
    elif layout == "nanogpt-ckpt":
        torch.save({"model": model.state_dict(), "model_args": dict(n_head=4, block_size=16)}, path)
    elif layout in ("hf-lm", "hf-base"):
        torch.save(_hf_state_dict(model, layout == "hf-lm"), path)
        overrides = dict(n_head=4)
    else:
        path = tmp_path / "hf"
        path.mkdir()
        torch.save(_hf_state_dict(model, True), path / "pytorch_model.bin")
        (path / "config.json").write_text(json.dumps(dict(n_head=4, n_positions=16, activation_function="gelu_new")))
    loaded = GPT.from_pretrained_file(path, **overrides).eval()
    assert loaded.config == cfg
    idx = torch.randint(0, 40, (2, 16))
    assert_close(loaded(idx)[0], model(idx)[0], atol=0)


def test_load_rejects_non_gpt2(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"foo": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a GPT-2 state dict"):
        GPT.from_pretrained_file(path)
    with pytest.raises(FileNotFoundError):
        GPT.from_pretrained_file(tmp_path / "missing.pt")


def test_top_level_exports():
    for name in ("attention", "flash_attn_func", "layer_norm", "gelu_ffn", "attention_ref", "layer_norm_ref",
                 "gelu_ffn_ref", "available_backends", "use_backend", "GPT", "GPTConfig"):
        assert hasattr(gptfast, name), name
    for fn in (gptfast.attention, gptfast.layer_norm, gptfast.gelu_ffn, gptfast.flash_attn_func):
        assert "Returns" in fn.__doc__ or "Runs" in fn.__doc__


def test_nn_layernorm_is_a_drop_in_for_torch_layernorm(seed):
    """Same parameters, state-dict keys and outputs as nn.LayerNorm, loadable both ways."""
    ours, theirs = gptfast.nn.LayerNorm(48, eps=1e-6), nn.LayerNorm(48, eps=1e-6)
    nn.init.normal_(theirs.weight)
    nn.init.normal_(theirs.bias)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 7, 48)
    assert_close(ours(x), theirs(x), atol=1e-5)
    no_bias = gptfast.nn.LayerNorm(48, bias=False)
    assert no_bias.bias is None and list(no_bias.state_dict()) == ["weight"]
