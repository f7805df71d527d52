"""CUDA C++ kernels (csrc/cuda, backend="cuda") on a real NVIDIA GPU.

The same grid and rules as the Triton GPU tests (tests/gpu/test_triton_gpu.py): float64 ground
truth, fp16/bf16 within 2x (outputs) and 3x (gradients) PyTorch's own same-dtype error, fp32
within tight absolute tolerances; plus bf16 everywhere, a bitwise-determinism test of the
deterministic attention backward, agreement of the atomic and deterministic dQ paths, and
large-batch race tests. Skipped without a GPU: on a CPU machine the cuda backend is only
compiled (CI) and its argument checks tested (tests/test_cuda_backend.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (none visible)"),
]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the CPU test modules' helpers
from test_triton_attention import check_attention  # noqa: E402
from test_triton_gelu_ffn import check_gelu_ffn  # noqa: E402
from test_triton_layer_norm import check_layer_norm  # noqa: E402

import gptfast  # noqa: E402

LOW = [torch.float16, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def _cuda_backend_built():
    from gptfast import _build

    reason = _build.unavailable_reason("cuda")
    if reason is not None:
        pytest.fail(f"the cuda backend did not build on this GPU machine: {reason}")


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("T", [1, 3, 97, 130, 257, 1024])
def test_attention_seqlens(T, causal, dtype):
    torch.manual_seed(T)
    check_attention(2, T, 3, 64, causal, dtype, backend="cuda")


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("D", [16, 32, 40, 64, 80, 111, 128, 160, 256])
def test_attention_head_dims(D, dtype):
    # 64, 128, 256 are native; the rest run zero-padded in the next instantiation (111: also
    # padded to 112 on the host for 16-byte loads).
    torch.manual_seed(D)
    check_attention(2, 257, 3, D, True, dtype, layout="bhtd", backend="cuda")
    check_attention(1, 130, 2, D, False, dtype, backend="cuda")


def test_attention_rejects_fp32():
    from gptfast.ops import _cuda

    q = torch.randn(1, 8, 1, 64, device="cuda")
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        _cuda.attention_forward(q, q, q, True, 0.125)
    with pytest.raises(TypeError, match="supports dtypes"):
        gptfast.attention(q, q, q, backend="cuda")


def test_attention_large_logits_bf16():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 512, 4, 64, device="cuda", dtype=torch.bfloat16) * 100 for _ in range(3))
    for t in (q, k, v):
        t.requires_grad_()
    out = gptfast.attention(q, k, v, causal=True, backend="cuda")
    out.backward(torch.randn_like(out))
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()


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


def test_attention_deterministic_backward_20_runs():
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 1024, 8, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    g = torch.randn_like(q)
    first = _grads(q, k, v, g, True)
    for _ in range(19):
        for a, b in zip(first, _grads(q, k, v, g, True)):
            assert torch.equal(a, b), "deterministic backward is not bitwise reproducible"


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


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_attention_race_large_batch(deterministic):
    # many CTAs at once: any cross-CTA race (dQ accumulation, shared outputs) shows here
    torch.manual_seed(1)
    B, T, H, D = 64, 256, 16, 64
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    out = gptfast.attention(q, k, v, causal=True, backend="cuda", deterministic=deterministic)
    g = torch.randn_like(out)
    out.backward(g)
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = gptfast.testing.sdpa_bthd(qr, kr, vr, causal=True)
    ref.backward(g.float())
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=0)
    for a, b in zip((q, k, v), (qr, kr, vr)):
        torch.testing.assert_close(a.grad.float(), b.grad, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", LOW + [torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("N", [1, 123, 768, 1000, 4096, 65536])
def test_layer_norm_sizes(N, dtype):
    check_layer_norm(4 if N == 65536 else 257, N, dtype, backend="cuda")


def test_layer_norm_no_affine():
    check_layer_norm(97, 1000, torch.bfloat16, has_weight=False, has_bias=False, backend="cuda")
    check_layer_norm(97, 768, torch.float16, has_weight=True, has_bias=False, backend="cuda")


def test_layer_norm_race_many_rows():
    check_layer_norm(20000, 768, torch.bfloat16, backend="cuda")


@pytest.mark.parametrize("dtype", LOW + [torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_ffn_sizes(approximate, dtype):
    check_gelu_ffn(4, 250, 768, 3072, 768, dtype, approximate, backend="cuda")
    # odd sizes: leading dimensions that are not multiples of 8 (cuBLASLt epilogue fallbacks)
    check_gelu_ffn(3, 37, 100, 333, 77, dtype, approximate, has_bias=False, weights="contiguous",
                   backend="cuda")


def test_gelu_ffn_race_many_rows():
    check_gelu_ffn(64, 512, 256, 1024, 256, torch.bfloat16, "tanh", backend="cuda")


def test_auto_prefers_cuda_on_gpu():
    from gptfast.ops import _backend

    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    assert _backend.resolve("layer_norm", x.device, x.dtype).backend == "cuda"
    assert _backend.resolve("attention", x.device, torch.float16).backend == "cuda"
    assert _backend.resolve("attention", x.device, torch.float32).backend == "triton"
