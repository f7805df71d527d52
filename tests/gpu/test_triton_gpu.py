"""Triton kernels on a real NVIDIA GPU: the CPU grid at larger sizes, bf16, determinism, races.

Skipped without a GPU (the CPU suite covers the same code paths in Triton's interpreter at small
sizes and fp16/fp32 only). Run by bench/gpu_check.sh. The checks reuse the CPU test helpers, whose
tensors go to CUDA when a GPU is visible: float64 ground truth, fp16/bf16 within 2x (outputs) and
3x (gradients) PyTorch's own same-dtype error, fp32 (ieee dots) within tight absolute tolerances.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

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


AUTOTUNED = {"test_attention_deterministic_backward_20_runs", "test_attention_race_large_batch",
             "test_gelu_ffn_autotuned_bias_grad"}


@pytest.fixture(autouse=True)
def _first_config_only(monkeypatch, request):
    # Autotuning every (head dim, causal, dtype) of this grid compiles ~400 kernel variants;
    # correctness tests use each list's first config, the race/determinism tests and
    # bench/gpu_check.py autotune. (All configs compile: gptfast.kernels.check.)
    if request.node.originalname not in AUTOTUNED:
        monkeypatch.setenv("GPTFAST_TRITON_AUTOTUNE", "0")


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("T", [1, 3, 97, 130, 257, 1024])
def test_attention_seqlens(T, causal, dtype):
    torch.manual_seed(T)
    check_attention(2, T, 3, 64, causal, dtype)


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("D", [16, 40, 64, 111, 128, 256])
def test_attention_head_dims(D, dtype):
    torch.manual_seed(D)
    check_attention(2, 257, 3, D, True, dtype, layout="bhtd")
    check_attention(1, 130, 2, D, False, dtype)


@pytest.mark.parametrize("T,D", [(130, 40), (257, 128)])
def test_attention_fp32(T, D):
    check_attention(2, T, 3, D, True, torch.float32)


def test_attention_large_logits_bf16():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 512, 4, 64, device="cuda", dtype=torch.bfloat16) * 100 for _ in range(3))
    for t in (q, k, v):
        t.requires_grad_()
    out = gptfast.attention(q, k, v, causal=True, backend="triton")
    out.backward(torch.randn_like(out))
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()


def test_attention_deterministic_backward_20_runs():
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 1024, 8, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    g = torch.randn_like(q)
    first = None
    for _ in range(20):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        gptfast.attention(*leaves, causal=True, backend="triton", deterministic=True).backward(g)
        grads = [t.grad for t in leaves]
        if first is None:
            first = grads
        else:
            for a, b in zip(first, grads):
                assert torch.equal(a, b), "backward is not bitwise reproducible"


def test_attention_race_large_batch():
    # many programs at once: any cross-program race (shared outputs, partial buffers) shows here
    torch.manual_seed(1)
    B, T, H, D = 64, 256, 16, 64
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    out = gptfast.attention(q, k, v, causal=True, backend="triton")
    g = torch.randn_like(out)
    out.backward(g)
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(
        qr.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2), is_causal=True).transpose(1, 2)
    ref.backward(g.float())
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=0)
    for a, b in zip((q, k, v), (qr, kr, vr)):
        torch.testing.assert_close(a.grad.float(), b.grad, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("N", [123, 768, 1000, 4096, 65536])
def test_layer_norm_sizes(N, dtype):
    check_layer_norm(4 if N == 65536 else 257, N, dtype)


def test_layer_norm_race_many_rows():
    check_layer_norm(20000, 768, torch.bfloat16)


@pytest.mark.parametrize("dtype", LOW + [torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_ffn_sizes(approximate, dtype):
    check_gelu_ffn(4, 250, 768, 3072, 768, dtype, approximate)
    check_gelu_ffn(3, 37, 100, 333, 77, dtype, approximate, has_bias=False, weights="contiguous")


def test_gelu_ffn_autotuned_bias_grad():
    # Autotuning benchmarks configs with different BLOCK_M, which write different numbers of db1
    # partial rows into one buffer: the chosen config's db1 must not include a loser's rows.
    torch.manual_seed(2)
    check_gelu_ffn(2, 300, 256, 1024, 256, torch.bfloat16, "tanh")
