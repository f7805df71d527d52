"""Variable-length (packed) attention: FlashAttention 2.8's varlen functions and padding helpers.

A batch of sequences of different lengths is packed along one token axis, without padding:

    q (total_q, H, D), k and v (total_k, Hk, D), H % Hk == 0
    cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,), prefix sums of the lengths (cu[0] = 0,
        cu[-1] = total), so sequence b is rows cu[b] .. cu[b+1] - 1; a sequence may be empty
    max_seqlen_q, max_seqlen_k: ints, at least the longest sequence (FlashAttention sizes its grid
        with them; here they are checked and used for the window normalisation)

Sequence b attends to itself only, with the dense semantics of gptfast.ops.attention on its own
lengths (Tq_b, Tk_b): the causal mask and windows aligned to its bottom-right corner, softcap,
ALiBi (slopes (H,) or (batch, H): row b for sequence b), dropout with sequence b's mask drawn as
batch entry b of gptfast.ops._philox's layout (rows and columns counted within the sequence),
GQA. Window sides are normalised with max_seqlen_k, as FlashAttention does. A query row that sees
no key returns 0 with lse -inf.

Returns out (total_q, H, D) and the logsumexp (H, total_q) fp32, FlashAttention's varlen layout.
Work is proportional to sum_b Tq_b * Tk_b: nothing is padded to the longest sequence.

Backends: the ``varlen`` feature of _backend.ATTENTION_FEATURES; the reference here (a loop over
the sequences of the dense reference, explicit backward).
"""
from __future__ import annotations

import math

import torch

from . import _backend
from .attention import (MAX_HEADDIM, Options, _backward_reference, _check_options, _forward_reference,
                        _keep_mask, _kernel_layout, _lse_dtype, _rng_state, _window_tuple, normalise)
from ._common import (autocast_dtype, autocast_off, autograd_function, cast_floats, check_same, check_tensor,
                      run_plain, run_op)

__all__ = ["attention_varlen", "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func",
           "flash_attn_varlen_kvpacked_func", "unpad_input", "pad_input"]


# --------------------------------------------------------------------------- padding helpers

def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask: torch.Tensor | None = None):
    """Pack the tokens an ``attention_mask`` keeps (FlashAttention's ``bert_padding.unpad_input``).

    Args:
        hidden_states: (batch, seqlen, ...).
        attention_mask: (batch, seqlen) bool or 0/1 integers, 1 = a real token. Any positions may
            be kept (left or right padding, holes): each row's kept tokens, in order, form its sequence.
        unused_mask: optional (batch, seqlen) tokens to pack as well but not count in
            ``seqused`` (FlashAttention's argument); None for none.

    Returns:
        (packed (total, ...), indices (total,) int64 into the flattened (batch * seqlen) axis,
        cu_seqlens (batch + 1,) int32, max_seqlen int, seqused (batch,) int32 -- the kept tokens
        per row, excluding ``unused_mask``'s).
    """
    fn = "unpad_input"
    check_tensor(fn, "hidden_states", hidden_states)
    if hidden_states.dim() < 2:
        raise ValueError(f"gptfast.{fn}: hidden_states must be (batch, seqlen, ...), got {tuple(hidden_states.shape)}")
    b, t = hidden_states.shape[:2]
    _check_mask(fn, "attention_mask", attention_mask, b, t, hidden_states.device)
    used = attention_mask.bool()
    keep = used if unused_mask is None else used | _check_mask(fn, "unused_mask", unused_mask, b, t,
                                                               hidden_states.device).bool()
    seqlens = keep.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    cu_seqlens = torch.zeros(b + 1, dtype=torch.int32, device=hidden_states.device)
    cu_seqlens[1:] = torch.cumsum(seqlens, dim=0)
    max_seqlen = int(seqlens.max()) if b else 0
    packed = hidden_states.reshape(b * t, *hidden_states.shape[2:])[indices]
    return packed, indices, cu_seqlens, max_seqlen, used.sum(dim=-1, dtype=torch.int32)


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """The inverse of :func:`unpad_input`: (total, ...) packed rows back to (batch, seqlen, ...),
    zeros where nothing was kept (FlashAttention's ``bert_padding.pad_input``). Differentiable."""
    fn = "pad_input"
    check_tensor(fn, "hidden_states", hidden_states)
    if indices.dim() != 1 or indices.shape[0] != hidden_states.shape[0] or indices.dtype.is_floating_point:
        raise ValueError(f"gptfast.{fn}: indices must be a 1-D integer tensor with one entry per row of "
                         f"hidden_states ({hidden_states.shape[0]}), got {indices.dtype} {tuple(indices.shape)}")
    out = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
    out = out.index_put((indices.to(torch.int64),), hidden_states)
    return out.view(batch, seqlen, *hidden_states.shape[1:])


