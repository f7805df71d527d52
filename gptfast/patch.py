"""``gptfast.patch(model)``: run an existing model's LayerNorms, RMSNorms, attention and (gated) MLPs on gptfast ops.

Patching rewires modules in place by giving each recognised module an instance-level ``forward``
(a ``functools.partial`` of a function in this file, so a patched model still deep-copies and
pickles). No parameter, buffer or submodule is created, replaced or re-laid-out: optimizer state,
``state_dict`` keys and hooks on submodules stay as they were. Hugging Face ``Conv1D`` weights,
stored (in, out), reach ``gelu_ffn`` as ``weight.t()`` views; no call copies a weight.

What is recognised, by structure rather than class name, each verified by running the original
and the patched forward on a sample input before the patch is kept:

- LayerNorms: ``nn.LayerNorm`` over one dimension, and any leaf module with a 1-D ``weight`` (and
  optional ``bias``, e.g. nanoGPT's ``LayerNorm(ndim, bias=False)``) whose forward is
  ``F.layer_norm`` over the last dim -- checked on a unit-scale and a small-scale input, which
  also tells its eps (its ``eps``/``variance_epsilon`` attribute, else 1e-5 or 1e-6).
- RMSNorms: ``nn.RMSNorm`` over one dimension, and any such leaf whose forward is
  x / sqrt(mean(x^2) + eps) * (offset + weight) -- the Llama / Mistral / Qwen2 RMSNorm classes
  (offset 0) and Gemma's (its weight stored as scale - 1: offset 1) -- found by the same check
  runs (eps: its attribute, else 1e-6, 1e-5 or 1e-8).
- GELU MLPs: a module with one of the Linear (or HF ``Conv1D``) pairs ``c_fc``/``c_proj``,
  ``fc_in``/``fc_out``, ``dense_h_to_4h``/``dense_4h_to_h``, ``fc1``/``fc2``, one activation
  identified by evaluating it (exact-erf or tanh GELU; BLOOM's ``gelu_impl`` too), an optional
  ``dropout`` after the output projection; BLOOM's ``forward(hidden_states, residual)`` too.
- Gated MLPs (SwiGLU / GeGLU: Llama, Mistral, Qwen2, Gemma-2, Phi-3): ``gate_proj``/``up_proj``/
  ``down_proj`` (or ``w1``/``w3``/``w2``, or one fused ``gate_up_proj`` holding [gate; up]) Linears
  and one activation identified by evaluating it (SiLU, tanh GELU, exact GELU), run as
  ``gptfast.gated_ffn``.
- nanoGPT-style causal self-attention: ``c_attn`` (C -> 3C), ``c_proj`` (C -> C), ``n_head``,
  optionally ``attn_dropout``/``resid_dropout`` and a ``bias`` tril mask buffer, nothing else.
- Hugging Face models whose attention goes through transformers' attention interface (GPT-2,
  GPT-J, GPT-NeoX, Phi, GPTBigCode, OPT, Llama, Mistral, Qwen2, Gemma-2, ...): the model is
  switched to ``attn_implementation="gptfast"`` (:mod:`gptfast.hf`: GQA, sliding windows,
  softcap, padding, KV cache, dropout; the rest falls back per call, counted in
  ``gptfast.hf.fallbacks``); ``unpatch`` switches it back.
- GPT-Neo, BLOOM and Falcon attention, which do not use the interface: :mod:`gptfast.hf_direct`.

The check runs happen in eval mode and, for modules with dropout, in training mode from one RNG
state, so dropout must sit where gptfast applies it (an MLP that drops its hidden activations is
left alone). Attention-probability dropout in training (nanoGPT's ``attn_dropout``, HF's
``attn_pdrop``) runs inside gptfast's attention kernels (same probability, gptfast's RNG).

The report lists every module that was patched and every module that looks like a norm, an
attention or an MLP (by structure or class name) and was not, with the reason (OPT's MLP lives
inside its decoder layer's forward; Mixtral's experts sit behind a router; ...).

Calls of a patched module that fall back to its own forward are counted in
``module._gptfast_patch.fallbacks`` -- in eager mode only: under torch.compile nothing is counted
(a counter that changes per call is state dynamo guards on, and would recompile every call).
"""
from __future__ import annotations

