"""``gptfast bench``: time the gptfast ops and a GPT training step against PyTorch baselines.

One implementation for the CPU and the GPU. For every size of the grid and every backend it

1. checks the backend against a float64 ground truth with the FlashAttention rule of
   ``gptfast.testing`` (DESIGN.md): low-precision outputs within 2x, gradients within 3x PyTorch's
   own error in the same dtype; fp32 against tight absolute tolerances. The ground truth and
   PyTorch's result are the *eager* baseline (SDPA, ``F.layer_norm``, Linear+GELU+Linear) run in
   float64 and in the benchmark dtype. A backend that fails is reported as WRONG and not timed.
2. times it: on a GPU with CUDA events (``triton.testing.do_bench``, median, else an own
   CUDA-event loop), on the CPU with ``torch.utils.benchmark`` (median of ``blocked_autorange``),
   rotating among several input sets so that small sizes are not timed out of the cache.
   ``fwd`` is the training forward (inputs require grad, the graph is built); ``bwd`` replays
   ``torch.autograd.grad(..., retain_graph=True)`` on graphs built once before timing, so it is
   the backward alone, not fwd+bwd minus fwd; ``fwd-bwd`` is both.
3. reports time, TFLOP/s (attention: FlashAttention's 4*B*H*T^2*D, /2 causal, x2.5 bwd, x3.5
   fwd+bwd, T^2 the visible pairs with a window; gelu_ffn: the two GEMMs 2*M*K*H + 2*M*H*N, x2 bwd;
   gated_ffn: the three GEMMs 2*M*C*H * 3, x2 bwd), GB/s for layer_norm (bytes in the
   table header), peak memory, tokens/s and MFU for ``train``, and the ratio to eager and compile.

Attention options (``--sizes B,T,H,D,HK`` for GQA/MQA, ``--window``, ``--softcap``, ``--alibi``,
``--dropout``) apply to every size; the eager baseline is then what a PyTorch user writes (SDPA
with ``enable_gqa`` and an additive window/ALiBi mask, or the scores written out for softcap, which
SDPA lacks). With dropout, gptfast backends are checked exactly (the ground truth uses gptfast's
Philox mask for the same seed); the baselines drop with torch's own RNG, so they are checked without
dropout and timed with it.

Output: a tqdm progress bar, then an aligned table; with ``--out DIR``: ``results.json`` (rows,
machine, versions, commands, ceilings; rows of other ops already in the file are kept, so one
folder can hold a whole suite), ``results.csv`` and PNG plots (if matplotlib is installed).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import inspect
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops.gated_ffn import ACTIVATIONS as GATED_ACTIVATIONS, gated_ffn_ref
from .ops.gelu_ffn import gelu_ffn_ref
from .testing import (assert_close, assert_matches_reference, assert_results_match, assert_within_pytorch_error, attention_magnitudes,
                      gated_ffn_magnitudes, gelu_ffn_magnitudes, layer_norm_magnitudes, rms_norm_magnitudes, sdpa_bthd)

OPS = ("attention", "layer_norm", "rms_norm", "gelu_ffn", "gated_ffn", "linear_cross_entropy", "train", "generate", "drop_in",
       "overhead")
NORM_OPS = ("layer_norm", "rms_norm")  # timed in GB/s
PHASES = ("fwd", "bwd", "fwd-bwd")
BASELINES = ("eager", "compile", "flash_attn", "liger", "patched")
# Rotate input sets until they hold this many bytes (beyond any L2/LLC here), at most MAX_SETS.
ROTATE_BYTES = {"cuda": 256 << 20, "cpu": 64 << 20}
MAX_SETS = 8
# Largest B*H*T*T of the float64 attention ground truth (one fp64 T x T matrix = 8 bytes each);
# bigger cases are checked on fewer batch entries and heads (same T, D and kernel tiling).
CHECK_SCORES = {"cuda": 1 << 27, "cpu": 1 << 24}

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class BenchError(ValueError):
    """Bad ``gptfast bench`` arguments; the message says which and why."""


# --------------------------------------------------------------------------- sizes

def _ints(spec: str, n_min: int, n_max: int, what: str) -> list[int]:
    try:
        vals = [int(v) for v in spec.split(",")]
    except ValueError:
        raise BenchError(f"--sizes: {spec!r} is not {what}") from None
    if not n_min <= len(vals) <= n_max or any(v <= 0 for v in vals):
        raise BenchError(f"--sizes: {spec!r} is not {what}")
    return vals


def parse_size(op: str, spec: str) -> dict:
    if op == "attention":
        b, t, h, d, *hk = _ints(spec, 4, 5, "B,T,H,D[,HK] (batch, seqlen, heads, headdim, kv heads)")
        if hk and (hk[0] > h or h % hk[0]):
            raise BenchError(f"--sizes: {spec!r}: the kv heads {hk[0]} must divide the heads {h}")
        return dict(B=b, T=t, H=h, D=d) | (dict(Hk=hk[0]) if hk and hk[0] != h else {})
    if op in NORM_OPS:
        m, n = _ints(spec, 2, 2, "M,N (rows, hidden size)")
        return dict(M=m, N=n)
    if op == "gelu_ffn":
        v = _ints(spec, 2, 3, "M,C[,H] (rows, model width, FFN width; H defaults to 4C)")
        return dict(M=v[0], C=v[1], Hd=v[2] if len(v) == 3 else 4 * v[1])
    if op == "gated_ffn":
        v = _ints(spec, 2, 3, "M,C[,H] (rows, model width, FFN width; H defaults to Llama's 8C/3 rounded up to 256)")
        return dict(M=v[0], C=v[1], Hd=v[2] if len(v) == 3 else llama_hidden(v[1]))
    parts = spec.split(",")
    from .model import PRESETS
    if parts[0] not in PRESETS or len(parts) not in (2, 3):
        raise BenchError(f"--sizes: {spec!r} is not PRESET,BATCH[,SEQLEN] with PRESET in {sorted(PRESETS)}")
    batch, *rest = _ints(",".join(parts[1:]), 1, 2, "PRESET,BATCH[,SEQLEN]")
    seqlen = rest[0] if rest else PRESETS[parts[0]].block_size
    if seqlen > PRESETS[parts[0]].block_size:
        raise BenchError(f"--sizes: seqlen {seqlen} exceeds the {parts[0]} preset's block size "
                         f"{PRESETS[parts[0]].block_size}")
    return dict(preset=parts[0], batch=batch, seqlen=seqlen)


def llama_hidden(c: int) -> int:
    """Llama's FFN width for model width c: 2/3 of 4c rounded up to a multiple of 256 (Llama's
    ``multiple_of``): 11008 for 4096 (Llama-2 7B), 5632 for 2048 (TinyLlama)."""
    return -(-(8 * c // 3) // 256) * 256


def default_sizes(op: str, device: str) -> list[dict]:
    """FlashAttention's published grid and GPT-2 124M/350M/774M/1.5B widths on a GPU; a
    scaled-down grid on the CPU (a few minutes on 2 cores, with torch.compile)."""
    gpu = device == "cuda"
    widths = (768, 1024, 1280, 1600)  # GPT-2 small, medium, large, xl
    if op == "attention":
        if gpu:  # hidden 2048, batch * seqlen = 16k tokens (FlashAttention-2 paper, fig. 4-7)
            return [dict(B=16384 // t, T=t, H=2048 // d, D=d)
                    for d in (64, 128) for t in (512, 1024, 2048, 4096, 8192, 16384)]
        return [dict(B=2048 // t, T=t, H=4, D=64) for t in (128, 256, 512, 1024)]  # hidden 256
    if op == "layer_norm":
        return [dict(M=8 * 1024 if gpu else 4096, N=n) for n in widths]
    if op == "rms_norm":  # Llama widths: 2048 (1B), 4096 (7B/8B), 8192 (70B); and GPT-2's 768
        return [dict(M=8 * 1024 if gpu else 4096, N=n) for n in (768, 2048, 4096, 8192)]
    if op == "gelu_ffn":
        if gpu:
            return [dict(M=8 * 1024, C=c, Hd=4 * c) for c in widths]
        return [dict(M=512, C=c, Hd=4 * c) for c in (256, 384, 512, 768)]
    if op == "gated_ffn":  # Llama widths: TinyLlama 1.1B, Llama-3.2 3B, Llama-2 7B
        if gpu:
            return [dict(M=8 * 1024, C=c, Hd=h) for c, h in ((2048, 5632), (3072, 8192), (4096, 11008))]
        return [dict(M=512, C=c, Hd=llama_hidden(c)) for c in (256, 384, 512, 768)]
    if gpu:
        return [dict(preset="gpt2", batch=8, seqlen=1024)]
    return [dict(preset="tiny", batch=8, seqlen=128), dict(preset="small", batch=8, seqlen=256)]


def size_label(op: str, p: dict) -> str:
    if op == "attention":
        return f"{p['B']}x{p['T']}x{p['H']}x{p['D']}" + attention_options_label(p)
    if op in NORM_OPS:
        return f"{p['M']}x{p['N']}" + (" +residual" if p.get("residual") else "")
    if op == "gelu_ffn":
        return f"{p['M']}x{p['C']}x{p['Hd']}" + (" exact" if p.get("approximate") == "none" else "")
    if op == "gated_ffn":
        act = p.get("activation", "silu")
        return f"{p['M']}x{p['C']}x{p['Hd']}" + ("" if act == "silu" else f" {act}")
    return ("nanogpt " if p.get("model") == "nanogpt" else "") + f"{p['preset']} {p['batch']}x{p['seqlen']}"


# --------------------------------------------------------------------------- the ops' eager code

# Attention options: keys of a size's params, absent when off (labels and results of plain
# attention stay as they were).
ATTENTION_OPTIONS = ("Hk", "window", "softcap", "alibi", "dropout")


def attention_options_label(p: dict) -> str:
    parts = [f"kv{p['Hk']}" if "Hk" in p else "", f"w{p['window']}" if "window" in p else "",
             f"softcap{p['softcap']:g}" if "softcap" in p else "", "alibi" if p.get("alibi") else "",
             f"drop{p['dropout']:g}" if "dropout" in p else ""]
    return "".join(" " + x for x in parts if x)


def _attention_window(p: dict, causal: bool) -> tuple[int, int]:
    """(left, right) of a size's --window W: W keys back, and W ahead unless causal."""
    w = p.get("window", -1)
    return (w, 0 if causal else w) if w >= 0 else (-1, 0 if causal else -1)