def _check_mask(fn, name, mask, b, t, device):
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (b, t) or mask.dtype.is_floating_point:
        raise ValueError(f"gptfast.{fn}: {name} must be a (batch, seqlen) = ({b}, {t}) bool or 0/1 integer "
                         f"tensor, got {getattr(mask, 'dtype', type(mask).__name__)} "
                         f"{tuple(getattr(mask, 'shape', ()))}")
    if mask.device != device:
        raise ValueError(f"gptfast.{fn}: {name} is on {mask.device} but hidden_states is on {device}")
    return mask


# --------------------------------------------------------------------------- reference launchers

def _bounds(cu_seqlens: torch.Tensor) -> list[int]:
    return [int(x) for x in cu_seqlens.tolist()]


def _sequences(q, k, cu_seqlens_q, cu_seqlens_k):
    """(b, q rows slice, k rows slice) for every sequence."""
    cq, ck = _bounds(cu_seqlens_q), _bounds(cu_seqlens_k)
    return [(b, slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])) for b in range(len(cq) - 1)]


def _slopes_of(alibi_slopes, b):
    return alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b:b + 1]


def attention_varlen_forward_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                                       causal: bool, softmax_scale: float, *, window=(-1, -1), softcap=0.0,
                                       alibi_slopes=None, dropout_p=0.0, rng_state=None):
    """Reference varlen launcher: out (total_q, H, D) in q.dtype, lse (H, total_q) fp32 (fp64 for
    fp64 inputs); the options normalised as for the dense launchers."""
    del max_seqlen_q, max_seqlen_k  # sizes of a kernel grid; the loop below needs none
    opts = Options(causal, window, softcap, dropout_p)
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=_lse_dtype(q.dtype), device=q.device)
    for b, rq, rk in _sequences(q, k, cu_seqlens_q, cu_seqlens_k):
        if rq.stop == rq.start or rk.stop == rk.start:
            continue  # no queries, or no keys: zeros and -inf
        qb, kb, vb = q[rq].unsqueeze(0), k[rk].unsqueeze(0), v[rk].unsqueeze(0)
        keep = _keep_mask(rng_state, qb, kb, dropout_p, batch_start=b)
        ob, lb = _forward_reference(qb, kb, vb, opts, softmax_scale, _slopes_of(alibi_slopes, b), keep)
        out[rq] = ob[0]
        lse[:, rq] = lb[0]
    return out, lse


def attention_varlen_backward_reference(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                                        max_seqlen_k: int, causal: bool, softmax_scale: float,
                                        deterministic: bool = False, *, window=(-1, -1), softcap=0.0,
                                        alibi_slopes=None, dropout_p=0.0, rng_state=None):
    """Reference varlen backward: dq, dk, dv with q, k, v's shapes and dtypes. Deterministic."""
    del max_seqlen_q, max_seqlen_k, deterministic
    opts = Options(causal, window, softcap, dropout_p)
    dq, dk, dv = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    for b, rq, rk in _sequences(q, k, cu_seqlens_q, cu_seqlens_k):
        if rq.stop == rq.start or rk.stop == rk.start:
            continue
        qb, kb, vb = q[rq].unsqueeze(0), k[rk].unsqueeze(0), v[rk].unsqueeze(0)
        keep = _keep_mask(rng_state, qb, kb, dropout_p, batch_start=b)
        grads = _backward_reference(dout[rq].unsqueeze(0), qb, kb, vb, out[rq].unsqueeze(0),
                                    lse[:, rq].unsqueeze(0), opts, softmax_scale, _slopes_of(alibi_slopes, b), keep)
        for full, g, rows in zip((dq, dk, dv), grads, (rq, rk, rk)):
            full[rows] = g[0]
    return dq, dk, dv


