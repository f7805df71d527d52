"""Direct attention patches for Hugging Face decoders that do not use transformers' attention
interface (GPT-Neo, BLOOM, Falcon): one ``(prepare, forward)`` pair per attention class name.

Contract with :mod:`gptfast.patch`:

- ``prepare(module) -> (config, note)``: ``config`` is a dict stored on the module's patch state
  (``module._gptfast_patch.config``) and ``note`` a sentence for the report; or ``(None, reason)``
  when the module cannot be patched (the reason is reported).
- ``forward(module, *args, **kwargs)``: the module's forward, with the original's signature and
  return value, running attention on gptfast ops with ``backend=module._gptfast_patch.backend``.
  A call gptfast cannot compute exactly returns ``gptfast.patch._fallback(module, reason, *args,
  **kwargs)``, which runs the original forward (and counts the reason in eager mode).

Each forward follows its transformers 5 original line by line up to the KV-cache update (so the
cache holds exactly what the original would put there and a fallback call can continue it), then
hands the (B, H, T, D) tensors to gptfast as strided (B, T, H, D) views. The 4-D mask the model
built is read with :func:`gptfast.patch._mask_keep`: the plain causal mask runs dense attention,
causal + padding runs the packed varlen path (outputs at padded query rows are 0; they are
discarded by every loss and by generation), anything else falls back. Attention weights are
never materialised, so ``output_attentions=True`` falls back; so does every call under
torch.compile (reading the mask is data-dependent).

What each model computes, read from transformers 5.24's modeling files:

- GPT-Neo (``GPTNeoSelfAttention``): scores are *not* scaled (softmax_scale=1). Local layers keep
  ``bias = tril ^ tril(-window_size)``: query i sees keys i-window_size < j <= i, i.e.
  ``window_size=(window_size - 1, 0)``, counted in positions of the cache frame; padding packed
  away keeps distances only when each row's real tokens are contiguous (left or right padding),
  so a local layer over a mask with holes falls back. ``attn_dropout`` on the probabilities.
- BLOOM (``BloomAttention``): ``alibi.baddbmm(q, k^T, beta, alpha=inv_norm_factor)`` with
  ``alibi = slope_h * (number of real tokens before key j)``: by the softmax's shift invariance
  that is ``-slope_h * (i - j)`` over the real tokens, which the varlen path counts exactly, holes
  included. The slopes are derived here (the ALiBi paper's geometric sequence, computed with
  the same float32 ops as transformers) and every call checks that the model's alibi tensor is
  exactly those slopes times those positions, else it falls back. Without a mask BLOOM attends to
  every key (no causal mask): only a single query (decoding) is run then.
- Falcon (``FalconAttention``): rotary models (the model's own ``apply_rotary_pos_emb``) have no
  attention dropout, not even in training (transformers applies none on that path). Keys and
  values: one head (multi_query), ``num_kv_heads`` groups (new_decoder_architecture: the module
  repeats each group's key to its query heads; gptfast reads one head of each group, GQA), or one
  per query head. ``alibi=True``: the model folds ``alibi / sqrt(head_dim)`` into the 4-D mask;
  the sdpa path adds it once, the eager path adds it a second time (``(q.k + alibi) *
  inv_norm_factor + mask``), and gptfast reproduces whichever path the config selects. Falcon
  builds alibi from bfloat16-rounded slopes in bfloat16 arithmetic: each call checks that the
  tensor is exactly linear in position (heads a power of two and fewer than 256 positions make it
  so), else it falls back.
"""
from __future__ import annotations

import inspect
import math
import sys
import weakref

import torch
import torch.nn.functional as F

from .ops import attention
from .ops.attention import MAX_HEADDIM
from .ops.varlen import attention_varlen, pad_input, unpad_input

__all__ = ["DIRECT_ATTENTION"]

_STATE = "_gptfast_patch"


# ------------------------------------------------------------------------------------ helpers


def _fallback(m, reason, *args, **kwargs):
    from .patch import _fallback as fallback  # patch imports this module
    return fallback(m, reason, *args, **kwargs)


def _keep(mask, tq: int, tk: int):
    """True (plain causal), a (B, Tk) keep mask (causal + padding) or None, for a 4-D mask."""
    from .patch import _mask_keep
    return _mask_keep(mask, tq, tk)


_holes_memo: list = [None]  # (weakref to the last keep mask checked, its version, verdict)


