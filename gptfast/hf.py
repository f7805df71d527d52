"""Hugging Face transformers integration: ``attn_implementation="gptfast"``.

    import gptfast.hf
    gptfast.hf.register()        # once; gptfast.patch(model) also calls it for HF models
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="gptfast")
    model.set_attn_implementation("gptfast")     # or switch a model you already have

:func:`register` adds ``"gptfast"`` to transformers' ``AttentionInterface`` (the function every
decoder that supports the interface calls with query (B, H, Tq, D) and key/value (B, Hkv, Tk, D),
the keys already concatenated with the KV cache) and to its ``AttentionMaskInterface`` (what the
model builds its masks with). gptfast's attention reads the (B, H, T, D) tensors as strided
(B, T, H, D) views, no copy, and handles:

- GQA/MQA (H % Hkv == 0, no ``repeat_kv``), ``scaling``, ``is_causal``, ``softcap`` (Gemma-2),
  ``sliding_window`` (query i sees the ``sliding_window`` keys ending at i, transformers' rule),
  ``dropout`` in training (gptfast's kernels and RNG);
- decoding with a KV cache (Tq != Tk; causal aligned to the last key, as the cache lays them out);
- padding masks: the mask function hands the attention a (B, Tk) keep mask instead of a 4-D one,
  and attention runs the packed varlen path (unpad, attend, pad: outputs at padded query
  positions are 0, as FlashAttention's transformers integration gives).

Everything else falls back to transformers' own ``sdpa`` (or the model's eager function where
sdpa cannot: softcap, attention weights, attention sinks) with the 4-D mask the model asked for:
a custom 4-D mask, packed sequences found from ``position_ids``, bidirectional or chunked masks,
a static cache, ``s_aux`` (attention sinks), ``output_attentions`` (weights), ``position_bias``,
other non-None arguments, head dims above 256, a sliding window over a padding mask with holes, and,
under ``torch.compile``, padding masks (unpadding has data-dependent shapes). Each fallback taken in
eager mode is counted in :data:`fallbacks` (reason -> calls); under torch.compile nothing is
counted (a counter that changes per call would make dynamo recompile), the decisions themselves
depend only on argument types and shapes, so a compiled graph never breaks on them.
"""
from __future__ import annotations

import sys

import torch

from .ops import attention
from .ops.attention import MAX_HEADDIM
from .ops.varlen import attention_varlen, pad_input, unpad_input

__all__ = ["NAME", "register", "attention_forward", "attention_mask", "fallbacks", "causal_lm_loss"]

NAME = "gptfast"
fallbacks: dict[str, int] = {}   # reason -> eager calls that fell back to sdpa/eager

# kwargs transformers passes along that do not change what attention computes
_HARMLESS = {"position_ids", "cache_position", "use_cache", "output_attentions", "layer_idx",
             "past_key_values", "cache", "return_dict", "token_type_ids"}


