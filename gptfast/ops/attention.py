"""Scaled dot-product attention in FlashAttention's (batch, seqlen, nheads, headdim) layout, with
FlashAttention 2.8's dense options: GQA/MQA, unequal lengths, sliding windows, softcap, ALiBi,
dropout and the softmax logsumexp.

q is (B, Tq, H, D), k and v (B, Tk, Hk, D) with H % Hk == 0; query head h reads kv head
h // (H / Hk). With shift = Tk - Tq (masks are aligned to the bottom-right corner):

    s_ij  = scale * q_i . k_j
    s_ij  = softcap * tanh(s_ij / softcap)                     (softcap > 0)
    s_ij -= slope_h * |i + shift - j|                           (ALiBi)
    query i sees key j iff  i + shift - left <= j <= i + shift + right
          (window_size = (left, right), -1 unbounded; causal sets right = 0)
    p_ij  = softmax_j(s_ij) over visible keys; a row that sees no key is 0 with lse = -inf
    out_i = sum_j p_ij * keep_ij / (1 - dropout_p) * v_j        (keep: gptfast.ops._philox)

Saved for backward: q, k, v, out and the per-row logsumexp ``lse`` (fp32, O(T)) -- never the
T x T probability matrix, nor the dropout mask (regenerated from its seed and offset). The backward
recomputes P = exp(s - lse) and follows FlashAttention-2 (Dao, 2023, Algorithm 2):

    dV = Pd^T dO,   dPd = dO V^T,   dP = dPd * keep / (1 - p),   delta_i = rowsum(dO_i * O_i),
    dS = P * (dP - delta) (* (1 - tanh^2) under softcap),   dQ = scale * dS K,   dK = scale * dS^T Q,

with Pd = P * keep / (1 - p), and dK, dV summed over the query heads that share a kv head.

Which backend runs a call depends on the call: every backend implements every dense option
(``_backend.ATTENTION_FEATURES``; the cuda kernels are tested in the CPU emulator of their CUDA
code, not yet on a GPU), and ``_backend.KERNEL_ATTENTION_FEATURES`` says which also take the
packed ``varlen`` layout; ``auto`` routes a call to the first backend that implements all it uses.

This file holds, in order: the shared mask and score definitions, the ground truth
``attention_ref``, the reference backend's launchers (the model every kernel follows), input
checks, the custom ops with their autograd formula, and the public functions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _backend
from ._common import (SUPPORTED_DTYPES, autocast_dtype, autocast_off, autograd_function, cast_floats, check_same,
                      check_tensor, run_plain, run_op)

__all__ = ["attention", "flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
           "attention_ref", "attention_fwd_op", "attention_bwd_op"]

MAX_HEADDIM = 256


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- shared definitions

@dataclass(frozen=True)
class Options:
    """One call's options after FlashAttention's normalisation (see :func:`normalise`)."""

    causal: bool                          # window (-1, 0): what the kernels call causal
    window: tuple[int, int] = (-1, -1)    # (left, right), -1 = unbounded; right = 0 when causal
    softcap: float = 0.0                  # > 0 or 0 (none)
    dropout_p: float = 0.0

    @property
    def plain_window(self) -> bool:
        return self.window[0] < 0 and self.window[1] in (-1, 0)


def normalise(causal: bool, window_size: tuple[int, int], softcap: float, dropout_p: float,
              seqlen_k: int) -> Options:
    """FlashAttention's rules: a window side at least ``seqlen_k`` long is unbounded, ``causal``
    sets the right side to 0, and (-1, 0) is causal; a softcap <= 0 is none."""
    left, right = (int(w) for w in window_size)
    left = -1 if left >= seqlen_k else left
    right = -1 if right >= seqlen_k else right
    if causal:
        right = 0
    return Options(causal=left < 0 and right == 0, window=(left, right),
                   softcap=float(softcap) if softcap > 0 else 0.0, dropout_p=float(dropout_p))


# normalise() of the default options (no window, softcap or dropout), by causal: the common call
# skips building one (a frozen dataclass: ~2 us of the op's host time on tiny inputs)
_PLAIN_OPTIONS = {c: Options(causal=c, window=(-1, 0) if c else (-1, -1)) for c in (False, True)}


def visible(tq: int, tk: int, window: tuple[int, int], device) -> torch.Tensor | None:
    """(tq, tk) bool: query i sees key j (bottom-right aligned window); None when all are."""
    left, right = window
    if left < 0 and right < 0:
        return None
    i = torch.arange(tq, device=device)[:, None] + (tk - tq)
    j = torch.arange(tk, device=device)[None, :]
    vis = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if right >= 0:
        vis &= j <= i + right
    if left >= 0:
        vis &= j >= i - left
    return vis


def _alibi_bias(slopes: torch.Tensor, tq: int, tk: int, dtype: torch.dtype) -> torch.Tensor:
    """-slope * |i + tk - tq - j| as (B or 1, H, tq, tk)."""
    i = torch.arange(tq, device=slopes.device)[:, None] + (tk - tq)
    j = torch.arange(tk, device=slopes.device)[None, :]
    dist = (i - j).abs().to(dtype)
    s = slopes.to(dtype)
    s = s[None] if s.dim() == 1 else s
    return -s[:, :, None, None] * dist


def _scores(q: torch.Tensor, k: torch.Tensor, opts: Options, scale: float,
            alibi_slopes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The masked scores (B, H, Tq, Tk) of q (B, Tq, H, D) and k (B, Tk, Hk, D), and
    tanh(scale q.k / softcap) when softcapped (for the backward), in q's dtype."""
    h, hk = q.shape[2], k.shape[2]
    kh = k.transpose(1, 2)
    if hk != h:
        kh = kh.repeat_interleave(h // hk, dim=1)  # the reference may copy; kernels index the kv head
    s = torch.matmul(q.transpose(1, 2), kh.transpose(-1, -2)) * scale
    t = None
    if opts.softcap > 0:
        t = torch.tanh(s / opts.softcap)
        s = t * opts.softcap
    tq, tk = q.shape[1], k.shape[1]
    if alibi_slopes is not None:
        s = s + _alibi_bias(alibi_slopes, tq, tk, s.dtype)
    vis = visible(tq, tk, opts.window, q.device)
    if vis is not None:
        s = s.masked_fill(~vis, float("-inf"))
    return s, t


def _expand_kv(t: torch.Tensor, h: int) -> torch.Tensor:
    """(B, Tk, Hk, D) -> (B, H, Tk, D), each kv head repeated for its query heads."""
    th = t.transpose(1, 2)
    return th if th.shape[1] == h else th.repeat_interleave(h // th.shape[1], dim=1)


def _group_sum(t: torch.Tensor, hk: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, Hk, T, D): the sum over the query heads of each kv head's group."""
    b, h, n, d = t.shape
    return t if h == hk else t.view(b, hk, h // hk, n, d).sum(2)


def dropout_scale(keep: torch.Tensor | None, dropout_p: float, dtype: torch.dtype) -> torch.Tensor | None:
    """keep / (1 - p) in ``dtype``, or None without dropout."""
    if keep is None:
        return None
    return keep.to(dtype) / (1.0 - dropout_p)


def _keep_mask(rng_state: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, dropout_p: float,
               batch_start: int = 0):
    """The (B, H, Tq, Tk) keep mask of gptfast.ops._philox for q's batch entries batch_start..;
    None without dropout."""
    if dropout_p <= 0.0 or rng_state is None:
        return None
    from . import _philox
    seed, offset = _philox.rng_state_values(rng_state)
    b, tq, h, _ = q.shape
    return _philox.dropout_keep_mask(seed, offset, b, h, tq, k.shape[1], dropout_p, q.device, batch_start)


# --------------------------------------------------------------------------- ground truth

def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                  softmax_scale: float | None = None, upcast: bool = True, *,
                  window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                  alibi_slopes: torch.Tensor | None = None, dropout_p: float = 0.0,
                  dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Ground truth from plain, differentiable PyTorch ops (materialises the Tq x Tk matrix).

    The module docstring's semantics. With ``upcast`` the math runs in fp32 (fp64 for fp64
    inputs) and the result is cast back to q's dtype; without it every op runs in the input
    dtype, as an eager model would. ``dropout_mask`` (B, H, Tq, Tk) bool, True = kept, applies
    dropout with rate ``dropout_p`` (the mask a kernel drew: see gptfast.ops._philox). Rows
    that see no key give 0.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    dtype = q.dtype
    if upcast:
        acc = _acc_dtype(dtype)
        q, k, v = q.to(acc), k.to(acc), v.to(acc)
    opts = normalise(causal, window_size, softcap, dropout_p, k.shape[1])
    s, _ = _scores(q, k, opts, scale, alibi_slopes)
    # An all -inf row softmaxes to NaN; it means "no keys" and gives 0. Only those rows: a NaN
    # (or inf) in a visible score is the inputs' NaN and must reach exactly the rows that see it.
    no_keys = (s == float("-inf")).all(dim=-1, keepdim=True)
    p = torch.softmax(s, dim=-1).masked_fill(no_keys, 0.0)
    if dropout_mask is not None:
        p = p * dropout_scale(dropout_mask, dropout_p, p.dtype)
    out = torch.matmul(p, _expand_kv(v, q.shape[2])).transpose(1, 2)  # (B, Tq, H, D)
    return out.to(dtype)


# --------------------------------------------------------------------------- reference launchers

def _probabilities(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    # Rows with lse = -inf have no unmasked key: their probabilities are 0, not exp(-inf + inf).
    # Only those: lse = NaN (a NaN score) or +inf (an infinite one) must give NaN probabilities,
    # as SDPA and every kernel do, so that the reference never hides a NaN.
    no_keys = (lse == float("-inf")).unsqueeze(-1)
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0).unsqueeze(-1))
    return p.masked_fill(no_keys, 0.0)


def _launcher_options(causal: bool, window: tuple[int, int], softcap: float, dropout_p: float) -> Options:
    # A plain (featureless) call passes no window: causal is then the window (-1, 0).
    return Options(causal, window if window != (-1, -1) or not causal else (-1, 0), softcap, dropout_p)


def attention_forward_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                                softmax_scale: float, *, window: tuple[int, int] = (-1, -1),
                                softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                                dropout_p: float = 0.0, rng_state: torch.Tensor | None = None,
                                varlen: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference launcher: returns out (B, Tq, H, D) in q.dtype and lse (B, H, Tq) in fp32.

    The keyword options are the normalised ones (:func:`normalise`; ``causal`` is implied by
    ``window``'s right side when given) and the dropout generator's (seed, offset) as an int64
    tensor ``rng_state``; kernels without those features are called without them. ``varlen``:
    packed sequences (gptfast.ops.varlen's launcher contract).
    """
    if varlen is not None:
        from .varlen import attention_varlen_forward_reference
        return attention_varlen_forward_reference(q, k, v, *varlen, causal, softmax_scale, window=window,
                                                  softcap=softcap, alibi_slopes=alibi_slopes,
                                                  dropout_p=dropout_p, rng_state=rng_state)
    opts = _launcher_options(causal, window, softcap, dropout_p)
    return _forward_reference(q, k, v, opts, softmax_scale, alibi_slopes,
                              _keep_mask(rng_state, q, k, dropout_p))


def _forward_reference(q, k, v, opts: Options, softmax_scale: float, alibi_slopes, keep):
    """The reference forward given the options and the dropout keep mask (or None)."""
    acc = _acc_dtype(q.dtype)
    s, _ = _scores(q.to(acc), k.to(acc), opts, softmax_scale, alibi_slopes)
    lse = torch.logsumexp(s, dim=-1)  # (B, H, Tq); -inf for a row with no keys
    p = _probabilities(s, lse)
    drop = dropout_scale(keep, opts.dropout_p, acc)
    if drop is not None:
        p = p * drop
    out = torch.matmul(p, _expand_kv(v.to(acc), q.shape[2])).transpose(1, 2)
    return out.to(q.dtype).contiguous(), lse  # lse stays fp64 for fp64 inputs (gradcheck)


def attention_backward_reference(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 out: torch.Tensor, lse: torch.Tensor, causal: bool, softmax_scale: float,
                                 deterministic: bool = False, *, window: tuple[int, int] = (-1, -1),
                                 softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                                 dropout_p: float = 0.0, rng_state: torch.Tensor | None = None,
                                 varlen: tuple | None = None) -> tuple[torch.Tensor, ...]:
    """Reference launcher for the FlashAttention-2 backward, untiled. Always deterministic."""
    if varlen is not None:
        from .varlen import attention_varlen_backward_reference
        return attention_varlen_backward_reference(dout, q, k, v, out, lse, *varlen, causal, softmax_scale,
                                                   deterministic, window=window, softcap=softcap,
                                                   alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                                                   rng_state=rng_state)
    opts = _launcher_options(causal, window, softcap, dropout_p)
    return _backward_reference(dout, q, k, v, out, lse, opts, softmax_scale, alibi_slopes,
                               _keep_mask(rng_state, q, k, dropout_p))


def _backward_reference(dout, q, k, v, out, lse, opts: Options, softmax_scale: float, alibi_slopes, keep):
    """The reference backward given the options and the dropout keep mask (or None)."""
    acc = _acc_dtype(q.dtype)
    h, hk = q.shape[2], k.shape[2]
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    do = dout.to(acc).transpose(1, 2)                    # (B, H, Tq, D)
    s, t = _scores(qa, ka, opts, softmax_scale, alibi_slopes)  # (B, H, Tq, Tk)
    p = _probabilities(s, lse.to(acc))
    drop = dropout_scale(keep, opts.dropout_p, acc)
    pd = p if drop is None else p * drop
    dv = _group_sum(torch.matmul(pd.transpose(-1, -2), do), hk)     # (B, Hk, Tk, D)
    dp = torch.matmul(do, _expand_kv(va, h).transpose(-1, -2))      # (B, H, Tq, Tk)
    if drop is not None:
        dp = dp * drop
    delta = (do * out.to(acc).transpose(1, 2)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    if t is not None:
        ds = ds * (1.0 - t * t)
    dq = torch.matmul(ds, _expand_kv(ka, h)) * softmax_scale
    dk = _group_sum(torch.matmul(ds.transpose(-1, -2), qa.transpose(1, 2)), hk) * softmax_scale
    back = lambda x, like: x.transpose(1, 2).to(like.dtype).contiguous()  # noqa: E731
    return back(dq, q), back(dk, k), back(dv, v)


# --------------------------------------------------------------------------- input checks

_DTYPES = frozenset(SUPPORTED_DTYPES)


def _is_4d(t, dtype) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == dtype and t.dim() == 4


def _check_inputs(q, k, v, causal, softmax_scale, window_size, softcap, alibi_slopes, dropout_p) -> None:
    op = "attention"
    # a few reads on every valid call (one supported dtype); else say which argument is wrong
    if not (isinstance(q, torch.Tensor) and q.dtype in _DTYPES and _is_4d(q, q.dtype) and _is_4d(k, q.dtype)
            and _is_4d(v, q.dtype)):
        for name, t in (("q", q), ("k", k), ("v", v)):
            check_tensor(op, name, t, ndim=4)
        if autocast_dtype(q.device.type) is None:  # autocast casts all three to one dtype first
            check_same(op, "q", q, k=k, v=v)
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"gptfast.{op}: {name} is on {t.device} but q is on {q.device}")
    b, tq, h, d = q.shape
    if not 1 <= d <= MAX_HEADDIM:
        raise ValueError(f"gptfast.{op}: head dim (q.shape[3]) must be in 1..{MAX_HEADDIM}, got {d}")
    hk = k.shape[2]
    if k.shape[0] != b or k.shape[3] != d or hk < 1 or h % hk:
        raise ValueError(f"gptfast.{op}: k must have shape (batch, seqlen_k, nheads_k, headdim) = "
                         f"({b}, seqlen_k, nheads_k, {d}) with nheads ({h}) a multiple of nheads_k, to "
                         f"match q {tuple(q.shape)}; got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"gptfast.{op}: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    _check_options(op, causal, softmax_scale, window_size, softcap, dropout_p, alibi_slopes, [(h,), (b, h)],
                   q.device)


def _check_options(op: str, causal, softmax_scale, window_size, softcap, dropout_p, alibi_slopes,
                   slope_shapes: list[tuple[int, ...]], device) -> None:
    """The option arguments shared by the dense and varlen functions; the messages name them."""
    if (alibi_slopes is None and softmax_scale is None and type(causal) is bool and window_size == (-1, -1)
            and softcap == 0.0 and dropout_p == 0.0 and type(softcap) in (int, float)
            and type(dropout_p) in (int, float)):
        return  # the defaults (the common call): nothing to check
    if not isinstance(causal, bool):
        raise TypeError(f"gptfast.{op}: causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float))
                                          and math.isfinite(softmax_scale)):
        raise ValueError(f"gptfast.{op}: softmax_scale must be a finite number or None, got {softmax_scale!r}")
    if len(window_size) != 2 or any(int(w) != w or w < -1 for w in window_size):
        raise ValueError(f"gptfast.{op}: window_size must be two integers >= -1 (-1: unbounded), "
                         f"got {tuple(window_size)}")
    if not (isinstance(softcap, (int, float)) and math.isfinite(softcap)):
        raise ValueError(f"gptfast.{op}: softcap must be a finite number (<= 0: none), got {softcap!r}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"gptfast.{op}: dropout_p must be in [0, 1), got {dropout_p!r}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dtype != torch.float32:
            raise TypeError(f"gptfast.{op}: alibi_slopes must be a float32 tensor, got "
                            f"{getattr(alibi_slopes, 'dtype', type(alibi_slopes).__name__)}")
        if tuple(alibi_slopes.shape) not in slope_shapes:
            raise ValueError(f"gptfast.{op}: alibi_slopes must have shape (nheads,) = {slope_shapes[0]} or "
                             f"(batch, nheads) = {slope_shapes[1]}, got {tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != device:
            raise ValueError(f"gptfast.{op}: alibi_slopes is on {alibi_slopes.device} but q is on {device}")


def _features(q: torch.Tensor, k: torch.Tensor, opts: Options, alibi_slopes) -> frozenset[str]:
    """The _backend.ATTENTION_FEATURES a call uses (see _backend.KERNEL_ATTENTION_FEATURES)."""
    f = set()
    if k.shape[2] != q.shape[2]:
        f.add("gqa")
    if k.shape[1] != q.shape[1]:
        f.add("seqlen_q != seqlen_k")
    if not opts.plain_window:
        f.add("window_size")
    if opts.softcap > 0:
        f.add("softcap")
    if alibi_slopes is not None:
        f.add("alibi_slopes")
    if opts.dropout_p > 0:
        f.add("dropout_p")
    return frozenset(f)


def _kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim has stride 1 and its seqlen rows are disjoint, else a copy.

    Kernels read (seqlen, headdim) tiles with the seqlen stride as row pitch (BLAS's leading
    dimension on the CPU), so broadcast (``expand``) or overlapping rows must be materialised.
    ``.contiguous()`` is not enough: it keeps a size-1 last dim's odd stride.
    """
    if t.stride(-1) == 1 and (t.shape[1] <= 1 or t.stride(1) >= t.shape[-1]):
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- custom ops

def _launch_kwargs(window_left, window_right, softcap, alibi_slopes, dropout_p, rng_state, features):
    """The feature keywords for a launcher: none for a call without features (kernel backends
    take none), the normalised options otherwise."""
    if not features:
        return {}
    return dict(window=(window_left, window_right), softcap=softcap, alibi_slopes=alibi_slopes,
                dropout_p=dropout_p, rng_state=rng_state)


def _op_features(q, k, window_left, window_right, softcap, alibi_slopes, dropout_p) -> frozenset[str]:
    """:func:`_features` from a custom op's normalised scalars (no Options built: per-call path)."""
    if (k.shape[2] == q.shape[2] and k.shape[1] == q.shape[1] and window_left < 0 and window_right in (-1, 0)
            and softcap <= 0 and alibi_slopes is None and dropout_p <= 0):
        return _NO_FEATURES
    opts = Options(window_left < 0 and window_right == 0, (window_left, window_right), softcap, dropout_p)
    return _features(q, k, opts, alibi_slopes)


_NO_FEATURES: frozenset[str] = frozenset()


# The op and its backward are torch.library custom ops so that torch.compile(fullgraph=True)
# traces models through them (the fake implementations give output metadata without running a
# kernel). The backend is resolved when the op runs, not when it is traced: a compiled model still
# follows ``gptfast.use_backend`` / GPTFAST_BACKEND at run time, and tracing never imports triton.
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float,
                   window_left: int, window_right: int, softcap: float, alibi_slopes: torch.Tensor | None,
                   dropout_p: float, rng_state: torch.Tensor | None, deterministic: bool,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Tq, H, D) contiguous, lse (B, H, Tq) fp32 -- see the launcher contract in _backend.py."""
    if q.numel() == 0 or k.shape[1] == 0:
        out, lse = _attention_fwd_fake(q, k, v, causal, softmax_scale, window_left, window_right, softcap,
                                       alibi_slopes, dropout_p, rng_state, deterministic, backend)
        return out.zero_(), lse.fill_(float("-inf"))
    features = _op_features(q, k, window_left, window_right, softcap, alibi_slopes, dropout_p)
    launchers = _backend.resolve("attention", q.device, q.dtype, backend or None, features)
    with autocast_off(q.device.type):
        return launchers.fwd(q, k, v, causal, softmax_scale,
                             **_launch_kwargs(window_left, window_right, softcap, alibi_slopes, dropout_p,
                                              rng_state, features))


attention_fwd_op = torch.library.custom_op("gptfast::attention_fwd", _attention_fwd, mutates_args=())


@attention_fwd_op.register_fake
def _attention_fwd_fake(q, k, v, causal, softmax_scale, window_left, window_right, softcap, alibi_slopes,
                        dropout_p, rng_state, deterministic, backend):
    b, t, h, _ = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((b, h, t), dtype=_lse_dtype(q.dtype)))


def _attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, causal: bool, softmax_scale: float, window_left: int, window_right: int,
                   softcap: float, alibi_slopes: torch.Tensor | None, dropout_p: float,
                   rng_state: torch.Tensor | None, deterministic: bool,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (contiguous, shapes and dtypes of q, k, v)."""
    if q.numel() == 0 or k.shape[1] == 0:
        return tuple(torch.zeros_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    features = _op_features(q, k, window_left, window_right, softcap, alibi_slopes, dropout_p)
    launchers = _backend.resolve("attention", q.device, q.dtype, backend or None, features)
    kwargs = _launch_kwargs(window_left, window_right, softcap, alibi_slopes, dropout_p, rng_state, features)
    if deterministic:
        kwargs["deterministic"] = True
    with autocast_off(q.device.type):
        return launchers.bwd(dout, q, k, v, out, lse, causal, softmax_scale, **kwargs)


attention_bwd_op = torch.library.custom_op("gptfast::attention_bwd", _attention_bwd, mutates_args=())


@attention_bwd_op.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, causal, softmax_scale, window_left, window_right, softcap,
                        alibi_slopes, dropout_p, rng_state, deterministic, backend):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


_OPTION_INPUTS = 10  # inputs after q, k, v: causal ... backend


def _attention_setup_context(ctx, inputs, output):
    q, k, v, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)  # O(T): never the T x T probabilities nor the mask
    ctx.mark_non_differentiable(lse)
    ctx.options = options


def _attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = run_plain(attention_bwd_op, _attention_bwd, _kernel_layout(dout), q, k, v, out, lse, *ctx.options)
    return (dq, dk, dv) + (None,) * _OPTION_INPUTS


attention_fwd_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)
_AttentionFunction = autograd_function("_AttentionFunction", _attention_fwd, _attention_setup_context,
                                       _attention_backward)


