"""The GPU kernels of both backends (``triton``: kernels/, ``cuda``: csrc/cuda) on a real NVIDIA GPU,
on one grid: the CPU grid at larger sizes, bf16, determinism, races.

Skipped without a GPU (on the CPU, the Triton kernels run in Triton's interpreter and the CUDA
kernels in tests/cuda_emu's emulator, at small sizes). Run by bench/gpu_suite.sh. The checks are
the CPU test helpers with ``backend=``, whose tensors go to CUDA when a GPU is visible: float64
ground truth, fp16/bf16 within 2x (outputs) and 3x (gradients) PyTorch's own same-dtype error, fp32
within tight absolute tolerances (the helpers' modules need triton importable, as the GPU machine
has it). Backend-only tests: test_triton_gpu.py, test_cuda_gpu.py.
"""
from __future__ import annotations

import pytest
import torch

from test_triton_attention import check_attention
from test_triton_gelu_ffn import check_gelu_ffn
from test_triton_layer_norm import check_layer_norm

import gptfast

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (none visible)"),
]

BACKENDS = ["triton", "cuda"]
LOW = [torch.float16, torch.bfloat16]
# cuda: 64, 128, 256 are instantiated, the rest run zero-padded (111 also padded to 112 on the host).
HEAD_DIMS = [("triton", d) for d in (16, 40, 64, 111, 128, 256)] + \
            [("cuda", d) for d in (16, 32, 40, 64, 80, 111, 128, 160, 256)]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("T", [1, 3, 97, 130, 257, 1024])
def test_attention_seqlens(backend, T, causal, dtype):
    torch.manual_seed(T)
    check_attention(2, T, 3, 64, causal, dtype, backend=backend)


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend_name,D", HEAD_DIMS)
def test_attention_head_dims(backend_name, D, dtype):
    torch.manual_seed(D)
    check_attention(2, 257, 3, D, True, dtype, layout="bhtd", backend=backend_name)
    check_attention(1, 130, 2, D, False, dtype, backend=backend_name)


def test_attention_large_logits_bf16(backend):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 512, 4, 64, device="cuda", dtype=torch.bfloat16) * 100 for _ in range(3))
    for t in (q, k, v):
        t.requires_grad_()
    out = gptfast.attention(q, k, v, causal=True, backend=backend)
    out.backward(torch.randn_like(out))
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()


def _attention_grads(q, k, v, g, backend, deterministic):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    gptfast.attention(*leaves, causal=True, backend=backend, deterministic=deterministic).backward(g)
    return [t.grad for t in leaves]


def test_attention_deterministic_backward_20_runs(backend):
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 1024, 8, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    g = torch.randn_like(q)
    first = _attention_grads(q, k, v, g, backend, True)
    for _ in range(19):
        for a, b in zip(first, _attention_grads(q, k, v, g, backend, True)):
            assert torch.equal(a, b), "deterministic backward is not bitwise reproducible"


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
def test_attention_race_large_batch(backend, deterministic):
    # many programs / CTAs at once: any cross-program race (dQ accumulation, shared outputs,
    # partial buffers) shows here
    torch.manual_seed(1)
    B, T, H, D = 64, 256, 16, 64
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    out = gptfast.attention(q, k, v, causal=True, backend=backend, deterministic=deterministic)
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
def test_layer_norm_sizes(backend, N, dtype):
    check_layer_norm(4 if N == 65536 else 257, N, dtype, backend=backend)


def test_layer_norm_no_affine(backend):
    check_layer_norm(97, 1000, torch.bfloat16, has_weight=False, has_bias=False, backend=backend)
    check_layer_norm(97, 768, torch.float16, has_weight=True, has_bias=False, backend=backend)


def test_layer_norm_race_many_rows(backend):
    check_layer_norm(20000, 768, torch.bfloat16, backend=backend)


@pytest.mark.parametrize("dtype", LOW + [torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_ffn_sizes(backend, approximate, dtype):
    check_gelu_ffn(4, 250, 768, 3072, 768, dtype, approximate, backend=backend)
    # odd sizes: leading dimensions that are not multiples of 8 (cuBLASLt epilogue fallbacks)
    check_gelu_ffn(3, 37, 100, 333, 77, dtype, approximate, has_bias=False, weights="contiguous",
                   backend=backend)


def test_gelu_ffn_race_many_rows(backend):
    check_gelu_ffn(64, 512, 256, 1024, 256, torch.bfloat16, "tanh", backend=backend)