def register() -> str:
    """Register ``"gptfast"`` with transformers' attention and mask interfaces (idempotent);
    returns the name. Raises ImportError naming the extra when transformers is missing."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("gptfast.hf needs transformers with the attention interface (>= 4.48): "
                          "pip install 'gptfast[hf]'") from exc
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, attention_mask)
    return NAME


# --------------------------------------------------------------------------------- the mask


def attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                   mask_function=None, attention_mask=None, allow_is_causal_skip=None,
                   local_size=None, config=None, **kwargs):
    """transformers' mask-interface function for ``"gptfast"``.

    Returns None (no padding) or the (batch, kv_length) bool keep mask when the model asks for
    the plain causal or the causal sliding-window mask and its keys end at the last query (every
    dynamic cache); the attention function then knows the pattern from ``is_causal`` and
    ``sliding_window``. For any other pattern the full 4-D bool mask transformers' sdpa would use,
    which makes the attention fall back.
    """
    from transformers import masking_utils as mu
    sliding = (local_size is not None and local_size == getattr(config, "sliding_window", None)
               and local_size != getattr(config, "attention_chunk_size", None))
    plain = mask_function is mu.causal_mask_function and local_size is None
    aligned = isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset + q_length == kv_offset + kv_length
    if allow_is_causal_skip is True and (plain or sliding) and aligned:
        if attention_mask is None:
            return None
        keep = attention_mask[:, -kv_length:].bool()
        if keep.shape[1] == kv_length:
            if torch.compiler.is_compiling() or not bool(keep.all()):
                return keep
            return None
    kwargs.pop("allow_is_bidirectional_skip", None)
    return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                        allow_is_causal_skip=False, allow_is_bidirectional_skip=False, local_size=local_size,
                        config=config, **kwargs)


# ---------------------------------------------------------------------------- the attention


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None,
                      is_causal: bool | None = None, **kwargs):
    """transformers' attention-interface function for ``"gptfast"``.

    Args:
        query: (B, H, Tq, D); key, value: (B, Hkv, Tk, D), H % Hkv == 0, keys including the cache.
        attention_mask: what :func:`attention_mask` returned: None, a (B, Tk) bool keep mask, or a
            4-D mask (which falls back).
        dropout, scaling, sliding_window, softcap, is_causal: as transformers passes them.

    Returns:
        (out (B, Tq, H, D), None) -- attention weights are never materialised.
    """
    reason, eager = _why_fallback(query, attention_mask, softcap, kwargs)
    if reason is not None:
        return _fall_back(reason, eager, module, query, key, value, attention_mask, dropout=dropout,
                          scaling=scaling, sliding_window=sliding_window, softcap=softcap, is_causal=is_causal,
                          **kwargs)
    b, _, tq, _ = query.shape
    tk = key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = (sliding_window - 1, sliding_window - 1) if sliding_window and tk > sliding_window else (-1, -1)
    state = module.__dict__.get("_gptfast_patch")
    options = dict(softmax_scale=scaling, window_size=window, softcap=float(softcap or 0.0),
                   dropout_p=float(dropout), backend=state.backend if state is not None else None)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))                # (B, T, H, D) views
    if attention_mask is None:
        return attention(q, k, v, causal=bool(causal), **options), None
    keep = attention_mask                                                       # (B, Tk) bool
    if window != (-1, -1) and bool((keep[:, 0].int() + (~keep[:, :-1] & keep[:, 1:]).sum(1) > 1).any()):
        # packing closes the holes, so distances in the window would be counted without them
        return _fall_back("sliding window over a padding mask with holes", softcap is not None, module, query,
                          key, value, attention_mask, dropout=dropout, scaling=scaling,
                          sliding_window=sliding_window, softcap=softcap, is_causal=is_causal, **kwargs)
    q_p, idx_q, cu_q, max_q, _ = unpad_input(q, keep[:, tk - tq:])
    k_p, _, cu_k, max_k, _ = unpad_input(k, keep)
    v_p = unpad_input(v, keep)[0]
    y = attention_varlen(q_p, k_p, v_p, cu_q, cu_k, max_q, max_k, causal=bool(causal), **options)
    return pad_input(y, idx_q, b, tq), None


def _why_fallback(query, mask, softcap, kwargs) -> tuple[str | None, bool]:
    """(reason, needs the eager function) for a call gptfast does not run, (None, False) otherwise.
    Depends only on Python values, types and shapes: graph-safe under torch.compile."""
    if kwargs.get("s_aux") is not None:
        return "attention sinks (s_aux)", True
    if _weights_requested(kwargs):
        return "attention weights requested (output_attentions)", True
    odd = sorted(k for k, v in kwargs.items() if v is not None and k not in _HARMLESS and k != "s_aux")
    if odd:
        return f"unsupported arguments {odd}", softcap is not None
    if query.shape[-1] > MAX_HEADDIM:
        return f"head dim {query.shape[-1]} > {MAX_HEADDIM}", softcap is not None
    if mask is not None:
        if mask.dim() != 2:
            return "a 4-D attention mask (custom, packed, bidirectional, chunked or static-cache)", softcap is not None
        if torch.compiler.is_compiling():
            return "padding mask under torch.compile", softcap is not None
    return None, False


def _weights_requested(kwargs) -> bool:
    if kwargs.get("output_attentions"):
        return True
    if torch.compiler.is_compiling():
        return False
    try:  # transformers 5 collects attentions with hooks, requested through a context variable
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    collected = _active_collector.get()
    return bool(collected) and "attentions" in collected


def count_fallback(reason: str) -> None:
    from .patch import count_fallback as count
    count(fallbacks, reason)


def _fall_back(reason: str, eager: bool, module, query, key, value, mask, *, sliding_window, is_causal, softcap,
               **kwargs):
    """Run transformers' sdpa (or the model's eager attention) on the 4-D mask the call means."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    count_fallback(reason)
    tq, tk = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if mask is None or mask.dim() == 2:  # what gptfast's mask function left implicit, made explicit
        mask = _dense_mask(mask, query.shape[0], tq, tk, bool(causal), sliding_window, query.device)
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None) if eager else None
    if fn is None:
        return sdpa_attention_forward(module, query, key, value, mask, is_causal=False if mask is not None else causal,
                                      sliding_window=sliding_window, softcap=softcap, **kwargs)
    if kwargs.get("scaling") is None:  # eager functions multiply by it
        kwargs["scaling"] = query.shape[-1] ** -0.5
    if mask is not None and mask.dtype == torch.bool:  # eager functions add the mask to the scores
        mask = torch.where(mask, 0.0, torch.finfo(query.dtype).min).to(query.dtype)
    if softcap is not None:
        kwargs["softcap"] = softcap
    return fn(module, query, key, value, mask, sliding_window=sliding_window, **kwargs)