def alibi_slopes_for(nheads: int, device) -> torch.Tensor:
    """BLOOM's ALiBi slopes for a power-of-two head count (2^(-8 h / H), h = 1..H), any H here."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / nheads) for h in range(nheads)], device=device)


def attention_eager(q, k, v, causal: bool, p: dict, keep: torch.Tensor | None = None):
    """What a PyTorch user writes for attention with the size's options, in the inputs' dtype and
    gptfast's (B, T, H, D) layout: SDPA (GQA via enable_gqa; window and ALiBi as an additive mask;
    its own dropout) unless softcap is on, which SDPA cannot do: then scores, tanh cap, bias,
    softmax, dropout and the value product written out. ``keep`` (B, H, T, T) bool replaces the
    random dropout by that exact mask (the float64 ground truth of a check)."""
    b, tq, h, d = q.shape
    tk, hk = k.shape[1], k.shape[2]
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    drop = p.get("dropout", 0.0)
    window = _attention_window(p, causal)
    if (window == (-1, 0) or window == (-1, -1)) and "softcap" not in p and not p.get("alibi") and keep is None:
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=window == (-1, 0), dropout_p=drop,
                                              enable_gqa=hk != h).transpose(1, 2)
    c = torch.arange(tq, device=q.device)[:, None] + (tk - tq)
    j = torch.arange(tk, device=q.device)[None, :]
    visible = torch.ones(tq, tk, dtype=torch.bool, device=q.device)
    if window[0] >= 0:
        visible &= j >= c - window[0]
    if window[1] >= 0:
        visible &= j <= c + window[1]
    bias = torch.zeros(tq, tk, dtype=torch.float32, device=q.device).masked_fill(~visible, float("-inf"))
    if p.get("alibi"):
        bias = bias - alibi_slopes_for(h, q.device)[:, None, None] * (c - j).abs()
    bias = bias.to(q.dtype)
    if "softcap" not in p and keep is None:
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, dropout_p=drop,
                                              enable_gqa=hk != h).transpose(1, 2)
    kh, vh = kh.repeat_interleave(h // hk, 1), vh.repeat_interleave(h // hk, 1)
    s = (qh @ kh.transpose(-1, -2)) * d ** -0.5
    if "softcap" in p:
        s = p["softcap"] * torch.tanh(s / p["softcap"])
    probs = torch.softmax(s + bias, dim=-1)
    if keep is not None:
        probs = probs * keep.to(probs.dtype) / (1.0 - drop)
    elif drop:
        probs = F.dropout(probs, drop)
    return (probs @ vh).transpose(1, 2)


def attention_truth(q, k, v, causal: bool, p: dict):
    """``attention_eager`` with gptfast's dropout mask for the key drawn now from torch's generator
    (gptfast.ops._philox), so that a call of gptfast.attention after the same torch.manual_seed
    drops the same entries."""
    if not p.get("dropout"):
        return attention_eager(q, k, v, causal, p)
    from .ops import _philox
    seed, offset = _philox.rng_state_values(_philox.dropout_rng_state(q.device))
    b, tq, h, _ = q.shape
    keep = _philox.dropout_keep_mask(seed, offset, b, h, tq, k.shape[1], p["dropout"], q.device)
    return attention_eager(q, k, v, causal, p, keep)


def attention_visible_pairs(tq: int, tk: int, window: tuple[int, int]) -> int:
    """How many (query, key) pairs a (left, right) window lets through (exact, O(tq))."""
    c = torch.arange(tq, dtype=torch.int64) + (tk - tq)
    lo = (c - window[0]).clamp(min=0) if window[0] >= 0 else torch.zeros_like(c)
    hi = (c + window[1]).clamp(max=tk - 1) if window[1] >= 0 else torch.full_like(c, tk - 1)
    return int((hi - lo + 1).clamp(min=0).sum())


def layer_norm_eager(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def rms_norm_eager(x, w):
    return F.rms_norm(x, (x.shape[-1],), w, 1e-6)


def rms_norm_residual_eager(x, r, w):  # the unfused residual add, then RMSNorm
    s = x + r
    return F.rms_norm(s, (s.shape[-1],), w, 1e-6), s


def layer_norm_residual_eager(x, r, w, b):  # the unfused residual add: s = x + r, then LayerNorm(s)
    s = x + r
    return F.layer_norm(s, (s.shape[-1],), w, b, 1e-5), s


def gelu_ffn_eager(x, w1, b1, w2, b2, approximate: str = "tanh"):
    return gelu_ffn_ref(x, w1, b1, w2, b2, approximate=approximate)  # Linear -> GELU -> Linear


def _importable(module: str) -> str | None:
    try:
        __import__(module)
    except Exception as exc:
        return f"{module} is not importable ({type(exc).__name__})"
    return None


@dataclass
class Case:
    """One size of one op; ``causal`` only for attention."""

    op: str
    params: dict
    causal: bool | None = None

    @property
    def label(self) -> str:
        return size_label(self.op, self.params)

    def make_inputs(self, device, dtype, gen: torch.Generator, params: dict | None = None) -> list[torch.Tensor]:
        """Fresh random inputs (never zeros), fp32-drawn then cast; O(1) values."""
        p = params or self.params

        def rnd(*shape, scale=1.0, shift=0.0):
            return (torch.randn(*shape, generator=gen) * scale + shift).to(device=device, dtype=dtype)

        if self.op == "attention":
            hk = p.get("Hk", p["H"])
            return [rnd(p["B"], p["T"], p["H"], p["D"])] + [rnd(p["B"], p["T"], hk, p["D"]) for _ in range(2)]
        if self.op == "layer_norm":
            x, w, b = rnd(p["M"], p["N"], scale=2.0, shift=1.0), rnd(p["N"]), rnd(p["N"])
            return [x, rnd(p["M"], p["N"]), w, b] if p.get("residual") else [x, w, b]
        if self.op == "rms_norm":
            x, w = rnd(p["M"], p["N"], scale=2.0, shift=1.0), rnd(p["N"])
            return [x, rnd(p["M"], p["N"]), w] if p.get("residual") else [x, w]
        c, h = p["C"], p["Hd"]
        if self.op == "gated_ffn":  # x, w_gate, w_up, w_down: Llama's, no biases
            return [rnd(p["M"], c), rnd(h, c, scale=c ** -0.5), rnd(h, c, scale=c ** -0.5), rnd(c, h, scale=h ** -0.5)]
        return [rnd(p["M"], c), rnd(h, c, scale=c ** -0.5), rnd(h, scale=0.1),
                rnd(c, h, scale=h ** -0.5), rnd(c, scale=0.1)]

    def eager(self) -> Callable:
        if self.op == "attention":
            causal, p = self.causal, self.options
            if not p:
                return lambda q, k, v: sdpa_bthd(q, k, v, causal)
            return lambda q, k, v: attention_eager(q, k, v, causal, p)
        if self.op == "layer_norm" and self.params.get("residual"):
            return layer_norm_residual_eager
        if self.op == "rms_norm":
            return rms_norm_residual_eager if self.params.get("residual") else rms_norm_eager
        if self.op == "gelu_ffn":
            approx = self.approximate
            return lambda x, w1, b1, w2, b2: gelu_ffn_eager(x, w1, b1, w2, b2, approx)
        if self.op == "gated_ffn":
            act = self.activation
            return lambda x, wg, wu, wd: gated_ffn_ref(x, wg, wu, wd, act)  # Linear, Linear, act * up, Linear
        return layer_norm_eager

    @property
    def approximate(self) -> str:
        """gelu_ffn's GELU: "tanh" (GPT-2's, the default) or "none" (exact, erf: nanoGPT's)."""
        return self.params.get("approximate", "tanh")

    @property
    def activation(self) -> str:
        """gated_ffn's activation: "silu" (SwiGLU, the default), "gelu_tanh" or "gelu" (GeGLU)."""
        return self.params.get("activation", "silu")

    @property
    def options(self) -> dict:
        """The attention options of this size (empty: plain attention)."""
        return {k: v for k, v in self.params.items() if k in ATTENTION_OPTIONS}

    def truth(self) -> Callable:
        """The function the float64 ground truth and PyTorch's own error are computed with:
        ``eager`` except that dropout uses gptfast's mask for the generator's next key."""
        if self.op == "attention" and self.options.get("dropout"):
            causal, p = self.causal, self.options
            return lambda q, k, v: attention_truth(q, k, v, causal, p)
        return self.eager()

    def attention_kwargs(self, device) -> dict:
        p = self.options
        kw = dict(window_size=_attention_window(p, bool(self.causal)), dropout_p=p.get("dropout", 0.0),
                  softcap=p.get("softcap", 0.0))
        if p.get("alibi"):
            kw["alibi_slopes"] = alibi_slopes_for(self.params["H"], device)
        return kw

    def magnitudes(self, inputs64: list[torch.Tensor], grad64: torch.Tensor | None) -> list[float | None]:
        """gptfast.testing's term magnitudes of this case's output and input gradients."""
        if self.op == "attention":
            kw = self.attention_kwargs(inputs64[0].device)
            scale = 1.0 / (1.0 - kw.pop("dropout_p"))  # kept probabilities are scaled up by 1/(1-p)
            mags = attention_magnitudes(*inputs64, grad64, self.causal, **kw)
            return [None if m is None else m * scale for m in mags]
        if self.op == "layer_norm" and self.params.get("residual"):
            # outputs y = LN(s), s = x + r; inputs x, r (both get dLN + ds), w, b
            x, r, w, b = inputs64
            gy, gs = grad64 if grad64 is not None else (None, None)
            out, dx, dw, db = layer_norm_magnitudes(x + r, w, b, gy, 1e-5)
            ms = float((x.abs() + r.abs()).max())
            dx = None if dx is None else dx + float(gs.abs().max())
            return [out, dx, dx, dw, db, ms]  # [y, grads..., then s]
        if self.op == "layer_norm":
            return layer_norm_magnitudes(*inputs64, grad64, 1e-5)
        if self.op == "rms_norm" and self.params.get("residual"):  # outputs y = RMSNorm(s), s = x + r
            x, r, w = inputs64
            gy, gs = grad64 if grad64 is not None else (None, None)
            out, dx, dw = rms_norm_magnitudes(x + r, w, gy, 1e-6)
            dx = None if dx is None else dx + float(gs.abs().max())
            return [out, dx, dx, dw, float((x.abs() + r.abs()).max())]  # [y, grads..., then s]
        if self.op == "rms_norm":
            return rms_norm_magnitudes(*inputs64, grad64, 1e-6)
        if self.op == "gated_ffn":  # [out, dx, dw_gate, dw_up, dw_down]: no biases
            return gated_ffn_magnitudes(*inputs64, self.activation, dout=grad64)[:5]
        return gelu_ffn_magnitudes(*inputs64, grad64, self.approximate)

    def gptfast_fn(self, backend: str) -> Callable:
        import gptfast
        if self.op == "attention":
            causal = self.causal
            if not self.options:
                return lambda q, k, v: gptfast.attention(q, k, v, causal=causal, backend=backend)
            kw = self.attention_kwargs(None)
            cache: dict = {}

            def fn(q, k, v):
                if "alibi_slopes" in kw and q.device not in cache:
                    cache[q.device] = kw["alibi_slopes"].to(q.device)
                extra = {"alibi_slopes": cache[q.device]} if "alibi_slopes" in kw else {}
                return gptfast.attention(q, k, v, causal=causal, backend=backend, **(kw | extra))
            return fn
        if self.op == "layer_norm" and self.params.get("residual"):
            return lambda x, r, w, b: gptfast.layer_norm(x, w, b, 1e-5, backend=backend, residual=r, prenorm=True)
        if self.op == "layer_norm":
            return lambda x, w, b: gptfast.layer_norm(x, w, b, 1e-5, backend=backend)
        if self.op == "rms_norm" and self.params.get("residual"):
            return lambda x, r, w: gptfast.rms_norm(x, w, 1e-6, backend=backend, residual=r, prenorm=True)
        if self.op == "rms_norm":
            return lambda x, w: gptfast.rms_norm(x, w, 1e-6, backend=backend)
        if self.op == "gated_ffn":
            act = self.activation
            return lambda x, wg, wu, wd: gptfast.gated_ffn(x, wg, wu, wd, act, backend=backend)
        approx = self.approximate
        return lambda x, w1, b1, w2, b2: gptfast.gelu_ffn(x, w1, b1, w2, b2, approx, backend=backend)

    def check_params(self, device: str) -> dict:
        """The size the float64 ground truth is computed at (attention: fewer B, H if huge)."""
        p = dict(self.params)
        if self.op == "attention":
            budget = CHECK_SCORES[device]
            while p["B"] > 1 and p["B"] * p["H"] * p["T"] ** 2 > budget:
                p["B"] = max(1, p["B"] // 2)
            group = p["H"] // p.get("Hk", p["H"])  # GQA: keep the query heads per kv head
            while p["H"] >= 2 * group and p["B"] * p["H"] * p["T"] ** 2 > budget:
                p["H"] //= 2
                if "Hk" in p:
                    p["Hk"] = p["H"] // group
        return p

    def work(self, phase: str, dtype: torch.dtype) -> float:
        """FLOPs (attention, gelu_ffn, gated_ffn) or bytes (layer_norm, rms_norm) of one call of ``phase``."""
        p = self.params
        if self.op == "attention":
            if "window" in p:  # the pairs the window lets through, exactly
                pairs = attention_visible_pairs(p["T"], p["T"], _attention_window(p, bool(self.causal)))
            else:  # FlashAttention's count: T^2, halved when causal
                pairs = p["T"] ** 2 / (2 if self.causal else 1)
            fwd = 4.0 * p["B"] * p["H"] * pairs * p["D"]
            return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd-bwd": 3.5}[phase]
        if self.op == "gelu_ffn":
            fwd = 2.0 * p["M"] * p["C"] * p["Hd"] * 2  # x @ w1^T (M,C,H) and a @ w2^T (M,H,C)
            return fwd * {"fwd": 1.0, "bwd": 2.0, "fwd-bwd": 3.0}[phase]
        if self.op == "gated_ffn":
            fwd = 2.0 * p["M"] * p["C"] * p["Hd"] * 3  # x @ w_gate^T, x @ w_up^T (M,C,H) and a @ w_down^T (M,H,C)
            return fwd * {"fwd": 1.0, "bwd": 2.0, "fwd-bwd": 3.0}[phase]
        e = torch.finfo(dtype).bits // 8
        m, n = p["M"], p["N"]
        res = 2 * m * n if p.get("residual") else 0   # fwd: read r, write s; bwd: read ds (dx is dr too)
        vecs, stats = (2, 2) if self.op == "layer_norm" else (1, 1)  # (w, b) and (mean, rstd), or w and rstd
        fwd = (2 * m * n + vecs * n) * e + res * e    # read x, w[, b]; write y
        bwd = (3 * m * n + (vecs + 1) * n) * e + stats * m * 4 + (res // 2) * e  # read x, dy, w, fp32 stats; write dx, dw[, db]
        return {"fwd": fwd, "bwd": bwd, "fwd-bwd": fwd + bwd}[phase]


RMS_NORM_BYTES = ("GB/s counts fwd: read x, w + write y = (2MN + N) elements; bwd: read x, dy, w + write dx, dw "
                  "= (3MN + 2N) elements + 4M bytes of fp32 rstd; fwd-bwd: both; eager = F.rms_norm (eps 1e-6); "
                  "'+residual' sizes (--residual): +2MN elements fwd (read r, write s) and +MN bwd (read ds)")
LAYER_NORM_BYTES = ("GB/s counts fwd: read x, w, b + write y = (2MN + 2N) elements; bwd: read x, dy, w "
                    "+ write dx, dw, db = (3MN + 3N) elements + 8M bytes of fp32 mean/rstd; fwd-bwd: both; "
                    "'+residual' sizes (--residual: y, s = LN(x + r), x + r; eager = the add, then F.layer_norm): "
                    "+2MN elements fwd (read r, write s) and +MN bwd (read ds)")


# --------------------------------------------------------------------------- checking

def _after_seed(seed: int, fn: Callable, inputs) -> torch.Tensor:
    with torch.random.fork_rng(devices=[t.device for t in inputs if t.is_cuda][:1]):
        torch.manual_seed(seed)
        return fn(*inputs)


def _grads(fn, inputs, g):
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, g)


def check_case(case: Case, fn: Callable, device: torch.device, dtype: torch.dtype, backward: bool,
               seed: int = 1234) -> str:
    """Raise AssertionError if ``fn`` differs from the float64 ground truth beyond the DESIGN.md
    rule; return the size it was checked at."""
    p = case.check_params(device.type)
    gen = torch.Generator().manual_seed(seed)
    base = case.make_inputs(device, torch.float32, gen, p)
    eager = case.truth()
    if case.op == "attention" and case.options.get("dropout"):
        # every call draws its dropout key after the same manual_seed: the same mask for all
        truth, candidate = eager, fn
        eager = lambda *xs: _after_seed(seed, truth, xs)  # noqa: E731
        fn = lambda *xs: _after_seed(seed, candidate, xs)  # noqa: E731
    x64 = [t.double().requires_grad_() for t in base]
    xpt = [t.to(dtype).requires_grad_() for t in base]
    xus = [t.to(dtype).requires_grad_() for t in base]
    ref = eager(*x64)
    multi = isinstance(ref, tuple)  # several outputs (layer_norm +residual: y, s), each with a gradient
    g = [torch.randn(r.shape, generator=gen).to(device=device, dtype=dtype) for r in (ref if multi else (ref,))]
    g64 = [t.double() for t in g]
    if not multi:
        g, g64 = g[0], g64[0]
    if backward:
        ref, ref_g = _grads(eager, x64, g64)
        pt, pt_g = _grads(eager, xpt, g)
        out, out_g = _grads(fn, xus, g)
    else:
        with torch.no_grad():
            pt, out = eager(*xpt), fn(*xus)
    if multi and (not isinstance(out, tuple) or len(out) != len(ref)):
        raise AssertionError(f"expected {len(ref)} outputs, got {type(out).__name__}")
    outs, refs, pts = (out, ref, pt) if multi else ((out,), (ref,), (pt,))
    for o, r in zip(outs, refs):
        if o.dtype != dtype or o.shape != r.shape:
            raise AssertionError(f"output {o.dtype} {tuple(o.shape)}, expected {dtype} {tuple(r.shape)}")
    magnitudes = case.magnitudes(x64, g64 if backward else None)
    if backward:
        assert_results_match(outs[0], refs[0], pts[0], out_g, ref_g, pt_g, magnitudes=magnitudes)
    else:
        assert_results_match(outs[0], refs[0], pts[0], magnitudes=magnitudes)
    n_grads = len(x64)
    for i in range(1, len(refs)):  # the further outputs' magnitudes follow the gradients'
        assert_matches_reference(outs[i], refs[i], pts[i], magnitude=magnitudes[n_grads + i], factor=2,
                                 name=f"out[{i}]")
    return size_label(case.op, p)


# --------------------------------------------------------------------------- timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cuda_event_median(fn, warmup_ms: float, rep_ms: float) -> float:
    """Median ms of ``fn`` with one CUDA-event pair per call (used when triton is missing)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    n = max(5, int(rep_ms / est))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for s, e in events:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def time_ms(fn: Callable, device: torch.device, *, min_run_time: float = 0.5,
            warmup_ms: float = 25, rep_ms: float = 100) -> tuple[float, str]:
    """(median milliseconds of ``fn()``, how it was timed)."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except Exception:
            do_bench = None
        if do_bench is not None:
            # Only arguments every triton 2.x/3.x has; return_mode (>= 2.2) or quantiles (older).
            params = inspect.signature(do_bench).parameters
            if "return_mode" in params:
                return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")), "do_bench median"
            if "quantiles" in params:
                return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5])), "do_bench median"
        return _cuda_event_median(fn, warmup_ms, rep_ms), "CUDA events median"
    from torch.utils import benchmark
    fn()  # warm-up
    m = benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return m.median * 1e3, "torch.utils.benchmark median"


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise OSError(key)