# --------------------------------------------------------------------------- custom ops

def _launch(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left, window_right, softcap,
            alibi_slopes, dropout_p, rng_state, backend):
    opts = Options(window_left < 0 and window_right == 0, (window_left, window_right), softcap, dropout_p)
    features = {"varlen"}
    if k.shape[1] != q.shape[1]:
        features.add("gqa")
    if not opts.plain_window:
        features.add("window_size")
    for name, on in (("softcap", softcap > 0), ("alibi_slopes", alibi_slopes is not None),
                     ("dropout_p", dropout_p > 0)):
        if on:
            features.add(name)
    launchers = _backend.resolve("attention", q.device, q.dtype, backend or None, frozenset(features))
    kwargs = dict(window=(window_left, window_right), softcap=softcap, alibi_slopes=alibi_slopes,
                  dropout_p=dropout_p, rng_state=rng_state)
    return launchers, (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k), kwargs


def _attention_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                          softmax_scale: float, window_left: int, window_right: int, softcap: float,
                          alibi_slopes: torch.Tensor | None, dropout_p: float, rng_state: torch.Tensor | None,
                          deterministic: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """out (total_q, H, D) contiguous, lse (H, total_q) fp32."""
    launchers, lengths, kwargs = _launch(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         window_left, window_right, softcap, alibi_slopes, dropout_p, rng_state,
                                         backend)
    with autocast_off(q.device.type):
        return launchers.fwd(q, k, v, causal, softmax_scale, varlen=lengths, **kwargs)


attention_varlen_fwd_op = torch.library.custom_op("gptfast::attention_varlen_fwd", _attention_varlen_fwd,
                                                  mutates_args=())


@attention_varlen_fwd_op.register_fake
def _attention_varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                               softmax_scale, window_left, window_right, softcap, alibi_slopes, dropout_p,
                               rng_state, deterministic, backend):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q.dtype)))


