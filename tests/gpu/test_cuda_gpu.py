"""cuda-only GPU tests (csrc/cuda, backend="cuda"); the grid shared with the triton backend --
seqlens, head dims incl. padded ones, bf16, large logits, 20-run determinism, races, LayerNorm and
GELU-FFN sizes -- is in test_kernels_gpu.py. Here: the build itself, float32 refusal, NaN
propagation, agreement of the atomic and deterministic dQ paths, torch's deterministic flag, and
auto's choice. Skipped without a GPU: on a CPU machine the cuda backend is compiled (CI), its
argument checks tested (tests/test_cuda_backend.py) and its kernels emulated
(tests/test_cuda_emulated.py).
"""
from __future__ import annotations

import pytest
import torch

import gptfast

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (none visible)"),
]


def test_cuda_backend_builds_here():
    from gptfast import _build

    assert _build.unavailable_reason("cuda") is None


def test_attention_rejects_fp32():
    from gptfast.ops import _cuda

    q = torch.randn(1, 8, 1, 64, device="cuda")
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        _cuda.attention_forward(q, q, q, True, 0.125)
    with pytest.raises(TypeError, match="supports dtypes"):
        gptfast.attention(q, q, q, backend="cuda")


def test_attention_nan_propagates():
    q, k, v = (torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    q[0, 5, 1, 3] = float("nan")
    out = gptfast.attention(q, k, v, causal=True, backend="cuda")
    assert torch.isnan(out[0, 5, 1]).all()
    assert not torch.isnan(out[0, :, 0]).any()


def _grads(q, k, v, g, deterministic):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    gptfast.attention(*leaves, causal=True, backend="cuda", deterministic=deterministic).backward(g)
    return [t.grad for t in leaves]


def test_attention_atomic_and_deterministic_dq_agree():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 700, 4, 128, device="cuda", dtype=torch.float16) for _ in range(3))
    g = torch.randn_like(q)
    atomic, fixed = _grads(q, k, v, g, False), _grads(q, k, v, g, True)
    # dK and dV do not depend on the mode; dQ differs only by fp32 summation order.
    assert torch.equal(atomic[1], fixed[1]) and torch.equal(atomic[2], fixed[2])
    torch.testing.assert_close(atomic[0], fixed[0], atol=2e-3, rtol=1e-3)


def test_attention_use_deterministic_algorithms():
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 300, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    g = torch.randn_like(q)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a, b = _grads(q, k, v, g, False), _grads(q, k, v, g, False)
    finally:
        torch.use_deterministic_algorithms(before)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_auto_prefers_cuda_on_gpu():
    from gptfast.ops import _backend

    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    assert _backend.resolve("layer_norm", x.device, x.dtype).backend == "cuda"
    assert _backend.resolve("attention", x.device, torch.float16).backend == "cuda"
    assert _backend.resolve("attention", x.device, torch.float32).backend == "triton"