def _malloc_trim() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_mib(fn: Callable, device: torch.device) -> float | None:
    """Memory one call of ``fn`` needs above what was allocated before it.

    GPU: ``torch.cuda.max_memory_allocated``. CPU (Linux): growth of the peak resident set
    (VmHWM after ``malloc_trim`` and a reset), an approximation: memory the allocator still caches
    is not counted twice; None where /proc/self/clear_refs is missing.
    """
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        _malloc_trim()  # hand freed heap pages back first, else cached memory hides the call's peak
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _status_kib("VmRSS")
        fn()
        return max(0.0, (_status_kib("VmHWM") - before) / 1024)
    except OSError:
        return None


def _n_sets(tensors: list[torch.Tensor], device: torch.device) -> int:
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    return max(1, min(MAX_SETS, math.ceil(ROTATE_BYTES[device.type] / max(nbytes, 1))))


# --------------------------------------------------------------------------- backends

@dataclass
class Variant:
    name: str
    fn: Callable | None        # callable(*inputs) -> output (None: unavailable)
    reason: str = ""           # why unavailable


def _compile(fn: Callable) -> Callable:
    import torch._dynamo
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(fn, dynamic=False)


def gptfast_backends(op: str, device: str) -> list[str]:
    """Every gptfast backend that runs ``op`` on ``device``; never Triton's interpreter on the CPU."""
    from .ops._backend import available_backends
    names = available_backends(None if op == "train" else op, device)
    return [b for b in names if not (device == "cpu" and b == "triton")]


