"""Launchers of the native backends, written once for both builds of ``csrc/``: ``cpu`` (kernels in
``csrc/cpu/``) and ``cuda`` (``csrc/cuda/``). ``gptfast.ops._cpu`` and ``gptfast.ops._cuda`` each
:func:`bind` one :class:`NativeLaunchers` into their namespace; creating it builds (or loads from
the cache) that backend's extension through :mod:`gptfast._build`.

Same signatures and return values as the reference launchers (the contract in
``gptfast/ops/_backend.py``). Argument checks run again in C++ (``csrc/<op>.cpp``), so the
extensions are also safe to call directly.
"""
from __future__ import annotations

import torch

from .. import _build
from .linear_cross_entropy import chunked_linear_cross_entropy

LAUNCHERS = ("attention_forward", "attention_backward", "layer_norm_forward", "layer_norm_backward",
             "gelu_ffn_forward", "gelu_ffn_backward", "kvcache_forward", "rms_norm_forward",
             "rms_norm_backward", "linear_cross_entropy_forward", "linear_cross_entropy_backward",
             "gated_ffn_forward", "gated_ffn_backward")


class NativeLaunchers:
    """The launchers of one native backend, bound to its extension module (``.ext``)."""

    def __init__(self, backend: str):
        self.backend = backend
        self.ext = _build.load(backend)

    def attention_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                          softmax_scale: float, *, window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                          alibi_slopes: torch.Tensor | None = None, dropout_p: float = 0.0,
                          rng_state: torch.Tensor | None = None, varlen: tuple | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """out (B, Tq, H, D) in q.dtype, lse (B, H, Tq) fp32 (fp64 for fp64 inputs on cpu); with
        ``varlen`` (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k): packed q, k, v,
        out (total_q, H, D), lse (H, total_q).

        The keyword options as the contract gives them; the extension raises NotImplementedError
        naming any option its kernels lack."""
        cu_q, cu_k = (None, None) if varlen is None else varlen[:2]
        return self.ext.attention_forward(q, k, v, bool(causal), float(softmax_scale), int(window[0]),
                                          int(window[1]), float(softcap), alibi_slopes, float(dropout_p),
                                          rng_state, cu_q, cu_k)

    def attention_backward(self, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, lse: torch.Tensor, causal: bool, softmax_scale: float,
                           deterministic: bool = False, *, window: tuple[int, int] = (-1, -1),
                           softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                           dropout_p: float = 0.0, rng_state: torch.Tensor | None = None,
                           varlen: tuple | None = None) -> tuple[torch.Tensor, ...]:
        """dq, dk, dv (dk, dv summed over each kv head's query heads). Deterministic (no atomics)
        when asked for here or through ``torch.use_deterministic_algorithms(True)``; the cpu
        kernels always are."""
        deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
        return self.ext.attention_backward(dout, q, k, v, out, lse, bool(causal), float(softmax_scale),
                                           deterministic, int(window[0]), int(window[1]), float(softcap),
                                           alibi_slopes, float(dropout_p), rng_state,
                                           *((None, None) if varlen is None else varlen[:2]))

    def layer_norm_forward(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                           eps: float, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """y (..., N) in x.dtype, mean (M,), rstd (M,) in fp32 (fp64 for fp64 inputs on cpu), M the
        rows of x (..., N); with ``residual`` (x's shape): those of s = x + residual (rounded to
        x.dtype), and s fourth. The extension flattens and restores the leading dimensions."""
        return self.ext.layer_norm_forward(x, weight, bias, float(eps), residual)

    def layer_norm_backward(self, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                            mean: torch.Tensor, rstd: torch.Tensor, has_bias: bool,
                            dresidual: torch.Tensor | None = None):
        """dx (x's shape), dweight (N,) or None, dbias (N,) or None; with ``dresidual`` (the gradient of
        the forward's s, which is then ``x``), dx + dresidual rounded once."""
        return self.ext.layer_norm_backward(dy, x, weight, mean, rstd, bool(has_bias), dresidual)

    def _rms_norm(self, name: str):
        if not hasattr(self.ext, name):
            raise NotImplementedError(f"gptfast.rms_norm: the {self.backend!r} backend has no rms_norm kernel yet")
        return getattr(self.ext, name)

    def rms_norm_forward(self, x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float,
                         residual: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """y (..., N) in x.dtype, rstd (M,) in fp32 (fp64 for fp64 inputs), M the rows of x; with
        ``residual`` (x's shape): those of s = x + residual (rounded to x.dtype), and s third. The
        cuda build has no such kernel yet."""
        return self._rms_norm("rms_norm_forward")(x, weight, float(eps), float(offset), residual)

    def rms_norm_backward(self, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor,
                          offset: float, dresidual: torch.Tensor | None = None):
        """dx (x's shape), dweight (N,) or None; with ``dresidual``, dx + dresidual rounded once."""
        return self._rms_norm("rms_norm_backward")(dy, x, weight, rstd, float(offset), dresidual)

    def _cross_entropy_logits(self, z, targets, row_scale, ignore_index, label_smoothing, softcap):
        """The logits epilogue (gptfast.ops.linear_cross_entropy's contract) in this extension."""
        kernel = getattr(self.ext, "cross_entropy_logits_", None)
        if kernel is None:
            raise NotImplementedError(f"gptfast.linear_cross_entropy: the {self.backend!r} backend has no "
                                      "linear_cross_entropy kernel yet")
        return kernel(z, targets, row_scale, int(ignore_index), float(label_smoothing), float(softcap))

    def linear_cross_entropy_forward(self, x, weight, bias, targets, ignore_index: int, label_smoothing: float,
                                     softcap: float, row_scale, chunk_rows: int):
        """losses (M,) and, with row_scale, dx, dweight, dbias or None: the chunk driver (torch GEMMs)
        around this extension's logits epilogue."""
        return chunked_linear_cross_entropy(self._cross_entropy_logits, x, weight, bias, targets, ignore_index,
                                            label_smoothing, softcap, row_scale, chunk_rows)

    def linear_cross_entropy_backward(self, row_scale, x, weight, bias, targets, ignore_index: int,
                                      label_smoothing: float, softcap: float, chunk_rows: int):
        """dx, dweight, dbias or None of sum(row_scale * losses) (reduction "none")."""
        return chunked_linear_cross_entropy(self._cross_entropy_logits, x, weight, bias, targets, ignore_index,
                                            label_smoothing, softcap, row_scale, chunk_rows)[1:]

    def gelu_ffn_forward(self, x, w1, b1, w2, b2, approximate: str):
        """out (M, N), h (M, H) = x @ w1.T + b1, both in x.dtype."""
        return self.ext.gelu_ffn_forward(x, w1, b1, w2, b2, approximate)

    def _gated_ffn(self, name: str):
        if not hasattr(self.ext, name):
            raise NotImplementedError(f"gptfast.gated_ffn: the {self.backend!r} backend has no gated_ffn kernel yet")
        return getattr(self.ext, name)

    def gated_ffn_forward(self, x, w_gate, b_gate, w_up, b_up, w_down, b_down, activation: str):
        """out (M, N), g (M, H) = x @ w_gate.T + b_gate, u (M, H) = x @ w_up.T + b_up, all in x.dtype."""
        return self._gated_ffn("gated_ffn_forward")(x, w_gate, b_gate, w_up, b_up, w_down, b_down, activation)

    def gated_ffn_backward(self, dout, x, g, u, w_gate, w_up, w_down, has_b_gate: bool, has_b_up: bool,
                           has_b_down: bool, activation: str):
        """dx, dw_gate, db_gate or None, dw_up, db_up or None, dw_down, db_down or None."""
        return self._gated_ffn("gated_ffn_backward")(dout, x, g, u, w_gate, w_up, w_down, bool(has_b_gate),
                                                     bool(has_b_up), bool(has_b_down), activation)

    def kvcache_forward(self, q, k_cache, v_cache, block_table, cache_batch_idx, key_start, key_end,
                        softmax_scale: float, window_left: int, window_right: int, softcap: float, alibi_slopes,
                        num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """out (B, Tq, H, D), lse (B, H, Tq) fp32 (fp64 for fp64 inputs): split-K decoding over the
        cache in place (the kvcache contract in _backend.py). The cuda build has no such kernel."""
        if not hasattr(self.ext, "kvcache_forward"):
            raise NotImplementedError(f"gptfast.kvcache: the {self.backend!r} backend has no kvcache kernel")
        return self.ext.kvcache_forward(q, k_cache, v_cache, block_table, cache_batch_idx, key_start, key_end,
                                        float(softmax_scale), int(window_left), int(window_right), float(softcap),
                                        alibi_slopes, int(num_splits))

    def gelu_ffn_backward(self, dout, x, h, w1, w2, has_b1: bool, has_b2: bool, approximate: str):
        """dx, dw1, db1 or None, dw2, db2 or None."""
        return self.ext.gelu_ffn_backward(dout, x, h, w1, w2, bool(has_b1), bool(has_b2), approximate)


def bind(backend: str, namespace: dict) -> None:
    """Put ``backend``'s launchers into a module's namespace (``attention_forward``, ..., what the
    registry looks up by name), with its extension module as ``_ext``."""
    launchers = NativeLaunchers(backend)
    namespace.update({name: getattr(launchers, name) for name in LAUNCHERS})
    namespace.update(_ext=launchers.ext, __all__=list(LAUNCHERS))
