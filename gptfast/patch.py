"""``gptfast.patch(model)``: run an existing model's LayerNorms, attention and GELU MLPs on gptfast ops.

Patching rewires modules in place by giving each recognised module an instance-level ``forward``
(a ``functools.partial`` of a function in this file, so a patched model still deep-copies and
pickles). No parameter, buffer or submodule is created, replaced or re-laid-out: optimizer state,
``state_dict`` keys and hooks on ``c_attn``/``c_proj`` stay as they were. Hugging Face ``Conv1D``
weights, stored (in, out), reach ``gelu_ffn`` as ``weight.t()`` views; no call copies a weight.

What is recognised, by structure rather than class name:

- ``nn.LayerNorm`` (or a subclass that does not override ``forward``) over one dimension.
- nanoGPT-style causal self-attention: ``c_attn`` (Linear C -> 3C), ``c_proj`` (C -> C), ``n_head``,
  optionally ``attn_dropout``/``resid_dropout`` and a ``bias`` tril mask buffer, nothing else.
  Patching runs both forwards once on a tiny input (eval mode, own RNG) and keeps the patch only if
  they agree, so a module that is not causal, or that does something else, is left alone.
- A GELU MLP: ``c_fc``, ``c_proj`` (Linear or Conv1D), one activation (``gelu``/``act``/...) that
  is identified by evaluating it: exact-erf and tanh GELU are accepted, anything else is not.
- Hugging Face ``GPT2Attention`` (self-attention; cross-attention is left alone). Each call is
  checked: the causal mask runs dense gptfast attention; a **padding** mask (causal over the
  tokens an ``attention_mask`` keeps, any pattern: left, right, holes) runs the packed varlen path
  (unpad, attend, pad: the outputs at padded query positions are zeros, as FlashAttention's HF
  integration returns, where the original returns values nothing reads); **decoding** with a
  transformers 5 ``Cache`` (Tq != Tk, keys from the cache, bottom-right causal) runs on gptfast,
  padded or not. Anything gptfast cannot compute exactly -- another mask, ``head_mask``,
  ``output_attentions``, a legacy tuple cache, an unknown attention implementation or extra
  argument -- runs the original forward.

Attention dropout in training mode (nanoGPT's ``attn_dropout``, HF's ``attn_pdrop``) runs inside
gptfast's attention kernels (same probability; gptfast's own dropout RNG, so the mask differs from
the original module's draw, as any two dropout implementations' do).

Calls that fall back are counted per module in ``module._gptfast_patch.fallbacks``.
"""
from __future__ import annotations

import functools
import inspect
import math
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hf_direct import DIRECT_ATTENTION
from .ops import _backend, attention, gelu_ffn, layer_norm
from .ops.varlen import attention_varlen, pad_input, unpad_input

__all__ = ["patch", "unpatch", "PatchReport", "PatchEntry"]

OPS = ("attention", "layer_norm", "gelu_ffn")
_STATE = "_gptfast_patch"
_ACT_NAMES = ("gelu", "act", "activation", "act_fn")


# ----------------------------------------------------------------------------------- the report


@dataclass
class PatchEntry:
    path: str      # module path in the model ("" for the root)
    kind: str      # "layer_norm", "attention" or "gelu_ffn"
    action: str    # "patched" or "skipped"
    reason: str    # why skipped, or when a patched module still runs its original forward


@dataclass
class PatchReport:
    """What :func:`patch` did; ``str(report)`` is a table."""

    entries: list[PatchEntry] = field(default_factory=list)

    @property
    def patched(self) -> list[PatchEntry]:
        return [e for e in self.entries if e.action == "patched"]

    @property
    def skipped(self) -> list[PatchEntry]:
        return [e for e in self.entries if e.action == "skipped"]

    def __str__(self) -> str:
        head = ("module", "kind", "action", "reason")
        rows = [head] + [(e.path or "(root)", e.kind, e.action, e.reason) for e in self.entries]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join([*(r[i].ljust(widths[i]) for i in range(3)), r[3]]).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths) + "  ------")
        summary = f"gptfast.patch: {len(self.patched)} patched, {len(self.skipped)} skipped"
        return "\n".join([summary, *lines])

    def __repr__(self) -> str:
        return f"PatchReport(patched={len(self.patched)}, skipped={len(self.skipped)})"


