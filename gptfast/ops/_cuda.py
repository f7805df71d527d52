"""Launchers of the ``cuda`` backend: the CUDA C++ kernels in ``csrc/cuda/``.

The CUDA extension is built on first use by :mod:`gptfast._build` (about a minute of nvcc;
``gptfast build --cuda`` does it ahead of time); importing this module builds it. The launchers
themselves are :class:`gptfast.ops._native.NativeLaunchers`. C++ checks refuse CPU tensors,
float64, and float32 attention with the argument's name.

Attention runs on tensor cores in float16/bfloat16 only; LayerNorm, the GELU-FFN and the gated FFN
(SwiGLU / GeGLU: cuBLASLt GEMMs around csrc/cuda/gated_ffn.cu's kernels) also take float32. The attention backward adds dQ with fp32 atomics unless ``deterministic=True`` or
``torch.use_deterministic_algorithms(True)`` is in effect, which select a second dQ kernel that
sums in a fixed order (bitwise reproducible, one more pass over K and V). Attention takes packed
variable-length batches (``varlen``) as the cpu backend does; the prefix sums stay on the GPU (the
kernels read them, no host synchronisation) and max_seqlen_q/k are not needed: the grid covers
total / 64 + batch blocks of 64 rows (csrc/cuda/attention.h ``varlen_blocks``).
"""
from __future__ import annotations

from ._native import bind

bind("cuda", globals())