def default_backends(op: str, device: str) -> list[str]:
    names = gptfast_backends(op, device) + ["eager", "compile"]
    if device == "cuda" and op == "attention" and _importable("flash_attn") is None:
        names.append("flash_attn")
    if device == "cuda" and op in NORM_OPS + ("gated_ffn",) and _importable("liger_kernel") is None:
        names.append("liger")
    return names


def liger_gated_ffn(activation: str) -> Variant:
    """Liger-Kernel's LlamaMLP: torch GEMMs around its fused act(gate) * up (LigerSiLUMulFunction;
    LigerGELUMulFunction, tanh GELU, for GeGLU); it has no exact-erf form."""
    if activation == "gelu":
        return Variant("liger", None, "Liger-Kernel's GEGLU is the tanh GELU only")
    if activation == "silu":
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction as Mul
    else:
        from liger_kernel.ops.geglu import LigerGELUMulFunction as Mul
    return Variant("liger", lambda x, wg, wu, wd: F.linear(Mul.apply(F.linear(x, wg), F.linear(x, wu)), wd))


def make_variant(case: Case, name: str, device: torch.device, dtype: torch.dtype) -> Variant:
    from .ops import _backend
    if name == "eager":
        return Variant(name, case.eager())
    if name == "compile":
        return Variant(name, _compile(case.eager()))
    if name == "flash_attn":
        if case.op != "attention":
            return Variant(name, None, "flash_attn is an attention baseline only")
        why = _importable("flash_attn")
        if why or device.type != "cuda" or dtype == torch.float32:
            return Variant(name, None, why or "flash_attn needs a CUDA GPU and fp16/bf16")
        from flash_attn import flash_attn_func
        causal = case.causal
        kw = case.attention_kwargs(device) if case.options else {}
        return Variant(name, lambda q, k, v: flash_attn_func(q, k, v, causal=causal, **kw))
    if name == "liger":
        if case.op not in NORM_OPS + ("gated_ffn",):
            return Variant(name, None, "Liger-Kernel has no plain attention / GELU-FFN op; layer_norm, rms_norm "
                                       "and gated_ffn only")
        why = _importable("liger_kernel")
        if why or device.type != "cuda":
            return Variant(name, None, why or "Liger-Kernel needs a CUDA GPU")
        if case.op == "gated_ffn":
            return liger_gated_ffn(case.activation)
        if case.op == "rms_norm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            def liger_rms(x, w):  # offset 0, fp32 computation ("llama" casting), not in place
                return LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "llama", False)
            if case.params.get("residual"):  # no fused residual there: its RMSNorm after the add
                return Variant(name, lambda x, r, w: (liger_rms(x + r, w), x + r))
            return Variant(name, liger_rms)
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        if case.params.get("residual"):  # Liger has no fused residual: its LayerNorm after the add
            def liger_residual(x, r, w, b):
                s = x + r
                return LigerLayerNormFunction.apply(s, w, b, 1e-5), s
            return Variant(name, liger_residual)
        return Variant(name, lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, 1e-5))
    if name == "patched":
        return Variant(name, None, "patched is a baseline of train --model nanogpt")
    if name not in _backend.BACKENDS:
        raise BenchError(f"--backends: unknown backend {name!r}; choose from "
                         f"{list(_backend.BACKENDS) + list(BASELINES)}")
    impl = _backend._REGISTRY.get((case.op, name))
    if impl is None:
        return Variant(name, None, f"gptfast has no {name} {case.op} yet")
    why = impl.unavailable_reason(device)
    if why is None and dtype not in impl.dtypes:
        why = f"dtype {dtype} unsupported"
    return Variant(name, None if why else case.gptfast_fn(name), why or "")


# --------------------------------------------------------------------------- running one case

@dataclass
class Row:
    op: str
    size: str
    causal: str
    dtype: str
    device: str
    phase: str
    backend: str
    status: str = "ok"          # ok | WRONG | SKIP | ERROR | OOM
    ms: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    vs_eager: float | None = None
    vs_compile: float | None = None
    peak_mib: float | None = None
    frac_ceiling: float | None = None
    checked_at: str = ""
    timing: str = ""
    n_sets: int | None = None
    error: str = ""
    params: dict = field(default_factory=dict)


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines() or [""]
    return f"{type(exc).__name__}: {lines[0][:300]}"


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_case(case: Case, variant: Variant, phases: list[str], device: torch.device, dtype: torch.dtype,
             min_run_time: float) -> list[Row]:
    common = dict(op=case.op, size=case.label, causal="" if case.causal is None else str(case.causal).lower(),
                  dtype=DTYPE_NAMES[dtype], device=device.type, backend=variant.name, params=dict(case.params))
    rows = [Row(phase=ph, **common) for ph in phases]

    def mark(status, error):
        for r in rows:
            r.status, r.error = status, error
        return rows

    if variant.fn is None:
        return mark("SKIP", variant.reason)
    backward = any(ph != "fwd" for ph in phases)
    check, check_fn, note = case, variant.fn, ""
    if case.op == "attention" and case.options.get("dropout") and variant.name in BASELINES:
        # A baseline's dropout is torch's own RNG: check the rest of it, timed with dropout on.
        check = Case(case.op, {k: v for k, v in case.params.items() if k != "dropout"}, case.causal)
        check_fn, note = make_variant(check, variant.name, device, dtype).fn, " without dropout"
    try:
        checked = check_case(check, check_fn, device, dtype, backward) + note
    except AssertionError as exc:
        return mark("WRONG", _short(exc))
    except Exception as exc:
        return mark("OOM" if _is_oom(exc) else "ERROR", _short(exc))
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fn = variant.fn
    gen = torch.Generator().manual_seed(0)
    first = case.make_inputs(device, dtype, gen)
    n = _n_sets(first, device)
    sets = [first] + [case.make_inputs(device, dtype, gen) for _ in range(n - 1)]
    sets = [[t.requires_grad_() for t in s] for s in sets]
    for row in rows:
        row.checked_at, row.n_sets = checked, n
        graphs = []
        try:
            with torch.no_grad():
                first_out = fn(*sets[0])
                g = (tuple(torch.randn_like(t) for t in first_out) if isinstance(first_out, tuple)
                     else torch.randn_like(first_out))
                del first_out
            counter = iter(range(1 << 62))

            if row.phase == "fwd":
                def call():
                    return fn(*sets[next(counter) % n])
            elif row.phase == "fwd-bwd":
                def call():
                    xs = sets[next(counter) % n]
                    return torch.autograd.grad(fn(*xs), xs, g)
            else:  # backward alone, replayed on graphs built once
                graphs = [(fn(*xs), xs) for xs in sets]

                def call():
                    out, xs = graphs[next(counter) % n]
                    return torch.autograd.grad(out, xs, g, retain_graph=True)
            row.ms, row.timing = time_ms(call, device, min_run_time=min_run_time)
            row.peak_mib = peak_mib(call, device)
            work = case.work(row.phase, dtype)
            if case.op in NORM_OPS:
                row.gbps = work / (row.ms * 1e-3) / 1e9
            else:
                row.tflops = work / (row.ms * 1e-3) / 1e12
        except Exception as exc:
            row.status, row.error = ("OOM" if _is_oom(exc) else "ERROR"), _short(exc)
        finally:
            del graphs
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------- train