def _has_holes(keep: torch.Tensor) -> bool:
    """Whether some row's kept positions are not one contiguous run (packing would shorten the
    distances across a hole). Memoised for the last mask: every local layer gets the same one."""
    memo = _holes_memo[0]
    if memo is not None and memo[0]() is keep and memo[1] == keep._version:
        return memo[2]
    starts = keep[:, :1].int().sum(1) + (~keep[:, :-1] & keep[:, 1:]).sum(1)
    verdict = bool((starts > 1).any())
    _holes_memo[0] = (weakref.ref(keep), keep._version, verdict)
    return verdict


def _positions(keep, b: int, tk: int, device) -> torch.Tensor:
    """(B, Tk) int64: each key's index among its row's real tokens (0 at padding), as BLOOM's and
    Falcon's build_alibi_tensor count them."""
    if keep is True:
        return torch.arange(tk, device=device).expand(b, tk)
    k = keep.long()
    return (k.cumsum(-1) - 1) * k


def _attend(m, q, k, v, keep, *, scale: float, window=(-1, -1), alibi_slopes=None, dropout_p: float = 0.0):
    """q (B, Tq, H, D), k/v (B, Tk, Hkv, D) views; causal over ``keep`` (True or (B, Tk) bool)."""
    options = dict(causal=True, softmax_scale=scale, window_size=window, alibi_slopes=alibi_slopes,
                   dropout_p=dropout_p, backend=m.__dict__[_STATE].backend)
    if keep is True:
        return attention(q, k, v, **options)
    b, tq = q.shape[:2]
    tk = k.shape[1]
    q_p, idx_q, cu_q, max_q, _ = unpad_input(q, keep[:, tk - tq:])
    k_p, _, cu_k, max_k, _ = unpad_input(k, keep)
    v_p = unpad_input(v, keep)[0]
    y = attention_varlen(q_p, k_p, v_p, cu_q, cu_k, max_q, max_k, **options)
    return pad_input(y, idx_q, b, tq)


def _kv_length(cache, idx: int, tq: int) -> int | None:
    """How many keys the cache update will return for a ``tq``-token call, when its layer is a
    plain growing one (transformers' DynamicLayer, or one it will create lazily) whose keys are the
    positions the 4-D mask counts; None for static, sliding-window, quantized or offloaded layers
    (their keys are laid out otherwise), which fall back before anything is computed."""
    if cache is None:
        return tq
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or getattr(cache, "offloading", False):
        return None
    cls = type(layers[idx]) if idx < len(layers) else getattr(cache, "layer_class_to_replicate", None)
    if getattr(cls, "__name__", None) != "DynamicLayer":
        return None
    return (layers[idx].get_seq_length() if idx < len(layers) else 0) + tq


def _slopes_on(cfg: dict, factor: float, device) -> torch.Tensor:
    """cfg["slopes"] * factor on ``device``, kept per (factor, device): no host-to-device copy per call."""
    memo = cfg.setdefault("slopes_on", {})
    key = (factor, str(device))
    if key not in memo:
        memo[key] = (cfg["slopes"] * factor).to(device)
    return memo[key]