@dataclass
class _PatchState:
    kind: str
    prev_forward: object          # an instance-level forward that was there before, or None
    backend: str | None
    config: dict
    fallbacks: dict = field(default_factory=dict)   # reason -> number of calls that fell back


# ---------------------------------------------------------------------------------- public API


def patch(model: nn.Module, ops=OPS, backend: str | None = None) -> PatchReport:
    """Rewire ``model`` in place to run on gptfast ops; returns a :class:`PatchReport`.

    Args:
        model: any ``nn.Module`` (nanoGPT-style GPT, Hugging Face GPT-2, or anything with LayerNorms).
        ops: which ops to use, a subset of ("attention", "layer_norm", "gelu_ffn").
        backend: pin the patched modules to one gptfast backend (default: the selection rules).
            Checked by name here; whether it runs on the model's device is decided when an op
            runs (as everywhere in gptfast), so a model may be patched for "cuda" while still on
            the CPU and moved afterwards. The patch-time check runs use the reference backend
            when the pinned one cannot run where the weights are.
    """
    if isinstance(ops, str):
        ops = (ops,)
    unknown = set(ops) - set(OPS)
    if unknown:
        raise ValueError(f"gptfast.patch: ops must be a subset of {OPS}, got unknown {sorted(unknown)}")
    if backend is not None:
        try:
            backend = _backend._check_name(str(backend))
        except ValueError as exc:
            raise ValueError(f"gptfast.patch: backend: {exc}") from None
    report = PatchReport()
    for path, module in model.named_modules():
        kind, why_not = _classify(module)
        if kind is None:
            continue
        if why_not is None and kind not in ops:
            why_not = f"{kind!r} not in ops"
        if why_not is None and _STATE in module.__dict__:
            why_not = "already patched"
        config, note = (None, None) if why_not else _PREPARE[kind](module)
        if why_not is None and config is None:
            why_not = note
        if why_not is None:
            state = _PatchState(kind, module.__dict__.get("forward"), backend, config)
            module.__dict__[_STATE] = state
            module.forward = functools.partial(_FORWARD[config.get("flavour", kind)], module)
            if config.get("verify"):
                why_not = _verify(module, config)
                if why_not:
                    unpatch_module(module)
        report.entries.append(PatchEntry(path, kind, "skipped" if why_not else "patched",
                                         why_not or note or ""))
    return report


def unpatch(model: nn.Module) -> int:
    """Restore every module of ``model`` that :func:`patch` rewired; returns how many."""
    return sum(unpatch_module(m) for m in model.modules())


def unpatch_module(module: nn.Module) -> bool:
    state = module.__dict__.pop(_STATE, None)
    if state is None:
        return False
    if state.prev_forward is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = state.prev_forward
    return True


# ------------------------------------------------------------------------------ recognition


def _is_gptfast_module(m: nn.Module) -> bool:
    from . import nn as gnn
    return isinstance(m, (gnn.LayerNorm, gnn.CausalSelfAttention, gnn.MLP))


def _classify(m: nn.Module) -> tuple[str | None, str | None]:
    """(kind, reason it cannot be patched or None) for a candidate module; (None, None) otherwise."""
    if isinstance(m, nn.LayerNorm):
        kind = "layer_norm"
    elif type(m).__name__ in DIRECT_ATTENTION or (isinstance(getattr(m, "c_attn", None), nn.Module)
                                                  and isinstance(getattr(m, "c_proj", None), nn.Module)):
        kind = "attention"
    elif isinstance(getattr(m, "c_fc", None), nn.Module) and isinstance(getattr(m, "c_proj", None), nn.Module):
        kind = "gelu_ffn"
    else:
        return None, None
    if _is_gptfast_module(m):
        return kind, "already a gptfast module"
    return kind, None


def _linear_weight(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, int, int] | None:
    """(weight in nn.Linear (out, in) layout -- a view, never a copy --, bias, in, out)."""
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None
    if type(m) is nn.Linear:
        return w, m.bias, w.shape[1], w.shape[0]
    if type(m).__name__ == "Conv1D" and getattr(m, "nf", None) == w.shape[1]:  # HF: y = x @ W + b, W (in, out)
        return w.t(), m.bias, w.shape[0], w.shape[1]
    return None


def _extra_children(m: nn.Module, allowed: set[str]) -> list[str]:
    return [n for n, _ in m.named_children() if n not in allowed]


def _dropout_p(m: nn.Module, name: str) -> float:
    d = getattr(m, name, None)
    return float(d.p) if isinstance(d, nn.Dropout) else 0.0