def _eager_attention_forward(self, x, segments=None):  # nanoGPT's CausalSelfAttention with SDPA
    if segments is not None:
        raise NotImplementedError("the eager baseline attends across the whole row; it takes no "
                                  "document segments")
    b, t, c = x.shape
    q, k, v = self.c_attn(x).split(c, dim=2)
    q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
    y = self.c_proj(y)
    return F.dropout(y, self.resid_dropout, self.training) if self.resid_dropout else y


def _eager_mlp_forward(self, x):
    y = self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))
    return F.dropout(y, self.resid_dropout, self.training) if self.resid_dropout else y


def _eager_layer_norm_forward(self, x, residual=None, prenorm=False):  # the add, then nn.LayerNorm
    if residual is not None:
        x = x + residual
    y = nn.LayerNorm.forward(self, x)
    return (y, x) if prenorm else y


def eagerize(model: nn.Module) -> nn.Module:
    """Make a gptfast GPT compute with PyTorch built-ins (nanoGPT's code path): nn.LayerNorm's
    F.layer_norm, SDPA, Linear + nn.GELU-equivalent + Linear. Same parameters, no gptfast op."""
    from . import nn as gnn
    for m in model.modules():
        if isinstance(m, gnn.LayerNorm):
            m.forward = types.MethodType(_eager_layer_norm_forward, m)
        elif isinstance(m, gnn.CausalSelfAttention):
            m.forward = types.MethodType(_eager_attention_forward, m)
        elif isinstance(m, gnn.MLP):
            m.forward = types.MethodType(_eager_mlp_forward, m)
    return model


TRAIN_MODELS = ("gpt", "nanogpt")
NANOGPT_BASELINES = ("eager", "compile", "patched")  # --model nanogpt: the nanoGPT model as is, compiled, patched


def load_nanogpt():
    """bench/nanogpt.py, the nanoGPT-structured baseline model (a source checkout's bench/)."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "bench" / "nanogpt.py"
    if not path.is_file():
        raise BenchError(f"--model nanogpt needs bench/nanogpt.py from a gptfast source checkout; {path} is missing")
    name = "gptfast_bench_nanogpt"
    if name not in sys.modules:  # registered first: its dataclass looks its module up there
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def _build_gpt(params: dict, device, variant: str):
    """The model a train row times: gptfast's GPT (on gptfast ops, or eagerized for the eager and
    compile rows) or, for ``model: nanogpt``, the nanoGPT-structured model with the same weights
    (exact GELU, as nanoGPT's nn.GELU(); the gptfast rows then use exact GELU too)."""
    from .model import GPT, GPTConfig
    nano = params.get("model") == "nanogpt"
    config = GPTConfig.from_preset(params["preset"], dropout=0.0, **({"gelu_approximate": "none"} if nano else {}))
    torch.manual_seed(0)
    model = GPT(config).to(device)
    if nano and variant in NANOGPT_BASELINES:
        model = load_nanogpt().from_gpt(model)
        if variant == "patched":
            from .patch import patch
            report = patch(model)
            if report.skipped or len(report.patched) != 2 * config.n_layer * 2 + 1:
                raise RuntimeError(f"gptfast.patch did not patch the whole nanoGPT model: {report}")
    elif variant in ("eager", "compile"):
        eagerize(model)
    return model


def _autocast(device, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def run_train(params: dict, name: str, device: torch.device, dtype: torch.dtype, min_run_time: float) -> Row:
    """One optimizer step (forward, backward, AdamW) of a GPT preset; checked by its first loss."""
    return time_train([prepare_train(params, name, device, dtype)], device, dtype, min_run_time, 1)[0]


def prepare_train(params: dict, name: str, device: torch.device, dtype: torch.dtype) -> tuple[Row, Callable | None]:
    """The row of one train backend and its step function (None when skipped, wrong or failed:
    the row says why), checked by its first loss and run once (compilation, optimizer state)."""
    import gptfast
    from .model import GPT, GPTConfig
    from .ops._backend import _REGISTRY
    row = Row(op="train", size=size_label("train", params), causal="", dtype=DTYPE_NAMES[dtype],
              device=device.type, phase="step", backend=name, params=dict(params))
    nano = params.get("model") == "nanogpt"
    baselines = NANOGPT_BASELINES if nano else ("eager", "compile")
    if name not in baselines:
        if name in BASELINES:
            row.status, row.error = "SKIP", (f"{name} is not a train baseline" + (
                " (patched: of --model nanogpt)" if name == "patched" else ""))
            return row, None
        impls = [_REGISTRY.get((op, name)) for op in ("attention", "layer_norm", "gelu_ffn")]
        reasons = [i.unavailable_reason(device) if i else f"no {name} backend" for i in impls]
        if any(reasons):
            row.status, row.error = "SKIP", next(r for r in reasons if r)
            return row, None
    b, t = params["batch"], params["seqlen"]
    try:
        model = _build_gpt(params, device, name)
        vocab = GPTConfig.from_preset(params["preset"]).vocab_size
        gen = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, vocab, (b, t + 1), generator=gen).to(device) for _ in range(4)]
        backend_ctx = (lambda: gptfast.use_backend(name)) if name not in baselines else contextlib.nullcontext
        fwd = torch.compile(model, dynamic=False) if name == "compile" else model

        # Check: the first loss (before any step, on the timed batch shape, so that a compiled model
        # compiles once) against a float64 eager model with the same weights.
        check = batches[0]
        ref_model = _build_gpt(params, device, "eager").double()
        with torch.no_grad():
            ref = ref_model(check[:, :-1], check[:, 1:])[1].double()
            with _autocast(device, dtype):
                pt = _build_gpt(params, device, "eager")(check[:, :-1], check[:, 1:])[1].double()
            del ref_model
        # with grad enabled, as in the timed steps: a compiled model would recompile for no_grad
        with _autocast(device, dtype), backend_ctx():
            got = fwd(check[:, :-1], check[:, 1:])[1].detach().double()
        try:
            if dtype == torch.float32:
                assert_close(got, ref, atol=1e-4 * max(1.0, abs(ref.item())), name="first loss")
            else:
                assert_within_pytorch_error(got, ref, pt, factor=2, atol=1e-2, name="first loss")
        except AssertionError as exc:
            row.status, row.error = "WRONG", _short(exc)
            return row, None
        row.checked_at = "first loss"

        opt = GPT.configure_optimizer(model, 0.1, 1e-4, device_type=device.type)  # any module: its parameters
        counter = iter(range(1 << 62))

        def step():
            x = batches[next(counter) % len(batches)]
            with backend_ctx():  # the backward too: it resolves its backend when it runs
                with _autocast(device, dtype):
                    _, loss = fwd(x[:, :-1], x[:, 1:])
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        step()  # compilation, optimizer state allocation
        row.n_sets = len(batches)
        return row, step
    except Exception as exc:
        row.status, row.error = ("OOM" if _is_oom(exc) else "ERROR"), _short(exc)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return row, None


def _block_ms(step: Callable, device: torch.device, steps: int) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3 / steps