# --------------------------------------------------------------------------- public functions

def _rng_state(device: torch.device, dropout_p: float) -> torch.Tensor | None:
    """[seed, offset] of this call's dropout mask (gptfast.ops._philox.dropout_rng_state: drawn
    from torch's default generator of the device with tensor ops, so torch.compile and CUDA graphs
    record the draw and torch.manual_seed reproduces it); None without dropout."""
    if dropout_p <= 0.0:
        return None
    from . import _philox
    return _philox.dropout_rng_state(device)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              softmax_scale: float | None = None, backend: str | None = None, *,
              window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
              alibi_slopes: torch.Tensor | None = None, dropout_p: float = 0.0,
              deterministic: bool = False, return_lse: bool = False):
    """Fused scaled dot-product attention (FlashAttention-2 algorithm on the kernel backends).

    Args:
        q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim) with
            nheads a multiple of nheads_k (GQA; MQA when nheads_k = 1) -- FlashAttention's layout,
            *not* SDPA's (batch, nheads, seqlen, headdim). One dtype among float16, bfloat16,
            float32 (float64 on the reference and cpu backends), one device. headdim in 1..256.
            Any strides; the last dimension is made contiguous if it is not.
        causal: query i sees keys j <= i + seqlen_k - seqlen_q (aligned to the bottom-right
            corner; the same as top-left for equal lengths). A query row that sees no key gives 0.
        softmax_scale: multiplies q.k before the softmax; default 1/sqrt(headdim).
        backend: "auto", "reference", "triton", "cuda" or "cpu"; None defers to
            ``gptfast.use_backend`` / ``GPTFAST_BACKEND`` / auto. Every backend runs every option
            below; should one lack an option (``_backend.KERNEL_ATTENTION_FEATURES``), ``auto``
            sends the call on to a backend that has it, and an explicit backend that lacks it
            raises NotImplementedError naming it.
        window_size: (left, right) sliding window, -1 unbounded: query i sees keys
            j in [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right].
        softcap: > 0 caps the scaled scores to softcap * tanh(score / softcap) (Gemma-2).
        alibi_slopes: float32 (nheads,) or (batch, nheads): score_ij -= slope * |i + Tk - Tq - j|.
        dropout_p: dropout on the attention probabilities, kept entries scaled by 1/(1 - p); the
            mask is a function of (seed, offset, batch, head, row, column) with (seed, offset)
            drawn from torch's default generator (gptfast.ops._philox), regenerated in backward.
        deterministic: ask kernel backends for a bitwise-reproducible backward (no atomics).
        return_lse: also return the logsumexp of each query row's scores, (batch, nheads,
            seqlen_q) float32 (-inf for a row that sees no key), before dropout.

    Returns:
        out (batch, seqlen_q, nheads, headdim) in q's dtype (the autocast dtype under
        ``torch.autocast``), or (out, lse) with ``return_lse``. Memory saved for backward is
        O(seqlen): q, k, v, out and an fp32 logsumexp per row.
    """
    _check_inputs(q, k, v, causal, softmax_scale, window_size, softcap, alibi_slopes, dropout_p)
    amp = autocast_dtype(q.device.type)
    if amp is not None:
        q, k, v = cast_floats(amp, q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if window_size == (-1, -1) and softcap == 0.0 and dropout_p == 0.0 and type(causal) is bool:
        opts = _PLAIN_OPTIONS[causal]
    else:
        opts = normalise(causal, window_size, softcap, dropout_p, k.shape[1])
    q, k, v = _kernel_layout(q), _kernel_layout(k), _kernel_layout(v)
    slopes = None if alibi_slopes is None else alibi_slopes.contiguous()
    out, lse = run_op(attention_fwd_op, _AttentionFunction, _attention_fwd, q, k, v, opts.causal, scale,
                      opts.window[0], opts.window[1], opts.softcap, slopes, opts.dropout_p,
                      _rng_state(q.device, opts.dropout_p), bool(deterministic), _backend.checked_name(backend))
    return (out, lse) if return_lse else out


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    softmax_scale: float | None = None, causal: bool = False,
                    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                    return_attn_probs: bool = False):
    """Drop-in for ``flash_attn.flash_attn_func`` (FlashAttention 2.8): same arguments, order,
    defaults (``causal=False``) and returns; q (batch, seqlen_q, nheads, headdim), k/v (batch,
    seqlen_k, nheads_k, headdim). Runs :func:`attention`.

    Returns out, or with ``return_attn_probs`` (out, softmax_lse (batch, nheads, seqlen_q) fp32,
    S_dmask (batch, nheads, seqlen_q, seqlen_k): the probabilities with dropped entries negated,
    computed by the reference -- for tests, small shapes).
    """
    window_size = _window_tuple(window_size)
    if not return_attn_probs:
        return attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                         softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                         deterministic=deterministic)
    state = _rng_snapshot(q.device)
    out, lse = attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                         softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                         deterministic=deterministic, return_lse=True)
    return out, lse, _dropped_probabilities(q, k, state, dropout_p, softmax_scale, causal, window_size,
                                            softcap, alibi_slopes)