def _prepare_layer_norm(m: nn.LayerNorm):
    if len(m.normalized_shape) != 1:
        return None, (f"normalized_shape {tuple(m.normalized_shape)} spans several dims; "
                      "gptfast normalises the last only")
    if type(m).forward is not nn.LayerNorm.forward:
        return None, f"{type(m).__name__} overrides nn.LayerNorm.forward"
    return {}, None


def _prepare_attention(m: nn.Module):
    direct = DIRECT_ATTENTION.get(type(m).__name__)
    if direct is not None:
        config, note = direct[0](m)
        return (None, note) if config is None else ({**config, "flavour": "direct"}, note)
    if type(m).__name__ == "GPT2Attention" and hasattr(m, "split_size"):
        return _prepare_hf_attention(m)
    n_head = getattr(m, "n_head", None)
    if not isinstance(n_head, int) or n_head < 1:
        return None, "no integer n_head attribute"
    qkv, proj = _linear_weight(m.c_attn), _linear_weight(m.c_proj)
    if qkv is None or proj is None:
        return None, "c_attn / c_proj are not nn.Linear or Conv1D"
    c = qkv[2]
    if qkv[3] != 3 * c or proj[2] != c or proj[3] != c or c % n_head:
        return None, (f"c_attn is {qkv[2]}->{qkv[3]}, c_proj {proj[2]}->{proj[3]}: "
                      "not C->3C and C->C with C % n_head == 0")
    extra = _extra_children(m, {"c_attn", "c_proj", "attn_dropout", "resid_dropout"})
    if extra:
        return None, f"unrecognised submodules {extra}"
    params = [n for n, _ in m.named_parameters(recurse=False)]
    buffers = [n for n, _ in m.named_buffers(recurse=False) if n not in ("bias", "masked_bias")]
    if params or buffers:
        return None, f"unrecognised parameters/buffers {params + buffers}"
    mask = getattr(m, "bias", None)
    if isinstance(mask, torch.Tensor) and mask.dim() >= 2 and mask.device.type != "meta":
        t = mask.shape[-1]
        tril = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
        if not torch.equal(mask.reshape(-1, t, t)[0].bool(), tril):
            return None, "its 'bias' mask buffer is not the causal (lower-triangular) mask"
    p = max(_dropout_p(m, "attn_dropout"), float(getattr(m, "dropout", 0.0) or 0.0)
            if isinstance(getattr(m, "dropout", None), (int, float)) else 0.0)
    note = f"attention dropout p={p:g} in training mode runs in gptfast's kernels" if p > 0 else None
    return {"n_head": n_head, "attn_p": p, "verify": True}, note


def _identify_gelu(act) -> str | None:
    """'tanh' or 'none' if ``act`` computes that GELU (checked on sample points), else None."""
    if isinstance(act, nn.GELU):
        return act.approximate if act.approximate in ("tanh", "none") else None
    x = torch.linspace(-6.0, 6.0, 241, dtype=torch.float32)
    try:
        with torch.no_grad():
            y = act(x)
    except Exception:  # noqa: BLE001 -- whatever it is, it is not a GELU we can replace
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return None
    for approximate in ("none", "tanh"):
        if (y.float() - F.gelu(x, approximate=approximate)).abs().max() <= 2e-6:
            return approximate
    return None


def _prepare_mlp(m: nn.Module):
    fc, proj = _linear_weight(m.c_fc), _linear_weight(m.c_proj)
    if fc is None or proj is None:
        return None, "c_fc / c_proj are not nn.Linear or Conv1D"
    if fc[3] != proj[2]:
        return None, f"c_fc's output ({fc[3]}) is not c_proj's input ({proj[2]})"
    acts = [n for n in _ACT_NAMES if n in m.__dict__ or n in m._modules]
    if len(acts) != 1:
        return None, f"expected one activation attribute among {_ACT_NAMES}, found {acts}"
    extra = _extra_children(m, {"c_fc", "c_proj", "dropout", acts[0]})
    if extra or list(m.named_parameters(recurse=False)) or list(m.named_buffers(recurse=False)):
        return None, f"unrecognised submodules/parameters {extra}"
    if m._modules.get("dropout") is not None and not isinstance(m.dropout, nn.Dropout):
        return None, "'dropout' is not nn.Dropout"
    approximate = _identify_gelu(getattr(m, acts[0]))
    if approximate is None:
        return None, f"activation {acts[0]} ({type(getattr(m, acts[0])).__name__}) is neither exact nor tanh GELU"
    return {"approximate": approximate, "verify": True}, f"GELU approximate={approximate!r}"