import functools
import inspect
import sys
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hf_direct import DIRECT_ATTENTION
from .ops import _backend, attention, gelu_ffn, layer_norm, rms_norm

__all__ = ["patch", "unpatch", "PatchReport", "PatchEntry"]

OPS = ("attention", "layer_norm", "rms_norm", "gelu_ffn", "gated_ffn")
_STATE = "_gptfast_patch"


# ----------------------------------------------------------------------------------- the report


@dataclass
class PatchEntry:
    path: str      # module path in the model ("" for the root)
    kind: str      # "layer_norm", "rms_norm", "attention", "gelu_ffn" or "gated_ffn"
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
        ops: which ops to use, a subset of ("attention", "layer_norm", "rms_norm", "gelu_ffn",
            "gated_ffn") (a norm is found to be a LayerNorm or an RMSNorm by its check run, then
            patched if its op is in ``ops``; gated MLPs -- Llama's gate_proj / up_proj / down_proj,
            Phi-3's gate_up_proj -- run on gptfast.gated_ffn after a check run too).
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
    paths = {id(m): p for p, m in model.named_modules()}
    interfaced = set()
    if "attention" in ops:
        for hf_model in _interface_models(model):
            interfaced |= _switch_to_interface(hf_model, backend, paths, report)
    seen = set()
    for path, module in model.named_modules():
        if id(module) in interfaced:
            continue
        kind, why_not = _classify(module)
        if kind is None:
            continue
        norm = kind == "layer_norm"  # LayerNorm or RMSNorm: its check run tells which
        if why_not is None and not norm and kind not in ops:
            why_not = f"{kind!r} not in ops"
        if why_not is None and norm and not {"layer_norm", "rms_norm"} & set(ops):
            why_not = "'layer_norm' not in ops"
        if why_not is None and _STATE in module.__dict__:
            why_not = "already patched"
        config, note = (None, None) if why_not else _PREPARE[kind](module)
        if config is not None and config.get("flavour") == "rms_norm":
            kind = "rms_norm"
        if why_not is None and config is not None and kind not in ops:
            why_not, config = f"{kind!r} not in ops", None
        if (why_not is None and config is not None and backend not in (None, "auto")
                and (kind, backend) not in _backend._REGISTRY):
            why_not, config = f"the {backend!r} backend has no {kind} kernel yet", None
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
        if (why_not and kind == "layer_norm" and not isinstance(module, (nn.LayerNorm, nn.RMSNorm))
                and _looks_like(module) != "norm"):
            continue  # a leaf with a 1-D weight that is not a LayerNorm and is not called a norm
        seen.add(id(module))
        report.entries.append(_entry(path, kind, why_not, note))
    _report_lookalikes(model, ops, seen | interfaced, report)
    order = {p: i for i, p in enumerate(paths.values())}
    report.entries.sort(key=lambda e: order[e.path])
    return report


def _entry(path: str, kind: str, why_not: str | None, note: str | None) -> PatchEntry:
    if why_not and why_not.startswith("RMSNorm"):
        kind = "rms_norm"
    return PatchEntry(path, kind, "skipped" if why_not else "patched", why_not or note or "")


def _report_lookalikes(model: nn.Module, ops, seen: set, report: PatchReport) -> None:
    """Every module named like a norm, an attention or an MLP that is neither patched nor already
    reported, nor the container of a reported module of its kind (GPT-Neo's attention wrapper),
    is listed with the reason."""
    kinds = {"norm": "layer_norm", "attention": "attention", "mlp": "gelu_ffn"}
    for path, m in model.named_modules():
        looks = _looks_like(m)
        if looks is None or id(m) in seen or _is_gptfast_module(m):
            continue
        if any(id(sub) in seen and _looks_like(sub) == looks for sub in m.modules() if sub is not m):
            continue
        kind = kinds[looks]
        why = _lookalike_reason(m, looks) if kind in ops else f"{kind!r} not in ops"
        if why.startswith(f"{type(m).__name__}: gated MLP"):
            kind = "gated_ffn"
        report.entries.append(_entry(path, kind, why, None))


def _switch_to_interface(hf_model: nn.Module, backend: str | None, paths: dict, report: PatchReport) -> set:
    """Point a transformers model's attention at gptfast.hf's interface function; its attention
    modules get a patch state (backend pin, for unpatch) but keep their own forward."""
    from . import hf
    hf.register()
    attention_modules = _interface_attention(hf_model)
    if not attention_modules:
        return set()
    before = hf_model.config._attn_implementation
    if _STATE not in hf_model.__dict__:
        hf_model.__dict__[_STATE] = _PatchState("model", None, backend, {"flavour": "model", "before": before})
        if before != hf.NAME:
            hf_model.set_attn_implementation(hf.NAME)
    cfg = hf_model.config
    notes = [f"transformers' attention interface: attn_implementation {before!r} -> {hf.NAME!r}"]
    if getattr(cfg, "reorder_and_upcast_attn", False):
        notes.append("reorder_and_upcast_attn: gptfast always accumulates scores in fp32")
    for name in ("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob"):
        p = getattr(cfg, name, 0.0)
        if isinstance(p, (int, float)) and p > 0:
            notes.append(f"{name}={p:g} in training mode runs in gptfast's kernels")
    notes.append("falls back per call as gptfast.hf documents (counted in gptfast.hf.fallbacks)")
    done = set()
    for m in attention_modules:
        if _STATE in m.__dict__:
            why = "already patched"
        else:
            m.__dict__[_STATE] = _PatchState("attention", None, backend, {"flavour": "interface"})
            why = None
        report.entries.append(_entry(paths[id(m)], "attention", why, "; ".join(notes)))
        done.add(id(m))
    return done


def unpatch(model: nn.Module) -> int:
    """Restore every module of ``model`` that :func:`patch` rewired; returns how many."""
    return sum(unpatch_module(m) for m in model.modules())


def unpatch_module(module: nn.Module) -> bool:
    state = module.__dict__.pop(_STATE, None)
    if state is None:
        return False
    flavour = state.config.get("flavour")
    if flavour == "model":  # a transformers model switched to the attention interface
        if module.config._attn_implementation != state.config["before"]:
            module.set_attn_implementation(state.config["before"])
        return False
    if flavour == "interface":  # its forward was never replaced
        return True
    if state.prev_forward is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = state.prev_forward
    return True


# ------------------------------------------------------------------------------ recognition

_MLP_PAIRS = (("c_fc", "c_proj"), ("fc_in", "fc_out"), ("dense_h_to_4h", "dense_4h_to_h"), ("fc1", "fc2"))
_GATED_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"), ("gate_up_proj", "down_proj"))
_EPS_NAMES = ("eps", "variance_epsilon", "epsilon", "layer_norm_eps")


def _is_gptfast_module(m: nn.Module) -> bool:
    from . import nn as gnn
    return isinstance(m, (gnn.LayerNorm, gnn.RMSNorm, gnn.CausalSelfAttention, gnn.MLP, gnn.GatedFFN))


def _mlp_pair(m: nn.Module) -> tuple[str, str] | None:
    return next(((a, b) for a, b in _MLP_PAIRS if isinstance(m._modules.get(a), nn.Module)
                 and isinstance(m._modules.get(b), nn.Module)), None)


def _gated_names(m: nn.Module) -> tuple[str, ...] | None:
    """The (gate, up, down) or (gate_up, down) child names of a gated MLP (Llama's gate_proj /
    up_proj / down_proj, Mixtral-style w1 / w3 / w2, Phi-3's fused gate_up_proj), or None."""
    return next((g for g in _GATED_NAMES if all(isinstance(m._modules.get(n), nn.Module) for n in g)), None)


def _norm_like(m: nn.Module) -> bool:
    """A leaf with a 1-D weight (and an optional 1-D bias of its size) and nothing else: what a
    hand-written LayerNorm or RMSNorm class looks like."""
    if m._modules or list(m.named_buffers(recurse=False)):
        return False
    params = dict(m.named_parameters(recurse=False))
    w = params.pop("weight", None)
    b = params.pop("bias", None)
    return (w is not None and w.dim() == 1 and not params
            and (b is None or (b.dim() == 1 and b.shape == w.shape)))


def _looks_like(m: nn.Module) -> str | None:
    """The kind a module's class name suggests ('norm', 'attention', 'mlp'), for the report."""
    name = type(m).__name__.lower()
    if "norm" in name:
        return "norm"
    if name.endswith(("attention", "selfattention", "attn")):
        return "attention"
    if name.endswith(("mlp", "feedforward", "ffn")):
        return "mlp"
    return None


def _classify(m: nn.Module) -> tuple[str | None, str | None]:
    """(kind, reason it cannot be patched or None) for a candidate module; (None, None) otherwise."""
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or _norm_like(m):
        kind = "layer_norm"  # or an RMSNorm: _prepare_layer_norm's check run tells
    elif type(m).__name__ in DIRECT_ATTENTION or (isinstance(getattr(m, "c_attn", None), nn.Module)
                                                  and isinstance(getattr(m, "c_proj", None), nn.Module)):
        kind = "attention"
    elif _mlp_pair(m) is not None:
        kind = "gelu_ffn"
    elif _gated_names(m) is not None:
        kind = "gated_ffn"
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
    if isinstance(m, nn.Linear):  # subclasses too (Falcon's FalconLinear): the check run verifies them
        return w, m.bias, w.shape[1], w.shape[0]
    if type(m).__name__ == "Conv1D" and getattr(m, "nf", None) == w.shape[1]:  # HF: y = x @ W + b, W (in, out)
        return w.t(), m.bias, w.shape[0], w.shape[1]
    return None


def _extra_children(m: nn.Module, allowed: set[str]) -> list[str]:
    return [n for n, _ in m.named_children() if n not in allowed]


def _dropout_p(m: nn.Module, name: str) -> float:
    d = getattr(m, name, None)
    return float(d.p) if isinstance(d, nn.Dropout) else 0.0


def _sample(c: int, like: torch.Tensor, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 7, c, generator=gen, dtype=torch.float64) * scale + 0.3 * scale
    return x.to(like.device, like.dtype)


def _norm_config(m: nn.Module) -> tuple[dict | None, str | None]:
    """({"eps"}, None) if ``m``'s forward is F.layer_norm over the last dim with its weight and bias
    for one eps (its own eps attribute, else 1e-5 or 1e-6), ({"eps", "offset", "flavour":
    "rms_norm"}, None) if it is an RMSNorm (no bias; offset 0 or 1), checked on a unit-scale and on
    a small-scale input (where eps shows); else (None, what it computes instead, when
    recognisable)."""
    w, b = m.weight, getattr(m, "bias", None)
    if w.device.type == "meta":
        return None, "on the meta device: cannot be checked"
    c = w.shape[0]
    own = [float(getattr(m, n)) for n in _EPS_NAMES if isinstance(getattr(m, n, None), (int, float))]
    tol = 1e-5 if w.dtype in (torch.float32, torch.float64) else 2e-2
    xs = [_sample(c, w), _sample(c, w, scale=1e-2, seed=1)]
    try:
        with torch.no_grad():
            ys = [m(x) for x in xs]
    except Exception as e:  # noqa: BLE001 -- it is not a norm we can replace
        return None, f"check run failed: {type(e).__name__}: {e}"
    if any(not isinstance(y, torch.Tensor) or y.shape != x.shape for x, y in zip(xs, ys)):
        return None, "its forward does not return one tensor shaped like its input"

    def close(fn) -> bool:
        with torch.no_grad():
            return all(((y.double() - fn(x.double())).abs().max() <= tol * (1 + y.double().abs().max()))
                       for x, y in zip(xs, ys))

    wd, bd = w.detach().double(), None if b is None else b.detach().double()
    for eps in own[:1] + [1e-5, 1e-6]:
        if close(lambda x: F.layer_norm(x, (c,), wd, bd, eps)):
            return {"eps": eps}, None
    for eps in own[:1] + [1e-6, 1e-5, 1e-8]:
        for offset in (0.0, 1.0):
            rms = (lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + wd)
                   + (0 if bd is None else bd))
            if close(rms):
                if bd is not None:
                    return None, f"RMSNorm{' (1 + weight)' if offset else ''} with a bias: no gptfast op for it"
                return {"eps": eps, "offset": offset, "flavour": "rms_norm"}, None
    return None, "its forward is neither F.layer_norm nor an RMSNorm over the last dim (checked on sample inputs)"