def _dense_mask(keep, b: int, tq: int, tk: int, causal: bool, sliding_window, device):
    """The (B or 1, 1, Tq, Tk) bool mask that gptfast's (keep mask, is_causal, sliding_window)
    stand for, keys aligned to the last query; None when nothing is masked."""
    i = torch.arange(tq, device=device)[:, None] + (tk - tq)
    j = torch.arange(tk, device=device)[None, :]
    allowed = None
    if causal:
        allowed = j <= i
    if sliding_window:
        near = (j > i - sliding_window) & (j < i + sliding_window)
        allowed = near if allowed is None else allowed & near
    if keep is not None:
        pad = keep[:, None, None, :]
        return pad if allowed is None else allowed[None, None] & pad
    return None if allowed is None else allowed[None, None].expand(b, 1, tq, tk)


# ------------------------------------------------------------------ the fused loss (opt-in)

# config attributes that change the logits between the decoder's last hidden state and the
# loss in ways causal_lm_loss does not reproduce (Cohere's logit_scale, Granite's logits_scaling, ...)
_LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "output_multiplier_scale", "mup_width_multiplier")


def causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                   ignore_index: int = -100, backend: str | None = None, **kwargs) -> torch.Tensor:
    """The causal-LM loss of a Hugging Face ``*ForCausalLM`` model through
    :func:`gptfast.linear_cross_entropy`: the same value and gradients as
    ``model(input_ids, labels=labels, **kwargs).loss`` without the (tokens, vocab) logits.

    A model's own forward (``gptfast.patch`` leaves it alone) builds all logits, then the loss;
    this runs the model's decoder (``model.base_model``) for the last hidden states and fuses the
    lm_head (``model.get_output_embeddings()``, tied or not, its bias if any) with the shifted
    cross-entropy, chunk by chunk. Gemma-2's ``final_logit_softcapping`` is applied inside the op.
    A model whose logits are rescaled between the decoder and the loss (``logit_scale``, ...) raises
    NotImplementedError naming the attribute.

    Args:
        input_ids: (B, T) token ids; ``labels``: (B, T), shifted inside as transformers does
            (position t predicts labels[t + 1]); default: ``input_ids``. ``ignore_index`` labels
            (-100, transformers' convention) do not count.
        kwargs: passed to the decoder (``attention_mask``, ``position_ids``, ...).

    Returns:
        The mean loss over the counted tokens (fp32), a 0-d tensor.
    """
    from .ops.linear_cross_entropy import linear_cross_entropy
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    if not isinstance(head, torch.nn.Linear) or base is None or base is model:
        raise TypeError(f"gptfast.hf.causal_lm_loss: {type(model).__name__} is not a transformers *ForCausalLM "
                        "model with a base_model and a Linear lm_head (get_output_embeddings())")
    cfg = getattr(model, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(cfg, name, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(f"gptfast.hf.causal_lm_loss: {type(model).__name__} rescales its logits "
                                      f"(config.{name}={value!r}); use the model's own loss")
    labels = input_ids if labels is None else labels
    hidden = base(input_ids=input_ids, **kwargs).last_hidden_state  # (B, T, C)
    softcap = getattr(cfg, "final_logit_softcapping", None) or None
    return linear_cross_entropy(hidden[:, :-1], head.weight, labels[:, 1:], head.bias, ignore_index=ignore_index,
                                softcap=softcap, backend=backend)