def _attention_varlen_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                          softmax_scale: float, window_left: int, window_right: int, softcap: float,
                          alibi_slopes: torch.Tensor | None, dropout_p: float, rng_state: torch.Tensor | None,
                          deterministic: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (contiguous, shapes and dtypes of q, k, v)."""
    launchers, lengths, kwargs = _launch(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         window_left, window_right, softcap, alibi_slopes, dropout_p, rng_state,
                                         backend)
    with autocast_off(q.device.type):
        return launchers.bwd(dout, q, k, v, out, lse, causal, softmax_scale, deterministic, varlen=lengths,
                             **kwargs)


attention_varlen_bwd_op = torch.library.custom_op("gptfast::attention_varlen_bwd", _attention_varlen_bwd,
                                                  mutates_args=())


@attention_varlen_bwd_op.register_fake
def _attention_varlen_bwd_fake(dout, q, k, v, out, lse, *args):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


_VARLEN_OPTION_INPUTS = 14  # inputs after q, k, v: cu_seqlens_q ... backend


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.mark_non_differentiable(lse)
    ctx.options = options


def _varlen_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = run_plain(attention_varlen_bwd_op, _attention_varlen_bwd, _kernel_layout(dout), q, k, v, out, lse,
                           cu_q, cu_k, *ctx.options)
    return (dq, dk, dv) + (None,) * _VARLEN_OPTION_INPUTS


attention_varlen_fwd_op.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)
_VarlenFunction = autograd_function("_VarlenFunction", _attention_varlen_fwd, _varlen_setup_context, _varlen_backward)


# --------------------------------------------------------------------------- public functions

def _check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> int:
    """Shapes, dtypes and devices (no values are read: no host synchronisation); returns batch."""
    op = "attention_varlen"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t, ndim=3)
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"gptfast.{op}: {name} is on {t.device} but q is on {q.device}")
    total_q, h, d = q.shape
    if not 1 <= d <= MAX_HEADDIM:
        raise ValueError(f"gptfast.{op}: head dim (q.shape[2]) must be in 1..{MAX_HEADDIM}, got {d}")
    hk = k.shape[1]
    if k.shape[2] != d or hk < 1 or h % hk:
        raise ValueError(f"gptfast.{op}: k must have shape (total_k, nheads_k, headdim) with headdim {d} and "
                         f"nheads ({h}) a multiple of nheads_k, to match q {tuple(q.shape)}; got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"gptfast.{op}: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    batch = None
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"gptfast.{op}: {name} must be a 1-D int32 tensor (batch + 1,) of prefix sums, got "
                             f"{getattr(cu, 'dtype', type(cu).__name__)} {tuple(getattr(cu, 'shape', ()))}")
        if cu.device != q.device:
            raise ValueError(f"gptfast.{op}: {name} is on {cu.device} but q is on {q.device}")
        if batch is not None and cu.numel() - 1 != batch:
            raise ValueError(f"gptfast.{op}: cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), "
                             f"got {batch + 1} and {cu.numel()}")
        batch = cu.numel() - 1
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"gptfast.{op}: {name} must be an int >= 0, got {m!r}")
    return batch


def _check_lengths(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> None:
    """The values of cu_seqlens against the tensors (reads them: a host synchronisation on a GPU;
    run in eager mode only)."""
    op = "attention_varlen"
    for name, cu, total, m in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                               ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
        c = cu.tolist()
        lengths = [b - a for a, b in zip(c, c[1:])]
        if c[0] != 0 or any(n < 0 for n in lengths) or c[-1] != total:
            raise ValueError(f"gptfast.{op}: {name} must start at 0, never decrease and end at the number of "
                             f"rows ({total}), got {c if len(c) <= 12 else c[:6] + ['...'] + c[-6:]}")
        if lengths and max(lengths) > m:
            raise ValueError(f"gptfast.{op}: max_seqlen_{name[-1]} = {m} is shorter than the longest sequence "
                             f"({max(lengths)})")


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                     softmax_scale: float | None = None, backend: str | None = None, *,
                     window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                     alibi_slopes: torch.Tensor | None = None, dropout_p: float = 0.0,
                     deterministic: bool = False, return_lse: bool = False):
    """Attention over packed variable-length sequences (see the module docstring).

    Args:
        q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim), nheads % nheads_k == 0.
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) prefix sums of the sequence lengths.
        max_seqlen_q, max_seqlen_k: ints >= the longest query / key sequence.
        causal, softmax_scale, backend and the keyword options: as :func:`gptfast.attention`, per
            sequence (alibi_slopes (nheads,) or (batch, nheads)).
        return_lse: also return the logsumexp (nheads, total_q) float32.

    Returns:
        out (total_q, nheads, headdim) in q's dtype (the autocast dtype under autocast), or
        (out, lse) with ``return_lse``.
    """
    batch = _check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    h = q.shape[1]
    _check_options("attention_varlen", causal, softmax_scale, window_size, softcap, dropout_p, alibi_slopes,
                   [(h,), (batch, h)], q.device)
    if not torch.compiler.is_compiling():
        _check_lengths(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    amp = autocast_dtype(q.device.type)
    if amp is not None:
        q, k, v = cast_floats(amp, q, k, v)
    check_same("attention_varlen", "q", q, k=k, v=v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    opts = normalise(causal, window_size, softcap, dropout_p, max_seqlen_k)
    q, k, v = (_packed_layout(t) for t in (q, k, v))
    slopes = None if alibi_slopes is None else alibi_slopes.contiguous()
    out, lse = run_op(attention_varlen_fwd_op, _VarlenFunction, _attention_varlen_fwd, q, k, v, cu_seqlens_q,
                      cu_seqlens_k, max_seqlen_q, max_seqlen_k, opts.causal, scale, opts.window[0], opts.window[1],
                      opts.softcap, slopes, opts.dropout_p, _rng_state(q.device, opts.dropout_p), bool(deterministic),
                      _backend.checked_name(backend))
    return (out, lse) if return_lse else out


def _packed_layout(t: torch.Tensor) -> torch.Tensor:
    """(total, H, D) with stride(-1) == 1 and disjoint token rows (the dense rule on a batch of 1)."""
    return _kernel_layout(t.unsqueeze(0))[0]


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Drop-in for ``flash_attn.flash_attn_varlen_func`` (FlashAttention 2.8): same arguments,
    order, defaults (``causal=False``) and returns; q (total_q, nheads, headdim), k/v (total_k,
    nheads_k, headdim). Runs :func:`attention_varlen`.

    Returns out, or with ``return_attn_probs`` (out, softmax_lse (nheads, total_q) fp32, S_dmask
    (batch, nheads, max_seqlen_q, max_seqlen_k): each sequence's probabilities in its top-left
    corner, dropped entries negated, zeros elsewhere; computed by the reference, small shapes only).
    With ``block_table`` (batch, max_blocks) int32, k and v are a paged KV cache (num_blocks,
    page_block_size, nheads_k, headdim) and sequence b's keys are its first
    cu_seqlens_k[b+1] - cu_seqlens_k[b] positions, position t in page block_table[b, t //
    page_block_size]: the pages are gathered into a packed copy (O(total_k) copying; FlashAttention
    reads them in place) and attended as above; gradients flow back into the pages.
    """
    if block_table is not None:
        k, v = (_gather_pages(t, block_table, cu_seqlens_k, name) for t, name in ((k, "k"), (v, "v")))
    window_size = _window_tuple(window_size)
    kw = dict(causal=causal, softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
              alibi_slopes=alibi_slopes, dropout_p=dropout_p, deterministic=deterministic)
    if not return_attn_probs:
        return attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kw)
    from .attention import _dropped_probabilities, _rng_snapshot
    state = _rng_snapshot(q.device)
    out, lse = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                return_lse=True, **kw)
    batch = cu_seqlens_q.numel() - 1
    probs = q.new_zeros((batch, q.shape[1], max_seqlen_q, max_seqlen_k), dtype=torch.float32)
    for b, rq, rk in _sequences(q, k, cu_seqlens_q, cu_seqlens_k):
        if rq.stop > rq.start and rk.stop > rk.start:
            probs[b, :, :rq.stop - rq.start, :rk.stop - rk.start] = _dropped_probabilities(
                q[rq].unsqueeze(0), k[rk].unsqueeze(0), state, dropout_p, softmax_scale, causal,
                window_size, softcap, _slopes_of(alibi_slopes, b), batch_start=b, seqlen_k_norm=max_seqlen_k)[0]
    return out, lse, probs