def _rng_snapshot(device: torch.device) -> torch.Tensor:
    """The default generator's state of ``device`` (to replay a call's dropout draw)."""
    return torch.random.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state(device)


def _dropped_probabilities(q, k, rng_before, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, batch_start: int = 0, seqlen_k_norm: int | None = None) -> torch.Tensor:
    """FlashAttention's S_dmask: (B, H, Tq, Tk) probabilities with dropped entries negated, for
    the call that ran with the default generator in state ``rng_before`` (replayed here). A
    varlen sequence b passes ``batch_start=b`` and the call's max_seqlen_k (``seqlen_k_norm``,
    the window normalisation's length)."""
    with torch.no_grad():
        qa, ka = q.detach().to(_acc_dtype(q.dtype)), k.detach().to(_acc_dtype(q.dtype))
        scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
        opts = normalise(causal, window_size, softcap, dropout_p,
                         k.shape[1] if seqlen_k_norm is None else seqlen_k_norm)
        s, _ = _scores(qa, ka, opts, scale, alibi_slopes)
        p = _probabilities(s, torch.logsumexp(s, dim=-1))
        if opts.dropout_p <= 0:
            return p
        after = _rng_snapshot(q.device)
        setter = torch.random.set_rng_state if q.device.type == "cpu" else (
            lambda st: torch.cuda.set_rng_state(st, q.device))
        setter(rng_before)
        try:
            rng = _rng_state(q.device, opts.dropout_p)
        finally:
            setter(after)
        keep = _keep_mask(rng, q, k, opts.dropout_p, batch_start)
        return torch.where(keep, p, -p)