def time_train(prepared: list[tuple[Row, Callable | None]], device: torch.device, dtype: torch.dtype,
               min_run_time: float, repeats: int) -> list[Row]:
    """Time the prepared steps of one size in ``repeats`` rounds that take each backend in turn
    (one block of steps per backend per round, about ``min_run_time`` seconds each), the median
    block per backend: on a shared machine every backend sees the same load, so their ratios
    hold even when the absolute times drift."""
    from .model import GPT, GPTConfig
    from .train import peak_flops
    live = [(row, step) for row, step in prepared if step is not None]
    times: dict[int, list[float]] = {id(row): [] for row, _ in live}
    steps: dict[int, int] = {}
    for row, step in live:  # the block size from a first, timed step (after the warm-up one)
        try:
            first = _block_ms(step, device, 1)
            steps[id(row)] = max(1, min(1000, round(min_run_time * 1e3 / max(first, 1e-3))))
        except Exception as exc:
            row.status, row.error = ("OOM" if _is_oom(exc) else "ERROR"), _short(exc)
    live = [(row, step) for row, step in live if row.status == "ok"]
    for _ in range(max(1, repeats)):
        for row, step in live:
            times[id(row)].append(_block_ms(step, device, steps[id(row)]))
    for row, step in live:
        b, t = row.params["batch"], row.params["seqlen"]
        ts = sorted(times[id(row)])
        row.ms = ts[len(ts) // 2]
        row.timing = (f"median of {len(ts)} interleaved blocks of steps per backend "
                      f"(~{min_run_time:g} s each, wall clock" + (", synchronized)" if device.type == "cuda" else ")"))
        row.peak_mib = peak_mib(step, device)
        row.tokens_per_s = b * t / (row.ms * 1e-3)
        with torch.device("meta"):  # parameter counts for the FLOPs
            shape = GPT(GPTConfig.from_preset(row.params["preset"]))
        flops = GPT.flops_per_token(shape, t) * row.tokens_per_s
        row.tflops = flops / 1e12
        row.mfu = flops / peak_flops(device, dtype)[0]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return [row for row, _ in prepared]


# --------------------------------------------------------------------------- ceilings

def measure_ceilings(device: torch.device, dtype: torch.dtype) -> dict:
    """The card's (or CPU's) two ceilings: a large copy in GB/s (bytes read + written) and a large
    matmul in TFLOP/s in ``dtype``; random data, medians of the bench timer."""
    from .train import GPU_PEAK_FLOPS
    gpu = device.type == "cuda"
    nbytes = (1 << 30) if gpu else (256 << 20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_ms, how = time_ms(lambda: dst.copy_(src), device, min_run_time=1.0)
    del src, dst
    n = 8192 if gpu else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_ms, _ = time_ms(lambda: a @ b, device, min_run_time=1.0, warmup_ms=100, rep_ms=500)
    out = dict(device=device.type, dtype=DTYPE_NAMES[dtype], copy_bytes=nbytes, copy_ms=copy_ms,
               copy_gbps=2 * nbytes / (copy_ms * 1e-3) / 1e9, matmul_n=n, matmul_ms=mm_ms,
               matmul_tflops=2 * n**3 / (mm_ms * 1e-3) / 1e12, timing=how)
    if gpu:
        name = torch.cuda.get_device_name(device)
        out["datasheet_tflops"] = next((f / 1e12 for k, f in GPU_PEAK_FLOPS if k in name), None)
    return out


# --------------------------------------------------------------------------- reporting

def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from . import __version__
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                cpu=cpu, cpu_cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                gptfast=__version__, gpu=None, triton=None)
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:
        pass
    if device.type == "cuda" and torch.cuda.is_available():
        prop = torch.cuda.get_device_properties(device)
        info["gpu"] = (f"{prop.name} (sm_{prop.major}{prop.minor}, {prop.multi_processor_count} SMs, "
                       f"{prop.total_memory / 2**30:.0f} GiB)")
    return info


def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"
    return str(v)


def fill_ratios(rows: list[Row], ceilings: dict | None) -> None:
    for r in rows:
        if r.status != "ok" or r.ms is None:  # (a train row is timed once its size's rows are ready)
            continue
        peers = {p.backend: p for p in rows if p.op == r.op and p.size == r.size and p.causal == r.causal
                 and p.phase == r.phase and p.status == "ok" and p.ms is not None}
        if "eager" in peers:
            r.vs_eager = peers["eager"].ms / r.ms
        if "compile" in peers:
            r.vs_compile = peers["compile"].ms / r.ms
        if ceilings:
            if r.gbps is not None:
                r.frac_ceiling = r.gbps / ceilings["copy_gbps"]
            elif r.tflops is not None:
                r.frac_ceiling = r.tflops / ceilings["matmul_tflops"]


def format_rows(op: str, rows: list[Row], ceilings: dict | None) -> str:
    rate = {"layer_norm": "GB/s", "rms_norm": "GB/s", "train": "tokens/s"}.get(op, "TFLOP/s")
    cols = ["size"] + (["causal"] if op == "attention" else []) + ["phase", "backend", "status", "ms", rate]
    if op == "train":
        cols += ["TFLOP/s", "MFU"]
    cols += ["x eager", "x compile", "peak MiB"] + (["of ceiling"] if ceilings else []) + ["note"]
    table = []
    for r in rows:
        val = {"layer_norm": r.gbps, "rms_norm": r.gbps, "train": r.tokens_per_s}.get(op, r.tflops)
        cells = {"size": r.size, "causal": r.causal, "phase": r.phase, "backend": r.backend,
                 "status": r.status, "ms": _fmt(r.ms, 4), "TFLOP/s": _fmt(r.tflops),
                 "MFU": "-" if r.mfu is None else f"{100 * r.mfu:.1f}%"}
        cells[rate] = _fmt(val)
        cells.update(**{"x eager": _fmt(r.vs_eager), "x compile": _fmt(r.vs_compile),
                        "peak MiB": _fmt(r.peak_mib), "of ceiling": "-" if r.frac_ceiling is None
                        else f"{100 * r.frac_ceiling:.1f}%"},
                     note=r.error[:90] if r.status != "ok" else (
                         "" if r.checked_at in ("", r.size) else f"checked at {r.checked_at}"))
        table.append([cells[c] for c in cols])
    widths = [max(len(c), *(len(t[i]) for t in table)) if table else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip() for t in table]
    return "\n".join(lines)


def table_header(op: str, device: torch.device, dtype: torch.dtype, info: dict, timing: str,
                 ceilings: dict | None) -> str:
    where = info["gpu"] if device.type == "cuda" else f"{info['cpu']}, {info['torch_threads']} threads"
    lines = [f"gptfast bench {op}: {where}, {DTYPE_NAMES[dtype]}, torch {info['torch']}, "
             f"triton {info['triton']}, python {info['python']}, {info['date']}",
             f"times: {timing}; x eager / x compile = baseline time / this time (> 1 is faster); "
             "every backend checked against a float64 ground truth first (WRONG = failed, not timed)"]
    if op == "attention":
        lines.append("TFLOP/s = 4*B*H*T^2*D (/2 causal; x2.5 bwd, x3.5 fwd-bwd) / time (FlashAttention's count; "
                     "with a window, T^2 is the exact number of visible query-key pairs)")
    elif op == "gelu_ffn":
        lines.append("TFLOP/s = GEMM FLOPs 2*M*C*H + 2*M*H*C (x2 bwd, x3 fwd-bwd) / time; size = M x C x H; "
                     "GELU tanh unless marked exact (--gelu none)")
    elif op == "gated_ffn":
        lines.append("TFLOP/s = GEMM FLOPs 3 * 2*M*C*H (gate, up, down; x2 bwd, x3 fwd-bwd) / time; size = M x C x H; "
                     "SwiGLU (SiLU) unless marked (--activation); eager = Linear, Linear, act(gate) * up, Linear "
                     "without biases (HF LlamaMLP); liger = the same GEMMs around LigerSiLUMulFunction")
    elif op == "layer_norm":
        lines.append(LAYER_NORM_BYTES)
    elif op == "rms_norm":
        lines.append(RMS_NORM_BYTES)
    else:
        lines.append("one optimizer step (fwd + bwd + AdamW); TFLOP/s and MFU from GPT.flops_per_token; "
                     "MFU relative to train.peak_flops (datasheet on known GPUs, measured matmul elsewhere); "
                     "eager = the same GPT on SDPA / F.layer_norm / Linear+GELU+Linear, compile = torch.compile of it; "
                     "rows named 'nanogpt ...' (--model nanogpt): eager / compile / patched = bench/nanogpt.py's "
                     "nanoGPT-structured model with the same weights as is / torch.compile'd / gptfast.patch'ed, "
                     "the gptfast rows are gptfast's GPT, all with exact GELU")
    lines.append("peak MiB: " + ("torch.cuda.max_memory_allocated above the memory allocated before the call"
                                 if device.type == "cuda" else
                                 "growth of the process's peak RSS during one call (approximate)"))
    if ceilings:
        lines.append(f"of ceiling: fraction of the measured {'copy' if op == 'layer_norm' else 'matmul'} ceiling "
                     f"({ceilings['copy_gbps']:.0f} GB/s copy, {ceilings['matmul_tflops']:.3g} TFLOP/s "
                     f"{ceilings['dtype']} matmul)")
    return "\n".join(lines)


def _row_dict(r: Row) -> dict:
    d = dict(r.__dict__)
    d["params"] = json.dumps(r.params, sort_keys=True)
    return d


def write_results(out: Path, op: str, rows: list[Row], info: dict, command: str,
                  ceilings: dict | None = None) -> None:
    """Merge this op's rows into out/results.json (rows of other ops stay) and rewrite results.csv."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    data = {"machine": info, "commands": [], "ceilings": None, "rows": []}
    if path.exists():
        try:
            data.update(json.loads(path.read_text()))
        except (OSError, ValueError):
            pass
    data["machine"] = info
    if command not in data["commands"]:
        data["commands"].append(command)
    if ceilings is not None:
        data["ceilings"] = ceilings
    data["rows"] = [r for r in data["rows"] if r.get("op") != op] + [_row_dict(r) for r in rows]
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    names = list(Row.__dataclass_fields__)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names, extrasaction="ignore")
        w.writeheader()
        for r in data["rows"]:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in names})


def load_ceilings(out: Path | None) -> dict | None:
    if out is None or not (out / "results.json").exists():
        return None
    try:
        return json.loads((out / "results.json").read_text()).get("ceilings")
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- plots

def plot(op: str, rows: list[Row], out: Path, title: str, ceilings: dict | None) -> list[Path]:
    """PNG plots of this op's rows; [] (and a message) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'gptfast[bench]'): no plots", file=sys.stderr)
        return []
    ok = [r for r in rows if r.status == "ok"]
    if not ok:
        return []
    files = []
    backends = list(dict.fromkeys(r.backend for r in ok))
    colors = {b: f"C{i}" for i, b in enumerate(backends)}
    if op == "train":
        fig, ax = plt.subplots(figsize=(7, 4))
        sizes = list(dict.fromkeys(r.size for r in ok))
        width = 0.8 / max(1, len(backends))
        for i, b in enumerate(backends):
            xs = [j + i * width for j, s in enumerate(sizes) for r in ok if r.size == s and r.backend == b]
            ys = [r.tokens_per_s for s in sizes for r in ok if r.size == s and r.backend == b]
            ax.bar(xs, ys, width, label=b, color=colors[b])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], sizes)
        ax.set_xlabel("preset, batch x seqlen")
        ax.set_ylabel("training throughput (tokens/s)")
        ax.set_title(title, fontsize=9)
        ax.legend(title="backend")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        files.append(out / "train.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
        return files
    phases = [p for p in PHASES if any(r.phase == p for r in ok)]
    ylabel = "throughput (GB/s)" if op in NORM_OPS else "throughput (TFLOP/s)"
    ceiling = None
    if ceilings:
        ceiling = ceilings["copy_gbps"] if op in NORM_OPS else ceilings["matmul_tflops"]
    for phase in phases:
        prow = [r for r in ok if r.phase == phase]
        if op == "attention":
            panels = sorted({(r.params["D"], r.causal) for r in prow}, key=lambda k: (k[0], k[1] != "true"))
            key = lambda r: (r.params["D"], r.causal)  # noqa: E731
            xval = lambda r: r.params["T"]  # noqa: E731
            xlabel = f"sequence length T (batch x T = {'/'.join(sorted({str(r.params['B'] * r.params['T']) for r in prow}))} tokens)"
            ptitle = lambda k: f"head dim {k[0]}, {'causal' if k[1] == 'true' else 'not causal'}"  # noqa: E731
        elif op in NORM_OPS:
            panels, key = [None], (lambda r: None)
            ms = sorted({r.params["M"] for r in prow})
            xval, xlabel, ptitle = (lambda r: r.params["N"]), f"hidden size N (M = {'/'.join(map(str, ms))} rows)", (lambda k: "")
        else:
            panels, key = [None], (lambda r: None)
            ms = sorted({r.params["M"] for r in prow})
            xval, xlabel, ptitle = (lambda r: r.params["C"]), f"model width C (C -> H -> C, M = {'/'.join(map(str, ms))} rows)", (lambda k: "")
        ncol = min(2, len(panels))
        nrow = math.ceil(len(panels) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(6.2 * ncol, 4.2 * nrow), squeeze=False)
        for ax, k in zip(axes.flat, panels):
            for b in backends:
                pts = sorted((xval(r), r.gbps if op in NORM_OPS else r.tflops)
                             for r in prow if key(r) == k and r.backend == b)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=b, color=colors[b])
            if ceiling:
                ax.axhline(ceiling, ls="--", color="gray", lw=1,
                           label=f"measured {'copy' if op == 'layer_norm' else 'matmul'} ceiling")
            xs = sorted({xval(r) for r in prow if key(r) == k})
            if op == "attention":
                ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_ylim(bottom=0)
            ax.set_title(ptitle(k))
            ax.grid(alpha=0.3)
            ax.legend(title="backend", fontsize=8)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.suptitle(f"{title} - {phase}", fontsize=10)
        fig.tight_layout()
        files.append(out / f"{op}_{phase}.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    return files


# --------------------------------------------------------------------------- command line

SIZES_HELP = """sizes, separated by spaces or ';' (default: the device's grid, see --dry-run):
attention B,T,H,D[,HK] (batch, seqlen, heads, headdim, kv heads for GQA/MQA; e.g. 4,512,12,64
or 4,512,32,128,8; options: --window, --softcap, --alibi, --dropout);
layer_norm, rms_norm M,N (rows, hidden); gelu_ffn M,C[,H] (rows, width, FFN width, default 4C);
gated_ffn M,C[,H] (rows, width, FFN width, default Llama's 8C/3 rounded up to 256);
train PRESET,BATCH[,SEQLEN] (e.g. gpt2,8 or tiny,8,128); generate PRESET,BATCH,CTX[,NEW]
(prompt length CTX, NEW generated tokens, default 32; e.g. small,1,1024); drop_in FAMILY
(a Hugging Face decoder family, e.g. gpt2 llama; default all 13); linear_cross_entropy M,K,V
(rows, hidden width, vocabulary; default 8192,768,50304: GPT-2's lm_head at batch 8 x 1024)"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("op", choices=OPS + ("ceilings",),
                   help="op to benchmark, 'train' for a GPT training step, 'generate' for greedy decoding "
                        "with / without the KV cache and against Hugging Face GPT-2 (gptfast.bench_generate), "
                        "'overhead' for the host time per op call against PyTorch's (gptfast.bench_overhead), "
                        "'drop_in' for HF decoders' training step patched vs unpatched (gptfast.bench_drop_in), "
                        "'linear_cross_entropy' for the fused lm_head + loss: time and peak memory against "
                        "eager and torch.compile (gptfast.bench_lce), "
                        "or 'ceilings' for the device's copy GB/s and matmul TFLOP/s")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="input dtype (train: autocast dtype); default bf16 on GPU, fp32 on CPU")
    p.add_argument("--backends", default=None,
                   help="comma list of gptfast backends (reference, cpu, triton, cuda) and baselines "
                        "(eager, compile, flash_attn, liger); default: every gptfast backend available "
                        "for the op on the device (never the Triton interpreter) + eager + compile "
                        "(+ flash_attn / liger when importable)")
    p.add_argument("--residual", action="store_true",
                   help="layer_norm, rms_norm: the fused residual add, y, s = norm(x + r), x + r (the ops' "
                        "residual=, prenorm=True) against the add then the norm")
    p.add_argument("--gelu", choices=("tanh", "none"), default=None,
                   help="gelu_ffn: the GELU, tanh (GPT-2's, default) or none (exact erf GELU: nanoGPT's nn.GELU())")
    p.add_argument("--activation", choices=GATED_ACTIVATIONS, default=None,
                   help="gated_ffn: silu (SwiGLU: Llama, default), gelu_tanh (GeGLU: Gemma) or gelu (exact erf)")
    p.add_argument("--model", choices=TRAIN_MODELS, default="gpt",
                   help="train: gptfast's GPT against itself on PyTorch ops (gpt, default) or against a "
                        "model with nanoGPT's structure and the same weights (nanogpt, bench/nanogpt.py: "
                        "eager, compiled and gptfast.patch-ed; exact GELU everywhere)")
    p.add_argument("--fwd", action="store_true", help="time the forward (as in training: graph built)")
    p.add_argument("--bwd", action="store_true", help="time the backward alone (retain_graph replay)")
    p.add_argument("--fwd-bwd", action="store_true", help="time forward + backward (the default)")
    p.add_argument("--sizes", nargs="+", default=None, metavar="SIZE", help=SIZES_HELP)
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None,
                   help="attention: causal only / non-causal only (default: both)")
    p.add_argument("--window", type=int, default=None, metavar="W",
                   help="attention: sliding window of W keys back (and W ahead when not causal)")
    p.add_argument("--softcap", type=float, default=None, help="attention: softcap > 0 (Gemma-2: 50)")
    p.add_argument("--alibi", action="store_true", help="attention: ALiBi with BLOOM's slopes")
    p.add_argument("--dropout", type=float, default=None, metavar="P",
                   help="attention: dropout probability in [0, 1) (checked with gptfast's exact mask)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write results.json, results.csv and PNG plots here (merged with other ops' rows)")
    p.add_argument("--min-run-time", type=float, default=0.3,
                   help="CPU: seconds per torch.utils.benchmark measurement (default 0.3)")
    p.add_argument("--repeats", type=int, default=None,
                   help="generate: timings per measurement, the median is kept (default 3); "
                        "drop_in: training steps per model (default 5); overhead: timed blocks per op "
                        "(default 7); train: interleaved rounds of one block per backend, the median is "
                        "kept (default 5)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit; nothing runs")


def _resolve(args) -> tuple[torch.device, torch.dtype]:
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(dev)
    except RuntimeError as exc:
        raise BenchError(f"--device {dev!r}: {exc}") from None
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device must be cpu or cuda, got {dev!r}")
    if device.type == "cuda" and not torch.cuda.is_available() and not args.dry_run:
        raise BenchError("--device cuda: no CUDA GPU is visible")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def attention_options(args) -> dict:
    """The option keys of an attention size from --window/--softcap/--alibi/--dropout (validated)."""
    o: dict = {}
    if getattr(args, "window", None) is not None:
        if args.window < 0:
            raise BenchError(f"--window must be >= 0 keys, got {args.window}")
        o["window"] = args.window
    if getattr(args, "softcap", None) is not None:
        if not args.softcap > 0 or math.isinf(args.softcap):
            raise BenchError(f"--softcap must be a finite number > 0, got {args.softcap}")
        o["softcap"] = args.softcap
    if getattr(args, "alibi", False):
        o["alibi"] = True
    if getattr(args, "dropout", None) is not None:
        if not 0.0 <= args.dropout < 1.0:
            raise BenchError(f"--dropout must be in [0, 1), got {args.dropout}")
        if args.dropout > 0:
            o["dropout"] = args.dropout
    return o


def plan(args) -> tuple[torch.device, torch.dtype, list, list[str], list[str]]:
    device, dtype = _resolve(args)
    op = args.op
    if args.sizes:
        specs = [s for item in args.sizes for s in item.replace(";", " ").split()]
        sizes = [parse_size(op, s) for s in specs]
    else:
        sizes = default_sizes(op, device.type)
    if op == "attention":
        causals = [True, False] if args.causal is None else [args.causal]
        options = attention_options(args)
        cases = [Case(op, s | options, c) for s in sizes for c in causals]
    elif any(getattr(args, a, None) not in (None, False) for a in ("window", "softcap", "alibi", "dropout")):
        raise BenchError(f"--window/--softcap/--alibi/--dropout are attention options, not {op}'s")
    else:
        cases = [Case(op, s) for s in sizes]
    if getattr(args, "residual", False):
        if op not in NORM_OPS:
            raise BenchError(f"--residual is an option of layer_norm and rms_norm, not {op}'s")
        for c in cases:
            c.params["residual"] = True
    if getattr(args, "gelu", None) is not None:
        if op != "gelu_ffn":
            raise BenchError(f"--gelu is an option of gelu_ffn, not {op}'s")
        for c in cases:
            c.params["approximate"] = args.gelu
    if getattr(args, "activation", None) is not None:
        if op != "gated_ffn":
            raise BenchError(f"--activation is an option of gated_ffn, not {op}'s")
        for c in cases:
            c.params["activation"] = args.activation
    model = getattr(args, "model", "gpt") or "gpt"
    if model != "gpt":
        if op != "train":
            raise BenchError(f"--model is an option of train, not {op}'s")
        for c in cases:
            c.params["model"] = model
    if args.backends:
        backends = [b.strip().lower() for b in args.backends.split(",") if b.strip()]
        from .ops._backend import BACKENDS
        bad = [b for b in backends if b not in BACKENDS + BASELINES]
        if bad:
            raise BenchError(f"--backends: unknown {bad}; choose from {list(BACKENDS) + list(BASELINES)}")
    else:
        backends = default_backends(op, device.type) + (["patched"] if model == "nanogpt" else [])
    phases = [ph for ph, on in (("fwd", args.fwd), ("bwd", args.bwd), ("fwd-bwd", args.fwd_bwd)) if on]
    phases = ["step"] if op == "train" else (phases or ["fwd-bwd"])
    return device, dtype, cases, backends, phases


def print_plan(op, device, dtype, cases, backends, phases, out) -> None:
    print(f"gptfast bench {op} (dry run): device {device.type}, dtype {DTYPE_NAMES[dtype]}, "
          f"phases {','.join(phases)}")
    print(f"backends: {', '.join(backends)}")
    timing = ("CUDA events (triton.testing.do_bench median, else own event loop)" if device.type == "cuda"
              else "torch.utils.benchmark blocked_autorange median")
    print(f"timing: {timing}; each backend checked against a float64 ground truth first")
    for c in cases:
        extra = "" if c.causal is None else (" causal" if c.causal else " non-causal")
        chk = size_label(op, c.check_params(device.type)) if op != "train" else "first loss"
        print(f"  {c.label}{extra}" + ("" if chk == c.label else f"  (checked at {chk})"))
    print(f"{len(cases)} sizes x {len(backends)} backends" + (f" x {len(phases)} phases" if op != "train" else "")
          + (f"; output: {out}/results.json, results.csv, PNG plots" if out else "; no --out: table only"))


def run_ceilings(args, command: str) -> int:
    device, dtype = _resolve(args)
    out = Path(args.out) if args.out else None
    if args.dry_run:
        n = 8192 if device.type == "cuda" else 2048
        size = "1 GiB" if device.type == "cuda" else "256 MiB"
        print(f"gptfast bench ceilings (dry run): device {device.type}: copy of {size} (GB/s = read + "
              f"written bytes / time), {n}x{n} {DTYPE_NAMES[dtype]} matmul (TFLOP/s)"
              + (f"; output: {out}/results.json" if out else ""))
        return 0
    info = machine_info(device)
    c = measure_ceilings(device, dtype)
    print(f"ceilings on {info['gpu'] or info['cpu']}: copy {c['copy_gbps']:.1f} GB/s "
          f"({c['copy_bytes'] >> 20} MiB, {c['copy_ms']:.3f} ms), {c['matmul_n']}^3 {c['dtype']} matmul "
          f"{c['matmul_tflops']:.3g} TFLOP/s ({c['matmul_ms']:.3f} ms)"
          + (f"; datasheet {c['datasheet_tflops']:.0f} TFLOP/s" if c.get("datasheet_tflops") else ""))
    if out:
        write_results(out, "ceilings", [], info, command, ceilings=c)
    return 0


def print_and_write(out_dir: str | None, name: str, header: str, table: str, payload: dict) -> None:
    """Print a benchmark's header and table; with ``out_dir``, also write them to NAME.txt and
    ``payload`` (command, machine, rows, ...) to NAME.json there. (The commands with their own
    tables: overhead, drop_in, linear_cross_entropy.)"""
    print(header)
    print(table)
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.txt").write_text(header + "\n" + table + "\n")
        (out / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str))
        print(f"wrote {out / (name + '.txt')}, {name}.json")


class _Interrupted(BaseException):
    """SIGTERM (a stage's time limit): not an Exception, so the per-run error handling lets it through."""


def _on_sigterm(signum, frame):
    raise _Interrupted()


def run(args, command: str) -> int:
    if args.op == "ceilings":
        return run_ceilings(args, command)
    if args.op == "generate":
        from .bench_generate import run_generate
        return run_generate(args, command)
    if args.op == "overhead":
        from .bench_overhead import run_overhead
        return run_overhead(args, command)
    if args.op == "drop_in":
        from .bench_drop_in import run_drop_in
        return run_drop_in(args, command)
    if args.op == "linear_cross_entropy":
        from .bench_lce import run_linear_cross_entropy
        return run_linear_cross_entropy(args, command)
    device, dtype, cases, backends, phases = plan(args)
    out = Path(args.out) if args.out else None
    if args.dry_run:
        print_plan(args.op, device, dtype, cases, backends, phases, out)
        return 0
    from tqdm import tqdm
    if "compile" in backends and "bwd" in phases:
        # replaying a compiled backward with retain_graph=True needs its buffers kept
        import torch._functorch.config as functorch_config
        functorch_config.donated_buffer = False
    info = machine_info(device)
    ceilings = load_ceilings(out)
    rows: list[Row] = []
    old = signal.signal(signal.SIGTERM, _on_sigterm) if hasattr(signal, "SIGTERM") else None
    interrupted = False
    # A bar on a terminal; in a log (not a TTY) one line per size instead of carriage-return updates.
    tty = sys.stderr.isatty()
    bar = tqdm(total=len(cases) * len(backends), desc=f"bench {args.op}", unit="run", file=sys.stderr,
               dynamic_ncols=True, disable=not tty)
    repeats = args.repeats or 5
    try:
        for case in cases:
            prepared: list = []
            for name in backends:
                bar.set_postfix_str(f"{case.label}{'' if case.causal is None else ' causal' if case.causal else ''} {name}")
                if args.op == "train":  # timed below, once every backend of this size is ready
                    prepared.append(prepare_train(case.params, name, device, dtype))
                    rows.append(prepared[-1][0])
                else:
                    try:
                        variant = make_variant(case, name, device, dtype)
                    except Exception as exc:
                        variant = Variant(name, None, _short(exc))
                    rows += run_case(case, variant, phases, device, dtype, args.min_run_time)
                bar.update()
                if not tty:
                    print(f"bench {args.op}: {case.label}{'' if case.causal is None else ' causal' if case.causal else ''}"
                          f" {name}: {rows[-1].status}", file=sys.stderr, flush=True)
                if out:  # after every run: a stage killed by a timeout keeps what it measured
                    fill_ratios(rows, ceilings)
                    write_results(out, args.op, rows, info, command)
            if prepared:
                bar.set_postfix_str(f"{case.label}: timing {len(prepared)} backends x {repeats} rounds")
                time_train(prepared, device, dtype, args.min_run_time, repeats)
                del prepared  # the models and optimizer states of this size
                if out:
                    fill_ratios(rows, ceilings)
                    write_results(out, args.op, rows, info, command)
    except (KeyboardInterrupt, _Interrupted):
        interrupted = True
    finally:
        bar.close()
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    fill_ratios(rows, ceilings)
    timing = next((r.timing for r in rows if r.timing), "none")
    header = table_header(args.op, device, dtype, info, timing, ceilings)
    print(header)
    print(format_rows(args.op, rows, ceilings))
    if interrupted:
        print("interrupted: the table holds the runs finished so far", file=sys.stderr)
    if out:
        write_results(out, args.op, rows, info, command)
        title = f"gptfast {args.op}, {info['gpu'] or info['cpu']}, {DTYPE_NAMES[dtype]}"
        files = plot(args.op, rows, out, title, ceilings)
        (out / f"{args.op}.txt").write_text(header + "\n" + format_rows(args.op, rows, ceilings) + "\n")
        print(f"wrote {out / 'results.json'}, results.csv, {args.op}.txt"
              + "".join(f", {f.name}" for f in files))
    wrong = [r for r in rows if r.status in ("WRONG", "ERROR")]
    return 130 if interrupted else (1 if wrong else 0)


def main(argv: list[str] | None = None) -> int:
    """``python -m gptfast.bench OP ...`` (the same as ``gptfast bench OP ...``)."""
    parser = argparse.ArgumentParser(prog="gptfast bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(args, "gptfast bench " + " ".join(argv))
    except BenchError as exc:
        parser.exit(2, f"gptfast bench: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