def _prepare_layer_norm(m: nn.Module):
    if isinstance(m, nn.RMSNorm):
        if len(m.normalized_shape) != 1:
            return None, (f"normalized_shape {tuple(m.normalized_shape)} spans several dims; "
                          "gptfast normalises the last only")
        if type(m).forward is nn.RMSNorm.forward:  # eps None: x's machine epsilon, as F.rms_norm
            return {"eps": m.eps, "offset": 0.0, "flavour": "rms_norm"}, None
        if m.weight is None:
            return None, f"{type(m).__name__} overrides nn.RMSNorm.forward and has no weight to check with"
    if isinstance(m, nn.LayerNorm):
        if len(m.normalized_shape) != 1:
            return None, (f"normalized_shape {tuple(m.normalized_shape)} spans several dims; "
                          "gptfast normalises the last only")
        if type(m).forward is nn.LayerNorm.forward:
            return {"eps": m.eps}, None
        if m.weight is None:
            return None, f"{type(m).__name__} overrides nn.LayerNorm.forward and has no weight to check with"
    config, why = _norm_config(m)
    if config is None:
        return None, why
    if config.get("flavour") == "rms_norm":
        offset = f", offset {config['offset']:g}" if config["offset"] else ""
        return config, f"{type(m).__name__}: checked to compute RMSNorm (eps={config['eps']:g}{offset})"
    return config, f"{type(m).__name__}: checked to compute F.layer_norm (eps={config['eps']:g})"