def _window_tuple(window_size) -> tuple[int, int]:
    # FlashAttention's tests pass window sizes as tensors or lists
    if isinstance(window_size, torch.Tensor):
        window_size = window_size.tolist()
    return tuple(int(w) for w in window_size)


def flash_attn_qkvpacked_func(qkv: torch.Tensor, dropout_p: float = 0.0, softmax_scale: float | None = None,
                              causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                              softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                              deterministic: bool = False, return_attn_probs: bool = False):
    """Drop-in for ``flash_attn.flash_attn_qkvpacked_func``: qkv (batch, seqlen, 3, nheads, headdim)."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"gptfast.flash_attn_qkvpacked_func: qkv must have shape (batch, seqlen, 3, nheads, "
                         f"headdim), got {tuple(getattr(qkv, 'shape', ()))}")
    q, k, v = qkv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, dropout_p: float = 0.0,
                             softmax_scale: float | None = None, causal: bool = False,
                             window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                             alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                             return_attn_probs: bool = False):
    """Drop-in for ``flash_attn.flash_attn_kvpacked_func``: q (batch, seqlen_q, nheads, headdim),
    kv (batch, seqlen_k, 2, nheads_k, headdim)."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"gptfast.flash_attn_kvpacked_func: kv must have shape (batch, seqlen_k, 2, nheads_k, "
                         f"headdim), got {tuple(getattr(kv, 'shape', ()))}")
    k, v = kv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)
