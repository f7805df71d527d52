"""Triton-only GPU tests (the grid shared with the cuda backend is in test_kernels_gpu.py):
float32 attention (ieee dots), the autotuner's handling of the db1 partial buffer, the
LayerNorm's and RMSNorm's fused residual add in bf16 and at GPU sizes, the linear cross-entropy's
logits epilogue at real vocabularies, and the gated FFN's launchers in bf16/fp16/fp32 at GPU sizes
(autotuned once, for its db partial buffers).

Skipped without a GPU. Run by bench/gpu_suite.sh.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from test_triton_attention import check_attention  # noqa: E402
from test_triton_gated_ffn import check_gated_ffn_launchers  # noqa: E402
from test_triton_gelu_ffn import check_gelu_ffn  # noqa: E402
from test_triton_layer_norm import check_layer_norm_residual  # noqa: E402
from test_triton_linear_cross_entropy import check_epilogue  # noqa: E402
from test_triton_rms_norm import check_rms_norm, check_rms_norm_launchers  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (none visible)"),
]


@pytest.mark.parametrize("T,D", [(130, 40), (257, 128)])
def test_attention_fp32(T, D):
    check_attention(2, T, 3, D, True, torch.float32)


def test_gelu_ffn_autotuned_bias_grad():
    # Autotuning benchmarks configs with different BLOCK_M, which write different numbers of db1
    # partial rows into one buffer: the chosen config's db1 must not include a loser's rows.
    torch.manual_seed(2)
    check_gelu_ffn(2, 300, 256, 1024, 256, torch.bfloat16, "tanh")


@pytest.mark.parametrize("M,N,dtype,has_weight,has_bias", [
    (257, 1000, torch.bfloat16, True, True),
    (257, 4096, torch.float16, True, False),
    (4096, 1024, torch.bfloat16, True, True),  # many rows per backward program (G = 4 x SMs)
    (3, 9000, torch.bfloat16, False, True),  # chunked forward and backward
])
def test_layer_norm_residual(M, N, dtype, has_weight, has_bias):
    # The interpreter has no bf16 and runs one program at a time; here s = x + r is still checked
    # bitwise (fp32 add, one round-to-nearest), the rest against float64.
    check_layer_norm_residual(M, N, dtype, has_weight, has_bias)


@pytest.mark.parametrize("M,N,dtype,has_weight,offset,residual", [
    (257, 1000, torch.bfloat16, True, 0.0, True),
    (257, 4096, torch.float16, True, 1.0, True),
    (4096, 1024, torch.bfloat16, True, 1.0, True),  # many rows per backward program (G = 4 x SMs)
    (4096, 2048, torch.bfloat16, False, 0.0, False),
    (3, 9000, torch.bfloat16, True, 0.0, True),  # chunked forward and backward
    (600, 9000, torch.bfloat16, True, 1.0, False),  # chunked, more rows than programs: dW partials add up
])
def test_rms_norm_launchers(M, N, dtype, has_weight, offset, residual):
    # s = x + r still bitwise (fp32 add, one round-to-nearest), the rest against float64.
    check_rms_norm_launchers(M, N, dtype, has_weight, offset, residual)


@pytest.mark.parametrize("rows,N,offset", [(512, 4096, 0.0), (300, 1000, 1.0)])
def test_rms_norm_op_bf16(rows, N, offset):
    check_rms_norm(rows, N, torch.bfloat16, offset=offset)


@pytest.mark.parametrize("v,smoothing,softcap,scaled", [(50304, 0.0, 0.0, True), (50304, 0.0, 0.0, False),
                                                       (128256, 0.1, 30.0, True), (256000, 0.0, 30.0, True)])
def test_linear_cross_entropy_epilogue(v, smoothing, softcap, scaled):
    check_epilogue(64, v, smoothing, softcap, scaled)


@pytest.mark.parametrize("M,K,H,N,dtype,activation,biases,weights", [
    (300, 256, 1000, 256, torch.bfloat16, "silu", (False, False, False), "fused"),  # Llama: no biases
    (257, 192, 768, 200, torch.bfloat16, "gelu_tanh", (True, True, True), "transposed"),  # Gemma GeGLU
    (130, 128, 384, 96, torch.float16, "gelu", (True, False, True), "separate"),
    (97, 96, 200, 72, torch.float32, "silu", (True, True, True), "transposed"),
])
def test_gated_ffn_launchers(M, K, H, N, dtype, activation, biases, weights):
    check_gated_ffn_launchers(M, K, H, N, dtype, activation, biases, weights)


def test_gated_ffn_autotuned_bias_grads():
    # As gelu_ffn's: configs of different BLOCK_M write different numbers of db_gate/db_up partial
    # rows into one buffer; the chosen config's sums must not include a loser's rows.
    check_gated_ffn_launchers(600, 256, 1024, 256, torch.bfloat16, "silu", seed=3)
