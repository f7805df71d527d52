"""A GPT-2-style decoder whose LayerNorm, attention and feed-forward blocks run on gptfast ops.

Pre-LN blocks (x + attn(ln_1(x)), x + mlp(ln_2(x))), learned position embeddings, tied input
and output embeddings, GPT-2 parameter names, so that GPT-2 checkpoints (nanoGPT or Hugging Face
naming) load with :meth:`GPT.from_pretrained_file`.
"""
from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nn import MLP, CausalSelfAttention, LayerNorm
from .ops.linear_cross_entropy import linear_cross_entropy

__all__ = ["GPTConfig", "GPT", "PRESETS", "Segments", "document_segments"]


@dataclass
class GPTConfig:
    block_size: int = 1024        # longest sequence (context length)
    vocab_size: int = 50304       # GPT-2's 50257 padded up to a multiple of 64 for the matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0          # on embeddings and residual branches
    n_kv_head: int | None = None  # key/value heads (GQA; 1: MQA); None = n_head
    attn_dropout: float = 0.0     # on the attention probabilities (regenerated in backward, never stored)
    bias: bool = True             # biases in Linear and LayerNorm, as GPT-2
    gelu_approximate: str = "tanh"  # GPT-2's gelu_new; "none" for exact erf GELU

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; presets are {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)


PRESETS: dict[str, GPTConfig] = {
    # A byte-level model that learns visible structure in a couple of CPU minutes.
    "tiny": GPTConfig(block_size=128, vocab_size=256, n_layer=4, n_head=4, n_embd=128),
    "small": GPTConfig(block_size=256, vocab_size=256, n_layer=6, n_head=6, n_embd=384),
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),             # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),     # 350M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),      # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),         # 1558M
}


@dataclass(frozen=True)
class Segments:
    """Packed documents of a (B, T) batch as gptfast.attention_varlen takes them: the batch's
    B * T token rows split at every row start and document change."""

    cu_seqlens: torch.Tensor  # int32 (S + 1,) prefix sums over the flattened B * T tokens
    max_seqlen: int           # the longest segment
    positions: torch.Tensor   # (B, T) int64: each token's position within its document