def _prepare_attention(m: nn.Module):
    direct = DIRECT_ATTENTION.get(type(m).__name__)
    if direct is not None:
        config, note = direct[0](m)
        return (None, note) if config is None else ({**config, "flavour": "direct"}, note)
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
    return {"n_head": n_head, "attn_p": p, "verify": True, "c": c}, note


def _identify_gelu(act) -> str | None:
    """'tanh' or 'none' if ``act`` computes that GELU (checked on sample points), else None."""
    if isinstance(act, nn.GELU):
        return act.approximate if act.approximate in ("tanh", "none") else None
    x, y = _evaluate(act, 6.0)
    return next((a for a in ("none", "tanh") if y is not None and _agrees(y, F.gelu(x, approximate=a))), None)


def _evaluate(act, span: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample points x in [-span, span] (40 per unit) and act(x), or None where act cannot be
    evaluated on them as an elementwise function."""
    x = torch.linspace(-span, span, int(40 * span) + 1, dtype=torch.float32)
    try:
        with torch.no_grad():
            y = act(x)
    except Exception:  # noqa: BLE001 -- whatever it is, it is not an activation we can replace
        return x, None
    return x, (y if isinstance(y, torch.Tensor) and y.shape == x.shape else None)


def _agrees(y: torch.Tensor, want: torch.Tensor) -> bool:
    return bool((y.float() - want).abs().max() <= 2e-6)


_ACT_NAMES = ("gelu", "act", "activation", "act_fn", "activation_fn", "gelu_impl")


def _prepare_mlp(m: nn.Module):
    fc_name, proj_name = _mlp_pair(m)
    fc, proj = _linear_weight(m._modules[fc_name]), _linear_weight(m._modules[proj_name])
    if fc is None or proj is None:
        return None, f"{fc_name} / {proj_name} are not nn.Linear or Conv1D"
    if fc[3] != proj[2]:
        return None, f"{fc_name}'s output ({fc[3]}) is not {proj_name}'s input ({proj[2]})"
    acts = [n for n in _ACT_NAMES if n in m.__dict__ or n in m._modules]
    extra = _extra_children(m, {fc_name, proj_name, "dropout", *acts})
    if extra:
        return None, (f"has {fc_name}/{proj_name} but also submodules {extra}: not a separate "
                      f"{fc_name} -> GELU -> {proj_name} module")
    if len(acts) != 1:
        return None, f"expected one activation attribute among {_ACT_NAMES}, found {acts}"
    if list(m.named_parameters(recurse=False)) or list(m.named_buffers(recurse=False)):
        return None, "unrecognised parameters/buffers of its own"
    if m._modules.get("dropout") is not None and not isinstance(m.dropout, nn.Dropout):
        return None, "'dropout' is not nn.Dropout"
    approximate = _identify_gelu(getattr(m, acts[0]))
    if approximate is None:
        return None, f"activation {acts[0]} ({type(getattr(m, acts[0])).__name__}) is neither exact nor tanh GELU"
    params = list(inspect.signature(type(m).forward).parameters)
    residual = params[2:3] == ["residual"]  # BLOOM: forward(hidden_states, residual) adds it after dropout
    if residual and getattr(m, "pretraining_tp", 1) > 1 and getattr(m, "slow_but_exact", False):
        return None, "pretraining_tp > 1 with slow_but_exact: its output projection is sliced"
    config = {"approximate": approximate, "verify": True, "fc": fc_name, "proj": proj_name, "c": fc[2],
              "residual": residual, "hidden_dropout": float(getattr(m, "hidden_dropout", 0.0) or 0.0)}
    return config, f"{fc_name} -> GELU approximate={approximate!r} -> {proj_name}"


_GATED_ACTS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}


def _identify_gate_activation(act) -> str | None:
    """gated_ffn's name ('silu', 'gelu_tanh', 'gelu') of the function ``act`` computes (checked on
    sample points), else None."""
    x, y = _evaluate(act, 8.0)
    return next((name for name, f in _GATED_ACTS.items() if y is not None and _agrees(y, f(x))), None)


def _prepare_gated(m: nn.Module):
    names = _gated_names(m)
    weights = [_linear_weight(m._modules[n]) for n in names]
    if any(w is None for w in weights):
        return None, f"{' / '.join(names)} are not all nn.Linear"
    acts = [n for n in _ACT_NAMES if n in m.__dict__ or n in m._modules]
    extra = _extra_children(m, {*names, "dropout", *acts})
    if extra:
        return None, f"gated MLP ({'/'.join(names)}) with further submodules {extra}"
    if len(acts) != 1:
        return None, f"gated MLP: expected one activation attribute among {_ACT_NAMES}, found {acts}"
    if list(m.named_parameters(recurse=False)) or list(m.named_buffers(recurse=False)):
        return None, "gated MLP: unrecognised parameters/buffers of its own"
    if m._modules.get("dropout") is not None and not isinstance(m.dropout, nn.Dropout):
        return None, "gated MLP: 'dropout' is not nn.Dropout"
    activation = _identify_gate_activation(getattr(m, acts[0]))
    if activation is None:
        return None, (f"gated MLP: activation {acts[0]} ({type(getattr(m, acts[0])).__name__}) is none of "
                      f"{tuple(_GATED_ACTS)}")
    *inner, down = weights
    hidden = inner[0][3] // 2 if len(inner) == 1 else inner[0][3]  # fused gate_up: [gate; up] rows
    if (len(inner) == 1 and inner[0][3] != 2 * hidden) or (len(inner) == 2 and inner[0][3] != inner[1][3]) \
            or down[2] != hidden or any(w[2] != down[3] for w in inner):
        return None, ("gated MLP: the projections' shapes are not gate, up (C -> H) and down (H -> C): "
                      + ", ".join(f"{n} {w[2]}->{w[3]}" for n, w in zip(names, weights)))
    config = {"activation": activation, "verify": True, "names": names, "c": down[3], "flavour": "gated_ffn"}
    return config, f"{' / '.join(names)}: down(act(gate(x)) * up(x)), activation {activation!r}"


def _gated_forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from .ops.gated_ffn import gated_ffn
    state = m.__dict__[_STATE]
    cfg = state.config
    ws = [_linear_weight(m._modules[n]) for n in cfg["names"]]
    if len(ws) == 2:  # Phi-3: one fused [gate; up] projection
        (wgu, bgu, _, _), (wd, bd, _, _) = ws
        y = gated_ffn(x, wgu, None, wd, cfg["activation"], bgu, None, bd, backend=state.backend)
    else:
        (wg, bg, _, _), (wu, bu, _, _), (wd, bd, _, _) = ws
        y = gated_ffn(x, wg, wu, wd, cfg["activation"], bg, bu, bd, backend=state.backend)
    dropout = m._modules.get("dropout")
    return dropout(y) if dropout is not None else y


def _lookalike_reason(m: nn.Module, looks: str) -> str:
    """Why a module whose name says norm/attention/MLP was not recognised."""
    name = type(m).__name__
    if looks == "norm":
        if _norm_like(m):
            return _norm_config(m)[1] or "not recognised"
        return f"{name}: not a leaf with a 1-D weight and optional bias (unrecognised structure)"
    if looks == "mlp":
        children = set(m._modules)
        if any(set(g) <= children for g in _GATED_NAMES):
            return f"{name}: gated MLP ({'/'.join(sorted(children & {n for g in _GATED_NAMES for n in g}))}) not recognised"
        return f"{name}: no recognised Linear -> GELU -> Linear pair (submodules {sorted(children)})"
    return f"{name}: not nanoGPT-style, not on transformers' attention interface, no direct patch"


def _verify(m: nn.Module, config: dict) -> str | None:
    """Run the patched and the original forward on a tiny input, in eval mode and, when the module
    drops out, in training mode from one RNG state (so dropout must sit where the original has it;
    attention-probability dropout, whose RNG is gptfast's own, is switched off for that run); a
    reason if they disagree. Low-precision parameters get a proportionally looser bound."""
    w = next(m.parameters())
    if w.device.type == "meta":
        return None
    state = m.__dict__[_STATE]
    attn = config.get("n_head") is not None
    x = _sample(config["c"], w)
    args = (x, _sample(config["c"], w, seed=2)) if config.get("residual") else (x,)
    pinned = state.backend
    op = "attention" if attn else config.get("flavour") if config.get("flavour") == "gated_ffn" else "gelu_ffn"
    impl = _backend._REGISTRY.get((op, pinned)) if pinned not in (None, "auto") else None
    if pinned not in (None, "auto") and (impl is None or impl.unavailable_reason(w.device) is not None):
        state.backend = "reference"  # a structural check: does the module compute what we think
    modes = {sub: sub.training for sub in m.modules()}
    drops = [d for d in m.modules() if isinstance(d, nn.Dropout) and d.p > 0]
    attn_drop = [m._modules.get("attn_dropout")] if attn else []
    train_run = bool(drops) or config.get("hidden_dropout", 0.0) > 0
    saved = {"attn_p": config.get("attn_p"), "dropout": m.__dict__.get("dropout"),
             "p": [d.p for d in attn_drop if d is not None]}
    try:
        for training in (False, True) if train_run else (False,):
            m.train(training)
            if training and attn:  # the probabilities' dropout cannot match: check the rest
                config["attn_p"] = 0.0
                if isinstance(saved["dropout"], (int, float)):
                    m.__dict__["dropout"] = 0.0
                for d in attn_drop:
                    if d is not None:
                        d.p = 0.0
            with torch.no_grad(), torch.random.fork_rng(devices=[]):  # the forwards only: no hooks run
                torch.manual_seed(0)
                got = m.forward(*args)
                torch.manual_seed(0)
                want = _call_original(m, *args)
            why = _disagree(got, want, w.dtype, config, training)
            if why:
                return why
    except Exception as e:  # noqa: BLE001 -- report it, leave the module as it was
        return f"check run failed: {type(e).__name__}: {e}"
    finally:
        state.backend = pinned
        if attn:
            config["attn_p"] = saved["attn_p"]
            if isinstance(saved["dropout"], (int, float)):
                m.__dict__["dropout"] = saved["dropout"]
            for d, p in zip([d for d in attn_drop if d is not None], saved["p"]):
                d.p = p
        for sub, mode in modes.items():
            sub.training = mode
    return None


def _disagree(got, want, dtype, config, training: bool) -> str | None:
    if not isinstance(want, torch.Tensor) or want.shape != got.shape:
        return "its forward does not return one tensor shaped like its input"
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    if err <= tol * max(scale, 1e-6):
        return None
    what = ("causal attention" if config.get("n_head") is not None
            else f"down(act(gate(x)) * up(x)) with activation {config['activation']!r}"
            if config.get("flavour") == "gated_ffn"
            else f"{config['fc']} -> GELU (approximate={config['approximate']!r}) -> {config['proj']}")
    if training:
        return (f"in training mode its forward does not compute {what} with dropout where gptfast puts it "
                f"(after the output projection): max |diff| {err:.2e} vs scale {scale:.2e}")
    return (f"its forward does not compute {what}: checked on a sample input, "
            f"max |diff| {err:.2e} vs scale {scale:.2e}")


# ------------------------------------------------------------- Hugging Face attention interface


def _interface_models(model: nn.Module) -> list[nn.Module]:
    """The outermost transformers PreTrainedModels in ``model`` whose attention goes through
    transformers' attention interface."""
    if "transformers" not in sys.modules:  # a transformers model implies it is imported: never import it here
        return []
    from transformers import PreTrainedModel
    found = []
    for m in model.modules():
        if (isinstance(m, PreTrainedModel) and getattr(type(m), "_supports_attention_backend", False)
                and not any(m in {*f.modules()} for f in found)):
            found.append(m)
    return found


def _interface_attention(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if _looks_like(m) == "attention" and getattr(m, "config", None) is not None]


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


def _layer_norm_forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    state = m.__dict__[_STATE]
    return layer_norm(x, m.weight, getattr(m, "bias", None), state.config["eps"], backend=state.backend)


def _rms_norm_forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's result dtype: the HF RMSNorms return weight * (...).to(x.dtype), promoted."""
    state, w = m.__dict__[_STATE], m.weight
    if w is not None and w.dtype != x.dtype:
        dt = torch.promote_types(w.dtype, x.dtype)
        x, w = x.to(dt), w.to(dt)
    return rms_norm(x, w, state.config["eps"], offset=state.config["offset"], backend=state.backend)


def _mlp_forward(m: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """(..., C) -> (..., C); with BLOOM's signature, dropout(out) + residual as its dropout_add."""
    state = m.__dict__[_STATE]
    cfg = state.config
    w1, b1, _, _ = _linear_weight(m._modules[cfg["fc"]])
    w2, b2, _, _ = _linear_weight(m._modules[cfg["proj"]])
    y = gelu_ffn(x, w1, b1, w2, b2, approximate=cfg["approximate"], backend=state.backend)
    dropout = m._modules.get("dropout")
    if dropout is not None:
        y = dropout(y)
    if cfg["residual"]:
        return residual + F.dropout(y, p=cfg["hidden_dropout"], training=m.training)
    return y


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


# Masks of Hugging Face models patched directly (gptfast.hf_direct) -----------------------------

_mask_memo: list = [None]  # (weakref to the last mask checked, its version, seqlen, verdict)


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


def _direct_forward(m: nn.Module, *args, **kwargs):  # gptfast.hf_direct's attention patches
    return DIRECT_ATTENTION[type(m).__name__][1](m, *args, **kwargs)


_PREPARE = {"layer_norm": _prepare_layer_norm, "attention": _prepare_attention, "gelu_ffn": _prepare_mlp,
            "gated_ffn": _prepare_gated}
_FORWARD = {"layer_norm": _layer_norm_forward, "rms_norm": _rms_norm_forward, "attention": _nanogpt_attention_forward,
            "gelu_ffn": _mlp_forward, "gated_ffn": _gated_forward,
            "direct": _direct_forward}