def _common_reason(output_attentions) -> str | None:
    if output_attentions:
        return "attention weights requested (output_attentions)"
    if torch.compiler.is_compiling():
        return "under torch.compile (reading the 4-D mask is data-dependent)"
    return None


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """The ALiBi paper's per-head slopes (float32, (n_heads,)), with the float32 ops BLOOM's and
    Falcon's ``build_alibi_tensor`` use, so the values agree bit for bit."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = torch.full((), 2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != n_heads:
        extra = torch.full((), 2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        rest = min(closest, n_heads - closest)
        slopes = torch.cat([slopes, torch.pow(extra, torch.arange(1, 1 + 2 * rest, 2, dtype=torch.int32))])
    return slopes


_alibi_memo: list = [None]  # (weakref to the alibi tensor, its version, the keep verdict, ok)


def _alibi_is(alibi: torch.Tensor, keep, slopes: torch.Tensor, b: int, tk: int) -> bool:
    """Whether ``alibi`` (any shape of B*H*Tk elements) is exactly slopes[h] * position[b, j] in
    its dtype. Memoised for the last tensor: the model passes the same one to every layer."""
    memo = _alibi_memo[0]
    if memo is not None and memo[0]() is alibi and memo[1] == alibi._version and memo[2] is keep:
        return memo[3]
    h = slopes.numel()
    ok = alibi.numel() == b * h * tk
    if ok:
        pos = _positions(keep, b, tk, alibi.device).to(torch.float32)
        want = (slopes.to(alibi.device).view(1, h, 1) * pos[:, None, :]).to(alibi.dtype)
        ok = torch.equal(alibi.reshape(b, h, tk), want)
    _alibi_memo[0] = (weakref.ref(alibi), alibi._version, keep, ok)
    return ok


# ------------------------------------------------------------------------------------ GPT-Neo


def _neo_prepare(m):
    kind = getattr(m, "attention_type", None)
    if kind not in ("global", "local"):
        return None, f"GPT-Neo attention_type {kind!r} is neither 'global' nor 'local'"
    if m.head_dim > MAX_HEADDIM:
        return None, f"head dim {m.head_dim} > {MAX_HEADDIM}"
    window = (-1, -1)
    if kind == "local":
        w = int(m.config.window_size)
        if w < 1:
            return None, f"window_size {w} < 1"
        window = (w - 1, 0)
    bias = m.bias
    if bias.device.type != "meta":  # the mask the original applies: check it is the one we run
        t = bias.shape[-1]
        want = torch.ones(t, t, dtype=torch.bool, device=bias.device).tril()
        if kind == "local":
            want &= ~want.tril(-(window[0] + 1))
        if not torch.equal(bias.reshape(-1, t, t)[0].bool(), want):
            return None, f"its 'bias' mask buffer is not the {kind} causal mask of window_size={m.config.window_size}"
    note = ("GPT-Neo: unscaled scores (softmax_scale=1)"
            + (f", local window of {window[0] + 1} keys (window_size={window})" if kind == "local" else "")
            + "; padding via varlen; KV cache")
    p = float(m.attn_dropout.p)
    if p > 0:
        note += f"; attention dropout p={p:g} in training mode runs in gptfast's kernels"
    return {"window": window, "max_positions": bias.shape[-1]}, note


def _neo_forward(m, hidden_states, attention_mask=None, layer_past=None, use_cache=False,
                 output_attentions=False, **kwargs):
    args = (hidden_states,)
    kw = dict(attention_mask=attention_mask, layer_past=layer_past, use_cache=use_cache,
              output_attentions=output_attentions, **kwargs)
    why = _common_reason(output_attentions)
    if why:
        return _fallback(m, why, *args, **kw)
    cfg = m.__dict__[_STATE].config
    b, tq = hidden_states.shape[:2]
    tk = _kv_length(layer_past, m.layer_id, tq)
    if tk is None:
        return _fallback(m, "a KV cache that is not a plain DynamicCache layer", *args, **kw)
    if tk > cfg["max_positions"]:
        return _fallback(m, "more keys than max_position_embeddings", *args, **kw)
    keep = True if attention_mask is None else _keep(attention_mask, tq, tk)
    if keep is None:
        return _fallback(m, "the attention mask is not causal + padding", *args, **kw)
    if keep is not True and cfg["window"] != (-1, -1) and _has_holes(keep):
        return _fallback(m, "local attention over a padding mask with holes", *args, **kw)
    query = m._split_heads(m.q_proj(hidden_states), m.num_heads, m.head_dim)
    key = m._split_heads(m.k_proj(hidden_states), m.num_heads, m.head_dim)
    value = m._split_heads(m.v_proj(hidden_states), m.num_heads, m.head_dim)
    if layer_past is not None:
        key, value = layer_past.update(key, value, m.layer_id)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))                   # (B, T, H, D) views
    y = _attend(m, q, k, v, keep, scale=1.0, window=cfg["window"],
                dropout_p=float(m.attn_dropout.p) if m.training else 0.0)
    out = m.resid_dropout(m.out_proj(y.reshape(b, tq, m.embed_dim)))
    return out, None


# -------------------------------------------------------------------------------------- BLOOM


def _bloom_prepare(m):
    if m.head_dim > MAX_HEADDIM:
        return None, f"head dim {m.head_dim} > {MAX_HEADDIM}"
    slopes = alibi_slopes(m.num_heads)
    cfg = {"scale": float(m.inv_norm_factor), "slopes": slopes, "beta": float(m.beta)}
    note = (f"BLOOM: ALiBi (slopes checked against the model's alibi each forward), "
            f"scale inv_norm_factor={m.inv_norm_factor:.4g}, padding via varlen; KV cache")
    p = float(m.attention_dropout.p)
    if p > 0:
        note += f"; attention dropout p={p:g} in training mode runs in gptfast's kernels"
    return cfg, note


def _bloom_forward(m, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                   output_attentions=False, **kwargs):
    args = (hidden_states, residual, alibi, attention_mask)
    kw = dict(layer_past=layer_past, use_cache=use_cache, output_attentions=output_attentions, **kwargs)
    why = _common_reason(output_attentions)
    if why:
        return _fallback(m, why, *args, **kw)
    cfg = m.__dict__[_STATE].config
    b, tq = hidden_states.shape[:2]
    tk = _kv_length(layer_past, m.layer_idx, tq)
    if tk is None:
        return _fallback(m, "a KV cache that is not a plain DynamicCache layer", *args, **kw)
    if attention_mask is None:
        if tq > 1:  # BLOOM then adds no mask at all: every query sees every key
            return _fallback(m, "no attention mask (BLOOM is then not causal)", *args, **kw)
        keep = True
    else:
        keep = _keep(attention_mask, tq, tk)
        if keep is None:
            return _fallback(m, "the attention mask is not causal + padding", *args, **kw)
    if not _alibi_is(alibi, keep, cfg["slopes"], b, tk):
        return _fallback(m, "the alibi tensor is not the standard slopes times the token positions", *args, **kw)
    query, key, value = m._reshape(m.query_key_value(hidden_states))            # (B, H, T, D) views
    if layer_past is not None:
        key, value = layer_past.update(key, value, m.layer_idx)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    slopes = _slopes_on(cfg, cfg["beta"], hidden_states.device)
    y = _attend(m, q, k, v, keep, scale=cfg["scale"], alibi_slopes=slopes,
                dropout_p=float(m.attention_dropout.p) if m.training else 0.0)
    context = y.reshape(b, tq, m.hidden_size)
    if m.pretraining_tp > 1 and m.slow_but_exact:  # the original's sliced output projection
        s = m.hidden_size / m.pretraining_tp
        out = torch.zeros_like(context)
        for i in range(m.pretraining_tp):
            cols = slice(int(i * s), int((i + 1) * s))
            out = out + F.linear(context[:, :, cols], m.dense.weight[:, cols])
    else:
        out = m.dense(context)
    out = residual + F.dropout(out, p=m.hidden_dropout, training=m.training)      # BLOOM's dropout_add
    return out, None


# ------------------------------------------------------------------------------------- Falcon


def _falcon_prepare(m):
    c = m.config
    if "alibi" not in inspect.signature(type(m).forward).parameters:
        # transformers >= 5.25 rewrote FalconAttention (ALiBi folded into the mask, attention
        # through ALL_ATTENTION_FUNCTIONS): this patch is written for the older forward
        return None, ("FalconAttention.forward takes no alibi argument (transformers >= 5.25's rewrite); "
                      "gptfast's Falcon patch is for transformers < 5.25")
    if m.head_dim > MAX_HEADDIM:
        return None, f"head dim {m.head_dim} > {MAX_HEADDIM}"
    h = m.num_heads
    if m.new_decoder_architecture:
        groups = int(c.num_kv_heads)
        if groups < 1 or h % groups:
            return None, f"new_decoder_architecture with num_kv_heads={groups} not dividing {h} heads"
        layout = f"{groups} key/value group(s) (new_decoder_architecture)"
    elif m.multi_query:
        groups = 1
        layout = "one key/value head (multi_query)"
    else:
        groups = h
        if m.num_kv_heads != h:
            return None, f"num_kv_heads={m.num_kv_heads} != {h} heads without new_decoder_architecture"
        layout = "a key/value head per query head"
    rope = getattr(sys.modules.get(type(m).__module__), "apply_rotary_pos_emb", None)
    if not c.alibi and rope is None:
        return None, "no apply_rotary_pos_emb in the model's module"
    cfg = {"groups": groups, "alibi": bool(c.alibi), "rope": rope,
           "slopes": alibi_slopes(h).bfloat16().float() if c.alibi else None}
    if c.alibi:
        p = float(m.attention_dropout.p)
        note = ("Falcon: ALiBi (checked against the model's alibi and mask each forward), " + layout
                + "; padding via varlen; KV cache"
                + (f"; attention dropout p={p:g} in training mode runs in gptfast's kernels" if p > 0 else ""))
    else:
        note = ("Falcon: rotary (the model's apply_rotary_pos_emb), " + layout
                + "; padding via varlen; KV cache; no attention dropout (as transformers on this path)")
    return cfg, note


_falcon_memo: list = [None]  # (weakref to the mask, its version, shape, (keep, ok))


def _falcon_alibi_mask(mask: torch.Tensor, alibi: torch.Tensor, tq: int, tk: int, head_dim: int):
    """(keep, ok) for Falcon's alibi mask: the causal + padding pattern (min where blocked) whose
    allowed entries hold alibi / sqrt(head_dim). Memoised for the last mask."""
    memo = _falcon_memo[0]
    if memo is not None and memo[0]() is mask and memo[1] == mask._version and memo[2] == (tq, tk):
        return memo[3]
    verdict = (None, False)
    if mask.dim() == 4 and mask.is_floating_point() and tuple(mask.shape[-2:]) == (tq, tk):
        blocked = mask <= torch.finfo(mask.dtype).min / 2
        keep = _keep(~blocked, tq, tk)
        b, h = mask.shape[:2]
        if keep is not None and alibi.numel() == b * h * tk:
            bias = alibi.reshape(b, h, 1, tk) / math.sqrt(head_dim)
            want = bias.to(mask.dtype).expand_as(mask).masked_fill(blocked, 0)
            verdict = (keep, torch.equal(mask.masked_fill(blocked, 0), want))
    _falcon_memo[0] = (weakref.ref(mask), mask._version, (tq, tk), verdict)
    return verdict


def _falcon_forward(m, hidden_states, alibi, attention_mask, position_ids=None, layer_past=None, use_cache=False,
                    output_attentions=False, position_embeddings=None, **kwargs):
    args = (hidden_states, alibi, attention_mask)
    kw = dict(position_ids=position_ids, layer_past=layer_past, use_cache=use_cache,
              output_attentions=output_attentions, position_embeddings=position_embeddings, **kwargs)
    why = _common_reason(output_attentions)
    if why:
        return _fallback(m, why, *args, **kw)
    cfg = m.__dict__[_STATE].config
    sdpa = m.config._attn_implementation == "sdpa"
    b, tq = hidden_states.shape[:2]
    tk = _kv_length(layer_past, m.layer_idx, tq)
    if tk is None:
        return _fallback(m, "a KV cache that is not a plain DynamicCache layer", *args, **kw)
    if (alibi is None) != (not cfg["alibi"]):
        return _fallback(m, "alibi passed to a rotary layer or missing for an alibi layer", *args, **kw)
    if attention_mask is None:
        if not sdpa:  # the eager original adds the mask unconditionally
            return _fallback(m, "no attention mask on the eager path", *args, **kw)
        if alibi is not None and tq > 1:
            return _fallback(m, "alibi without a mask (not causal)", *args, **kw)
        keep = True  # sdpa: is_causal for tq > 1, a single query sees every key
    elif alibi is None:
        keep = _keep(attention_mask, tq, tk)
    else:
        keep, ok = _falcon_alibi_mask(attention_mask, alibi, tq, tk, m.head_dim)
        if keep is not None and not ok:
            return _fallback(m, "the alibi mask does not hold alibi / sqrt(head_dim)", *args, **kw)
    if keep is None:
        return _fallback(m, "the attention mask is not causal + padding", *args, **kw)
    if alibi is not None and not _alibi_is(alibi, keep, cfg["slopes"], b, tk):
        return _fallback(m, "the alibi tensor is not linear in position (bfloat16 rounding, or not the "
                            "standard slopes)", *args, **kw)
    query, key, value = m._split_heads(m.query_key_value(hidden_states))
    n_kv = m.num_heads if m.new_decoder_architecture else m.num_kv_heads
    query = query.transpose(1, 2).reshape(b, m.num_heads, tq, m.head_dim)
    key = key.transpose(1, 2).reshape(b, n_kv, tq, m.head_dim)
    value = value.transpose(1, 2).reshape(b, n_kv, tq, m.head_dim)
    if alibi is None:
        cos, sin = position_embeddings
        query, key = cfg["rope"](query, key, cos, sin)
    if layer_past is not None:
        key, value = layer_past.update(key, value, m.layer_idx)
    if m.new_decoder_architecture:  # each group's key repeated to its heads: read one of each
        g = cfg["groups"]
        key, value = (t.unflatten(1, (g, m.num_heads // g))[:, :, 0] for t in (key, value))
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))                   # (B, T, H, D) views
    scale = 1.0 / math.sqrt(m.head_dim)
    slopes, p = None, 0.0
    if alibi is not None:
        # the mask carries alibi / sqrt(d); the eager path adds alibi * inv_norm_factor once more
        factor = scale if sdpa else scale + float(m.inv_norm_factor)
        slopes = _slopes_on(cfg, factor, hidden_states.device)
        p = float(m.attention_dropout.p) if m.training else 0.0
        if not sdpa:
            scale = float(m.inv_norm_factor)
    y = _attend(m, q, k, v, keep, scale=scale, alibi_slopes=slopes, dropout_p=p)
    return m.dense(y.reshape(b, tq, m.num_heads * m.head_dim)), None


DIRECT_ATTENTION: dict = {
    "GPTNeoSelfAttention": (_neo_prepare, _neo_forward),
    "BloomAttention": (_bloom_prepare, _bloom_forward),
    "FalconAttention": (_falcon_prepare, _falcon_forward),
}
