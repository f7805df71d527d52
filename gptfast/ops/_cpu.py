"""Launchers of the ``cpu`` backend: the native C++ kernels in ``csrc/cpu/`` (OpenMP, vectorised).

The extension is built on first use by :mod:`gptfast._build`; importing this module builds it.
The launchers themselves are :class:`gptfast.ops._native.NativeLaunchers`; the attention backward
is always deterministic here (one task per (batch, head), or per (batch, kv head) under GQA, which
sums its query heads' dK/dV in order; no atomics). Its attention implements every option of
``_backend.ATTENTION_FEATURES`` (GQA, unequal lengths, windows, softcap, ALiBi, dropout) and packed
variable-length batches (``varlen``). ``kvcache_forward`` is split-K decoding over a KV cache
read in place (csrc/cpu/kvcache.cpp).
"""
from __future__ import annotations

from ._native import bind

bind("cpu", globals())