def _verify(m: nn.Module, config: dict) -> str | None:
    """Run the patched and the original forward on a tiny input (eval mode, private RNG); a reason
    if they disagree. Low-precision parameters get a proportionally looser bound."""
    w = (m.c_attn if hasattr(m, "c_attn") else m.c_fc).weight
    if w.device.type == "meta":
        return None
    c = _linear_weight(m.c_attn if hasattr(m, "c_attn") else m.c_fc)[2]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, c, generator=gen).to(w.device, w.dtype)
    modes = {sub: sub.training for sub in m.modules()}
    state = m.__dict__[_STATE]
    pinned = state.backend
    op = "attention" if config.get("n_head") else "gelu_ffn"
    impl = _backend._REGISTRY.get((op, pinned)) if pinned not in (None, "auto") else None
    if pinned not in (None, "auto") and (impl is None or impl.unavailable_reason(w.device) is not None):
        state.backend = "reference"  # a structural check: does the module compute what we think
    m.eval()
    try:
        with torch.no_grad():  # the forwards themselves: the module's hooks are not run
            got = m.forward(x)
            want = _call_original(m, x)
    except Exception as e:  # noqa: BLE001 -- report it, leave the module as it was
        return f"check run failed: {type(e).__name__}: {e}"
    finally:
        state.backend = pinned
        for sub, mode in modes.items():
            sub.training = mode
    if not isinstance(want, torch.Tensor) or want.shape != got.shape:
        return "its forward does not return one tensor shaped like its input"
    tol = 1e-3 if w.dtype in (torch.float32, torch.float64) else 5e-2
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    if not err <= tol * max(scale, 1e-6):
        what = ("causal attention" if config.get("n_head")
                else f"Linear-GELU-Linear (approximate={config['approximate']!r})")
        return (f"its forward does not compute {what}: checked on a sample input, "
                f"max |diff| {err:.2e} vs scale {scale:.2e}")
    return None


# ------------------------------------------------------------------------------------ forwards


def _call_original(m: nn.Module, *args, **kwargs):
    state = m.__dict__[_STATE]
    if state.prev_forward is not None:
        return state.prev_forward(*args, **kwargs)
    return type(m).forward(m, *args, **kwargs)


def count_fallback(counts: dict, reason: str) -> None:
    """Count one fallback in eager mode. Under torch.compile nothing is counted: a dict that
    changes on every call is state dynamo guards on, and it would recompile at each call."""
    if not torch.compiler.is_compiling():
        counts[reason] = counts.get(reason, 0) + 1


def _fallback(m: nn.Module, reason: str, *args, **kwargs):
    count_fallback(m.__dict__[_STATE].fallbacks, reason)
    return _call_original(m, *args, **kwargs)


