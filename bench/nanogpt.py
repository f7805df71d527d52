"""A GPT with nanoGPT's structure (karpathy/nanoGPT ``model.py``), written here as the baseline that
``gptfast bench train --model nanogpt`` and the patch tests measure gptfast against.

What makes it nanoGPT and not gptfast's GPT: its own ``LayerNorm`` module (``F.layer_norm`` with
an optional bias), attention through ``F.scaled_dot_product_attention`` on (B, H, T, D) or, with
``flash=False``, a masked softmax over a registered ``bias`` buffer, ``nn.GELU()`` (exact erf) by
default, dropout modules after attention and both projections, and the residual adds done in the
block (``x = x + attn(ln_1(x))``). Parameter names are GPT-2's, the same as gptfast.model.GPT's, so
:func:`from_gpt` copies a gptfast GPT's weights into it key for key.

Nothing here imports gptfast: it is the user's model that ``gptfast.patch`` is applied to.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["NanoConfig", "NanoGPT", "from_gpt"]


@dataclass
class NanoConfig:
    block_size: int = 32
    vocab_size: int = 61
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 32
    dropout: float = 0.0
    bias: bool = True
    flash: bool = True            # F.scaled_dot_product_attention(is_causal=True), else masked softmax
    causal: bool = True
    gelu: str = "none"            # nanoGPT uses nn.GELU() (exact)


class LayerNorm(nn.Module):
    """nanoGPT's own LayerNorm: an optional bias (PyTorch's nn.LayerNorm had none to switch off)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: NanoConfig):
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head, self.n_embd, self.dropout = cfg.n_head, cfg.n_embd, cfg.dropout
        self.flash, self.causal = cfg.flash, cfg.causal
        if not cfg.flash:
            mask = torch.ones(cfg.block_size, cfg.block_size).tril()
            self.register_buffer("bias", mask.view(1, 1, cfg.block_size, cfg.block_size))

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))  # (B, H, T, D)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=self.causal)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
            y = self.attn_dropout(F.softmax(att, dim=-1)) @ v
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: NanoConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU(approximate=cfg.gelu)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: NanoConfig):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """idx (B, T) -> logits (B, T, vocab), loss (cross-entropy against targets, or None)."""

    def __init__(self, cfg: NanoConfig):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd), wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout), h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=LayerNorm(cfg.n_embd, bias=cfg.bias)))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():  # non-trivial LayerNorm affine parameters and biases too
            nn.init.normal_(p, mean=1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0,
                            std=0.2 if p.dim() < 2 else 0.05)

    def forward(self, idx, targets=None):
        t = idx.size(1)
        pos = torch.arange(t, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                                            ignore_index=-1)
        return logits, loss


def from_gpt(gpt: nn.Module, gelu: str | None = None) -> NanoGPT:
    """A NanoGPT with a gptfast.model.GPT's configuration and weights (on its device, in its dtype).
    ``gelu`` overrides the GPT's GELU form ("none" exact, "tanh")."""
    c = gpt.config
    if c.n_kv_head not in (None, c.n_head):
        raise ValueError("nanoGPT has no grouped-query attention: the GPT must have n_kv_head == n_head")
    cfg = NanoConfig(block_size=c.block_size, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                     n_embd=c.n_embd, dropout=c.dropout, bias=c.bias, gelu=gelu or c.gelu_approximate)
    weight = gpt.lm_head.weight
    with torch.device("meta"):
        model = NanoGPT(cfg)
    model = model.to_empty(device=weight.device).to(weight.dtype)
    model.load_state_dict(gpt.state_dict())
    model.lm_head.weight = model.transformer.wte.weight  # to_empty broke the tie
    return model