def document_segments(doc_ids: torch.Tensor) -> Segments:
    """:class:`Segments` of ``doc_ids`` (B, T) integers: consecutive equal ids in a row are one
    document (e.g. gptfast.data's ``doc``; any labels work, only changes count). Reads the
    segment count and longest length on the host (a synchronisation on a GPU)."""
    if doc_ids.dim() != 2 or doc_ids.dtype.is_floating_point:
        raise ValueError(f"GPT: doc_ids must be (batch, seqlen) integers, got {doc_ids.dtype} {tuple(doc_ids.shape)}")
    b, t = doc_ids.shape
    starts = torch.ones(b, t, dtype=torch.bool, device=doc_ids.device)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    flat = starts.flatten()
    index = torch.arange(b * t, device=doc_ids.device)
    first = torch.nonzero(flat).flatten()
    cu = torch.cat([first, first.new_tensor([b * t])]).to(torch.int32)
    # each token's position: its index minus the index of the latest segment start at or before it
    seg_start = torch.cummax(torch.where(flat, index, torch.zeros_like(index)), dim=0).values
    lengths = cu[1:] - cu[:-1]
    return Segments(cu, int(lengths.max()) if lengths.numel() else 0, (index - seg_start).view(b, t))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, config.bias, config.dropout,
                                        n_kv_head=config.n_kv_head, attn_dropout=config.attn_dropout)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config.n_embd, 4 * config.n_embd, config.bias, config.gelu_approximate, config.dropout)

    def forward(self, x: torch.Tensor, segments: Segments | None = None, residual: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pre-norm block on the residual stream x + residual (x alone when ``residual`` is
        None), all (B, T, C); returns the stream after the block the same way, as (h, residual):
        GPT-2's ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))`` with each add fused into the
        LayerNorm that reads its result (gptfast.layer_norm's ``residual=``, ``prenorm=True``),
        so the stream is read and written once less per LayerNorm."""
        a, residual = self.ln_1(x, residual, prenorm=True)
        a, residual = self.ln_2(self.attn(a, segments), residual, prenorm=True)
        return self.mlp(a), residual

    def forward_cached(self, x: torch.Tensor, k_cache, v_cache, cache_len: int,
                       residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        a, residual = self.ln_1(x, residual, prenorm=True)
        a, residual = self.ln_2(self.attn.forward_cached(a, k_cache, v_cache, cache_len), residual, prenorm=True)
        return self.mlp(a), residual


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying (GPT-2)
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) so the residual stream's
        # variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; ``non_embedding`` leaves out the position embeddings (the token
        embedding counts once, as the tied output layer)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N for the matmuls with the weights plus
        12 * L * H * D * T for attention (PaLM appendix B's estimate, as nanoGPT)."""
        c = self.config
        t = c.block_size if seq_len is None else seq_len
        return 6.0 * self.num_params() + 12.0 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * t

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, *, return_logits: bool | None = None):
        """idx (B, T) int64 token ids -> (logits (B, T, vocab) or None, loss or None).

        With ``targets`` (B, T) (-1: ignored) the loss is gptfast.linear_cross_entropy of the final
        hidden states and the lm_head weight: the (B*T, vocab) logits are never materialised and
        ``logits`` is None, unless ``return_logits=True`` asks for them (then they are computed and
        the loss is F.cross_entropy of them, the unfused path). Without targets the logits are
        always returned (``return_logits=False`` is then an error: nothing would be returned).

        ``doc_ids`` (B, T) integers packs documents: a token attends only to earlier tokens of its
        own document (consecutive equal ids in a row; gptfast.attention_varlen) and its position
        embedding counts from its document's start. Mask the targets that cross a boundary
        yourself (gptfast.data's batches do). Eager-friendly: the segments are read on the host.
        """
        if idx.dim() != 2:
            raise ValueError(f"GPT: idx must be (batch, seqlen) token ids, got shape {tuple(idx.shape)}")
        b, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"GPT: sequence length {t} exceeds block_size {self.config.block_size}")
        segments = None
        if doc_ids is None:
            pos = torch.arange(t, dtype=torch.long, device=idx.device)
        else:
            if doc_ids.shape != idx.shape or doc_ids.device != idx.device:
                raise ValueError(f"GPT: doc_ids must have idx's shape {tuple(idx.shape)} and device {idx.device}, "
                                 f"got {tuple(doc_ids.shape)} on {doc_ids.device}")
            segments = document_segments(doc_ids)
            pos = segments.positions
            if segments.cu_seqlens.numel() == b + 1:
                segments = None  # one document per row: the dense kernels (faster) do the same
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        residual = None  # the residual stream is x + residual (gptfast.model.Block.forward)
        for block in self.transformer.h:
            x, residual = block(x, segments, residual)
        h = self.transformer.ln_f(x, residual)  # (B, T, C)
        if targets is not None and not return_logits:
            return None, linear_cross_entropy(h, self.lm_head.weight, targets, ignore_index=-1)
        if return_logits is False:
            raise ValueError("GPT: return_logits=False without targets returns nothing; pass targets")
        logits = self.lm_head(h)  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss

    def configure_optimizer(self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95),
                            device_type: str = "cpu") -> torch.optim.AdamW:
        """AdamW with weight decay on matrices and embeddings only (not biases or LayerNorm gains)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # fused: one kernel over all parameters instead of a Python loop over them (on the CPU as
        # well: 6.6x faster than the loop for the small preset's 10.8M parameters, 2 threads)
        extra = {}
        if device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters:
            extra["fused"] = True
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)

    def kv_cache(self, batch: int, length: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Empty per-layer (k_cache, v_cache) pairs, (batch, length, n_kv_head, head_dim) in the
        model's dtype and device (length: block_size), for :meth:`forward_cached`."""
        c = self.config
        length = c.block_size if length is None else length
        w = self.lm_head.weight
        shape = (batch, length, c.n_kv_head or c.n_head, c.n_embd // c.n_head)
        return [(w.new_zeros(shape), w.new_zeros(shape)) for _ in range(c.n_layer)]

    @torch.no_grad()
    def forward_cached(self, idx: torch.Tensor, cache: list, cache_len: int) -> torch.Tensor:
        """Logits (B, T, vocab) of idx (B, T), the tokens at positions cache_len .. cache_len + T - 1
        after the ``cache_len`` tokens whose keys/values ``cache`` (:meth:`kv_cache`) holds; their
        keys/values are appended to it. Inference only (no dropout, no gradients)."""
        t = idx.shape[1]
        if cache_len + t > cache[0][0].shape[1]:
            raise ValueError(f"GPT: {cache_len} cached + {t} new tokens exceed the cache's {cache[0][0].shape[1]}")
        pos = torch.arange(cache_len, cache_len + t, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        residual = None
        for block, (kc, vc) in zip(self.transformer.h, cache):
            x, residual = block.forward_cached(x, kc, vc, cache_len, residual)
        return self.lm_head(self.transformer.ln_f(x, residual))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to idx (B, T); returns (B, T + max_new_tokens).

        ``temperature`` <= 0 means greedy decoding; ``top_k`` keeps the k most likely tokens.
        With ``use_cache`` the prompt is run once (prefill) and each new token attends to a
        preallocated KV cache (gptfast.flash_attn_with_kvcache): O(T) per token instead of a
        forward over the whole context. Once the sequence outgrows block_size, the context slides
        and each further token re-runs the last block_size tokens (as without the cache).
        """
        cache, cached = None, 0
        if use_cache and idx.shape[1] <= self.config.block_size:
            cache = self.kv_cache(idx.shape[0])
        for _ in range(max_new_tokens):
            if cache is not None and idx.shape[1] <= self.config.block_size:
                logits = self.forward_cached(idx[:, cached:], cache, cached)
                cached = idx.shape[1]
            else:
                logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :].float()
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)
        return idx

    @classmethod
    def from_pretrained_file(cls, path: str | os.PathLike, **overrides) -> "GPT":
        """Load GPT-2 weights from a local file or directory, with nanoGPT or Hugging Face naming.

        ``path`` may be a ``.pt``/``.bin``/``.safetensors`` state dict, a nanoGPT checkpoint
        (``{"model": ..., "model_args": ...}``), or a Hugging Face model directory
        (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``). Hugging Face's Conv1D
        weights, stored (in, out), are transposed to nn.Linear's (out, in). The configuration is
        read from the shapes; the head count from the checkpoint's config if it has one, else
        ``n_embd // 64`` (true for every GPT-2 size). ``overrides`` set GPTConfig fields.
        """
        state, meta = _read_checkpoint(os.fspath(path))
        state, hf_layout = _normalise_gpt2_keys(state)
        wte = state["transformer.wte.weight"]
        n_layer = 1 + max((int(k.split(".")[2]) for k in state if k.startswith("transformer.h.")), default=-1)
        inferred = dict(vocab_size=wte.shape[0], n_embd=wte.shape[1],
                        block_size=state["transformer.wpe.weight"].shape[0], n_layer=n_layer,
                        bias="transformer.ln_f.bias" in state, n_head=meta.get("n_head", wte.shape[1] // 64))
        valid = {f.name for f in fields(GPTConfig)}
        config = GPTConfig(**{**inferred, **{k: v for k, v in meta.items() if k in valid}, **overrides})
        model = cls(config)
        if hf_layout:
            for k in list(state):
                if k.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
                    state[k] = state[k].t()
        state.setdefault("lm_head.weight", wte)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"GPT.from_pretrained_file({path}): checkpoint does not match the model "
                             f"(missing {missing}, unexpected {unexpected})")
        return model


def _read_checkpoint(path: str) -> tuple[dict, dict]:
    """(state dict, config hints) from a file or a Hugging Face style directory."""
    meta: dict = {}
    if os.path.isdir(path):
        cfg = os.path.join(path, "config.json")
        if os.path.exists(cfg):
            with open(cfg) as f:
                hf = json.load(f)
            meta = {k: hf[h] for k, h in (("n_head", "n_head"), ("block_size", "n_positions"))
                    if h in hf}
            if hf.get("activation_function") == "gelu":
                meta["gelu_approximate"] = "none"
        for name in ("model.safetensors", "pytorch_model.bin", "ckpt.pt"):
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"no model.safetensors, pytorch_model.bin or ckpt.pt in {path}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise ImportError("reading .safetensors needs the 'safetensors' package") from exc
        obj = load_file(path)
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        args = obj.get("model_args") or obj.get("config") or {}
        meta.update({k: v for k, v in dict(args).items() if k in {f.name for f in fields(GPTConfig)}})
        obj = obj["model"]
    return dict(obj), meta


def _normalise_gpt2_keys(state: dict) -> tuple[dict, bool]:
    """nanoGPT names for a nanoGPT / HF / compiled / DDP state dict, and whether it is HF's layout."""
    out = {}
    for k, v in state.items():
        for prefix in ("_orig_mod.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.endswith((".attn.bias", ".attn.masked_bias")) and v.dim() != 1:
            continue  # causal-mask buffers of HF / old nanoGPT, not parameters
        if not k.startswith(("transformer.", "lm_head.")):
            k = "transformer." + k  # HF GPT2Model has no "transformer." prefix
        out[k] = v
    if "transformer.wte.weight" not in out:
        raise ValueError("not a GPT-2 state dict: no wte (token embedding) weight")
    c = out["transformer.wte.weight"].shape[1]
    attn_w = out.get("transformer.h.0.attn.c_attn.weight")
    hf_layout = attn_w is not None and tuple(attn_w.shape) == (c, 3 * c)
    return out, hf_layout


def config_dict(config: GPTConfig) -> dict:
    """Plain-dict form of a config, for checkpoints."""
    return asdict(config)
