"""Packed variable-length attention (gptfast.attention_varlen) on a real NVIDIA GPU: the GPU
kernel backends that declare the ``varlen`` layout, at sizes the CPU tests cannot reach (sequences
of 0, 1 and up to ~1.5k tokens in one batch, head dims 64/128), fp16 and bf16.

Rule (FlashAttention's): the float64 reference ``ref``, the reference backend in the tested dtype
``pt``; outputs within 2x and gradients within 3x PyTorch's own error. Skipped without a GPU; run
by bench/gpu_suite.sh.
"""
from __future__ import annotations

import pytest
import torch

import gptfast
from gptfast.ops import _backend
from gptfast.testing import assert_within_pytorch_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (none visible)"),
]

# (lens_q, lens_k, H, Hk, D, causal, window, softcap, dropout)
CASES = [
    ([0, 1, 517, 1024, 64], [0, 1, 517, 1024, 64], 8, 8, 64, True, (-1, -1), 0.0, 0.0),
    ([1, 1, 1, 1], [1500, 33, 700, 2], 16, 4, 128, True, (-1, -1), 0.0, 0.0),      # decoding-like
    ([300, 9, 1200], [128, 900, 1200], 8, 1, 64, False, (256, 256), 30.0, 0.0),   # MQA, window, softcap
    ([777, 129], [777, 129], 12, 4, 128, True, (128, 0), 0.0, 0.17),
]
BACKENDS = ["triton", "cuda"]


def _has_varlen(backend: str) -> bool:
    impl = _backend._REGISTRY.get(("attention", backend))
    return impl is not None and "varlen" in impl.features and impl.unavailable_reason(torch.device("cuda")) is None


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")


def _run(backend, q, k, v, cq, ck, mq, mk, dout, seed, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(seed)  # one dropout key for every backend
    out = gptfast.attention_varlen(*leaves, cq, ck, mq, mk, backend=backend, **kw)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, dout.to(out.dtype)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_against_the_float64_reference(backend, case, dtype):
    if not _has_varlen(backend):
        pytest.skip(f"{backend} has no varlen attention on this machine")
    lens_q, lens_k, h, hk, d, causal, window, softcap, p = CASES[case]
    g = torch.Generator(device="cuda").manual_seed(case)
    q = torch.randn(sum(lens_q), h, d, device="cuda", generator=g, dtype=torch.float64)
    k = torch.randn(sum(lens_k), hk, d, device="cuda", generator=g, dtype=torch.float64)
    v = torch.randn(sum(lens_k), hk, d, device="cuda", generator=g, dtype=torch.float64)
    dout = torch.randn(q.shape, device="cuda", generator=g, dtype=torch.float64)
    cq, ck = _cu(lens_q), _cu(lens_k)
    kw = dict(causal=causal, window_size=window, softcap=softcap, dropout_p=p)
    args = (cq, ck, max(lens_q), max(lens_k), dout, case)
    ref = _run("reference", q, k, v, *args, **kw)
    low = [t.to(dtype) for t in (q, k, v)]
    pt = _run("reference", *low, *args, **kw)
    got = _run(backend, *low, *args, **kw)
    for name, o, r, t, factor in zip(("out", "dq", "dk", "dv"), got, ref, pt, (2, 3, 3, 3)):
        assert o.dtype == dtype
        assert_within_pytorch_error(o, r, t, factor=factor, atol=1e-3, name=f"{backend} {name}")