def _layer_norm_forward(m: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return layer_norm(x, m.weight, m.bias, m.eps, backend=m.__dict__[_STATE].backend)


def _mlp_forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
    state = m.__dict__[_STATE]
    w1, b1, _, _ = _linear_weight(m.c_fc)
    w2, b2, _, _ = _linear_weight(m.c_proj)
    y = gelu_ffn(x, w1, b1, w2, b2, approximate=state.config["approximate"], backend=state.backend)
    dropout = m._modules.get("dropout")
    return dropout(y) if dropout is not None else y


def _nanogpt_attention_forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    state = m.__dict__[_STATE]
    b, t, c = x.shape                                                        # (B, T, C)
    n_head = state.config["n_head"]
    q, k, v = m.c_attn(x).view(b, t, 3, n_head, c // n_head).unbind(2)     # (B, T, H, D) views
    y = attention(q, k, v, causal=True, dropout_p=state.config["attn_p"] if m.training else 0.0,
                  backend=state.backend)
    y = m.c_proj(y.reshape(b, t, c))
    dropout = m._modules.get("resid_dropout")
    return dropout(y) if dropout is not None else y


# Hugging Face GPT2Attention --------------------------------------------------------------------

# Arguments that do not change what self-attention computes (position_ids and use_cache only matter
# to layers above; the cache itself is handled below).
_HF_HARMLESS = {"position_ids", "use_cache", "cache_position", "is_causal", "output_attentions"}
_HF_CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
_mask_memo: list = [None]  # (weakref to the last mask checked, its version, seqlen, verdict)


def _prepare_hf_attention(m: nn.Module):
    if getattr(m, "is_cross_attention", False):
        return None, "cross-attention (queries and keys from different sequences)"
    impl = getattr(m.config, "_attn_implementation", None) or "eager"
    if impl not in ("eager", "sdpa"):
        return None, f"attention implementation {impl!r} is not one gptfast replicates (eager, sdpa)"
    scale = getattr(m, "scaling", None)
    if scale is None:  # transformers 4.x: the scale is computed in _attn
        scale = 1.0 / math.sqrt(m.head_dim) if m.scale_attn_weights else 1.0
        if m.scale_attn_by_inverse_layer_idx:
            scale /= float(m.layer_idx + 1)
    p = float(m.attn_dropout.p)
    notes = []
    if getattr(m, "reorder_and_upcast_attn", False):
        notes.append("reorder_and_upcast_attn: gptfast always accumulates scores in fp32")
    if p > 0:
        notes.append(f"attn_pdrop={p:g} in training mode runs in gptfast's kernels")
    notes.append("falls back per call for masks other than causal + padding, head_mask, "
                 "output_attentions, a legacy KV cache")
    signature = inspect.signature(type(m).forward)
    config = {"flavour": "hf_attention", "n_head": m.num_heads, "scale": float(scale), "attn_p": p,
              "signature": signature, "legacy": "layer_past" in signature.parameters}
    return config, "; ".join(notes)


def _mask_keep(mask: torch.Tensor, tq: int, tk: int):
    """What a 4D HF mask (B, 1 or heads, Tq, Tk) -- bool: True attends; float: 0 attends, very
    negative blocks -- asks of attention over the last Tq of Tk positions: ``True`` for the plain
    bottom-right causal mask, a (B, Tk) bool tensor of the kept (non-padding) positions when it is
    causal over those (rows of padded queries are not looked at: their outputs are discarded), or
    None for anything else. Memoised for the last mask: a model passes the same one to every layer."""
    memo = _mask_memo[0]
    if memo is not None and memo[0]() is mask and memo[1] == mask._version and memo[2] == (tq, tk):
        return memo[3]
    verdict = None
    if mask.dim() == 4 and tuple(mask.shape[-2:]) == (tq, tk) and tq <= tk:
        if mask.dtype == torch.bool:
            allowed, clean = mask, True
        else:
            allowed = mask == 0
            clean = bool((allowed | (mask <= torch.finfo(mask.dtype).min / 2)).all())
        allowed = allowed[:, :1]
        same_heads = bool((mask == mask[:, :1]).all()) if mask.shape[1] > 1 else True
        causal = torch.ones(tq, tk, dtype=torch.bool, device=mask.device).tril(tk - tq)
        if clean and same_heads:
            allowed = allowed[:, 0]                                  # (B, Tq, Tk)
            keep = allowed[:, -1, :]                                 # (B, Tk)
            if bool(keep.all()):
                verdict = True if bool((allowed == causal).all()) else None
            else:
                # the last query row sees exactly the kept keys when it is a real token (left
                # padding, decoding); otherwise (right padding) it is a padded row, whose HF mask
                # is causal & keep too (eager) or keep (sdpa): either way its row is keep's prefix
                rows = keep[:, tk - tq:]                             # real query rows
                want = causal & keep[:, None, :]
                verdict = keep if bool(((allowed == want) | ~rows[:, :, None]).all()) else None
    _mask_memo[0] = (weakref.ref(mask), mask._version, (tq, tk), verdict)
    return verdict


def _output_attentions_requested(bound: dict) -> bool:
    if bound.get("output_attentions"):
        return True
    try:  # transformers 5: attentions are collected by hooks, requested through a context variable
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    collected = _active_collector.get()
    return bool(collected) and "attentions" in collected


def _hf_attention_forward(m: nn.Module, hidden_states, *args, **kwargs):
    state = m.__dict__[_STATE]
    cfg = state.config
    try:
        bound = cfg["signature"].bind(m, hidden_states, *args, **kwargs).arguments
    except TypeError:
        return _fallback(m, "unrecognised arguments", hidden_states, *args, **kwargs)
    extra = bound.pop("kwargs", {})
    bound.update(extra)

    def original(reason):
        return _fallback(m, reason, hidden_states, *args, **kwargs)

    impl = getattr(m.config, "_attn_implementation", None) or "eager"
    if impl not in ("eager", "sdpa"):  # read per call: set_attn_implementation may change it
        return original(f"attention implementation {impl!r}")
    if cfg["legacy"] and bound.get("use_cache"):  # transformers 4.x would also return `present`
        return original("use_cache with transformers 4.x")
    if bound.get("encoder_hidden_states") is not None:
        return original("cross-attention")
    if bound.get("head_mask") is not None:
        return original("head_mask")
    if _output_attentions_requested(bound):
        return original("output_attentions")
    odd = [k for k, v in bound.items() if k not in _HF_HARMLESS and k not in _HF_CACHE_ARGS and v is not None
           and k not in ("self", "hidden_states", "attention_mask", "encoder_attention_mask")]
    if odd:
        return original(f"unsupported arguments {sorted(odd)}")
    cache = next((bound[k] for k in _HF_CACHE_ARGS if bound.get(k) is not None), None)
    if cache is not None:
        if not hasattr(cache, "update") or not hasattr(cache, "get_seq_length"):
            return original("legacy tuple KV cache")
        cache = getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache
        if cfg["legacy"]:
            return original("KV cache with transformers 4.x")
        layers = getattr(cache, "layers", None)
        if layers is None or (m.layer_idx < len(layers) and type(layers[m.layer_idx]).__name__ != "DynamicLayer"):
            return original("KV cache layer is not a DynamicLayer (static, sliding, quantized)")
    if hidden_states.dim() != 3:
        return original("hidden_states is not (batch, seqlen, embed)")
    b, t, c = hidden_states.shape
    tk = t + (cache.get_seq_length(m.layer_idx) if cache is not None else 0)
    mask = bound.get("attention_mask")
    keep = None
    if mask is None:
        causal = impl != "eager" and bound.get("is_causal", getattr(m, "is_causal", True)) is not False
        if tk != t and t > 1:  # the original (SDPA's is_causal) would align the mask top-left
            return original("decoding several tokens against a KV cache without a mask")
    else:
        verdict = _mask_keep(mask, t, tk) if isinstance(mask, torch.Tensor) else None
        if verdict is None:
            return original("attention_mask is neither causal nor causal with padding")
        causal, keep = True, (None if verdict is True else verdict)
    n_head = cfg["n_head"]
    q, k, v = m.c_attn(hidden_states).view(b, t, 3, n_head, c // n_head).unbind(2)  # (B, T, H, D) views
    if cache is not None:  # HF lays the cache out (B, H, T, D); update returns every cached key
        k, v = (z.transpose(1, 2) for z in cache.update(k.transpose(1, 2), v.transpose(1, 2), m.layer_idx))
        if k.shape[1] != tk:  # the cache is updated: falling back now would store these keys twice
            raise RuntimeError(f"gptfast.patch: {type(cache).__name__}.update returned {k.shape[1]} keys for "
                               f"layer {m.layer_idx}, expected {tk}; unpatch the model to use this cache")
    p = cfg["attn_p"] if m.training else 0.0
    if keep is None:
        y = attention(q, k, v, causal=causal, softmax_scale=cfg["scale"], dropout_p=p, backend=state.backend)
    else:  # padding: attend among the kept tokens only, each row a sequence (bottom-right causal)
        q_p, idx_q, cu_q, max_q, _ = unpad_input(q, keep[:, tk - t:])
        k_p, _, cu_k, max_k, _ = unpad_input(k, keep)
        v_p = unpad_input(v, keep)[0]
        y = attention_varlen(q_p, k_p, v_p, cu_q, cu_k, max_q, max_k, causal=True, softmax_scale=cfg["scale"],
                             dropout_p=p, backend=state.backend)
        y = pad_input(y, idx_q, b, t)
    y = m.resid_dropout(m.c_proj(y.reshape(b, t, c)))
    return y, None


def _direct_forward(m: nn.Module, *args, **kwargs):  # gptfast.hf_direct's attention patches
    return DIRECT_ATTENTION[type(m).__name__][1](m, *args, **kwargs)


_PREPARE = {"layer_norm": _prepare_layer_norm, "attention": _prepare_attention, "gelu_ffn": _prepare_mlp}
_FORWARD = {"layer_norm": _layer_norm_forward, "attention": _nanogpt_attention_forward,
            "gelu_ffn": _mlp_forward, "hf_attention": _hf_attention_forward,
            "direct": _direct_forward}