def _gather_pages(cache: torch.Tensor, block_table: torch.Tensor, cu_seqlens_k: torch.Tensor, name: str):
    """(total_k, nheads_k, headdim): each sequence's first Tk_b positions read from its pages."""
    fn = "flash_attn_varlen_func"
    if cache.dim() != 4:
        raise ValueError(f"gptfast.{fn}: with block_table, {name} must be a paged cache (num_blocks, "
                         f"page_block_size, nheads_k, headdim), got shape {tuple(cache.shape)}")
    batch = cu_seqlens_k.numel() - 1
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.dtype != torch.int32:
        raise ValueError(f"gptfast.{fn}: block_table must be int32 (batch={batch}, max_blocks), got "
                         f"{block_table.dtype} {tuple(block_table.shape)}")
    page = cache.shape[1]
    cu = cu_seqlens_k.to(device=cache.device, dtype=torch.int64)
    lens = cu[1:] - cu[:-1]
    if batch and int(lens.max()) > block_table.shape[1] * page:
        raise ValueError(f"gptfast.{fn}: a sequence of {int(lens.max())} keys needs more than block_table's "
                         f"{block_table.shape[1]} blocks of {page}")
    seq = torch.repeat_interleave(torch.arange(batch, device=cache.device), lens)
    pos = torch.arange(seq.numel(), device=cache.device) - cu[:-1][seq]
    blocks = block_table.to(cache.device).long()[seq, pos // page]
    return cache[blocks, pos % page]


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """Drop-in for ``flash_attn.flash_attn_varlen_qkvpacked_func``: qkv (total, 3, nheads, headdim)."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"gptfast.flash_attn_varlen_qkvpacked_func: qkv must have shape (total, 3, nheads, "
                         f"headdim), got {tuple(getattr(qkv, 'shape', ()))}")
    q, k, v = qkv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Drop-in for ``flash_attn.flash_attn_varlen_kvpacked_func``: q (total_q, nheads, headdim),
    kv (total_k, 2, nheads_k, headdim)."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 4 or kv.shape[1] != 2:
        raise ValueError(f"gptfast.flash_attn_varlen_kvpacked_func: kv must have shape (total_k, 2, nheads_k, "
                         f"headdim), got {tuple(getattr(kv, 'shape', ()))}")
    k, v = kv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)
