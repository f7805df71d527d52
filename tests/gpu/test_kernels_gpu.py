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


def assert_options_results(got, truth, pt, mags, dtype):
    """(out, lse, (dq, dk, dv)) of a kernel vs the float64 ``truth`` and the reference in the
    tested dtype ``pt``: lse -inf exactly on rows without keys, out/lse within 2x and gradients
    within 3x PyTorch's own error, atol from the summed terms' magnitudes ``mags``
    (gptfast.testing.attention_magnitudes: out, dq, dk, dv)."""
    from gptfast.testing import assert_within_pytorch_error, rounding_atol
    empty = torch.isneginf(truth[1])
    assert torch.equal(torch.isneginf(got[1]), empty), "rows without keys: lse must be -inf exactly there"
    assert_within_pytorch_error(got[0], truth[0], pt[0], factor=2, atol=rounding_atol(mags[0], dtype), name="out")
    assert_within_pytorch_error(got[1][~empty], truth[1][~empty], pt[1][~empty], factor=2, atol=1e-4, name="lse")
    for name, a, r, c, m in zip(("dq", "dk", "dv"), got[2], truth[2], pt[2], mags[1:]):
        assert torch.isfinite(a).all(), f"{name}: not finite"
        assert_within_pytorch_error(a, r, c, factor=3, atol=rounding_atol(m, dtype), name=name)


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


# FlashAttention 2.8's dense options (the emulator's grid, tests/test_cuda_emulated.py, at GPU
# sizes): ((H, Hk), (Tq, Tk), D, causal, window, softcap, alibi "h" (H,) / "bh" (B, H), dropout_p).
# Every pair of options appears at least once; (130, 70) with window (5, 2) leaves rows 0..57
# without keys, (239, 1) and (1, 239) are prefill/decode edges.
OPTION_GRID = [
    ((6, 2), (113, 203), 64, True, (40, -1), 30.0, "h", 0.17),     # everything
    ((3, 1), (239, 1), 40, True, (-1, -1), 30.0, "bh", 0.17),
    ((4, 2), (1, 239), 96, False, (17, 3), 0.0, "bh", 0.17),
    ((3, 1), (3, 80), 128, False, (-1, -1), 30.0, None, 0.17),
    ((4, 4), (64, 64), 128, False, (5, 9), 30.0, "h", 0.0),
    ((6, 2), (64, 128), 64, True, (-1, -1), 0.0, None, 0.0),       # plain GQA
    ((4, 4), (113, 203), 40, True, (-1, -1), 0.0, None, 0.0),      # bottom-right causal
    ((2, 2), (300, 300), 256, False, (-1, -1), 0.0, None, 0.17),   # dropout only
    ((2, 2), (257, 257), 64, False, (-1, -1), 2.0, None, 0.0),     # small softcap
    ((2, 2), (257, 257), 256, True, (-1, -1), 0.0, "bh", 0.0),     # ALiBi only
    ((3, 1), (239, 1), 128, False, (0, 0), 0.0, None, 0.0),        # one key, Tk = 1
    ((6, 2), (3, 80), 40, True, (2, -1), 0.0, "h", 0.0),
    ((2, 1), (130, 70), 64, False, (5, 2), 0.0, None, 0.0),        # rows without keys
    ((4, 4), (1024, 1024), 128, True, (256, -1), 0.0, None, 0.0),  # sliding window skips blocks
]


def _option_id(c):
    (h, hk), (tq, tk), d, causal, window, softcap, alibi, p = c
    return (f"H{h}Hk{hk}-Tq{tq}Tk{tk}-D{d}-{'causal' if causal else 'full'}-w{window[0]}_{window[1]}"
            f"-softcap{softcap:g}-alibi{alibi}-drop{p:g}")


def _run_options(backend, q, k, v, dout, kw, deterministic=False):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(1234)  # every backend draws the same dropout (seed, offset)
    out, lse = gptfast.attention(*leaves, backend=backend, return_lse=True, deterministic=deterministic, **kw)
    out.backward(dout.to(out.dtype))
    return out.detach(), lse, [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", OPTION_GRID, ids=_option_id)
def test_attention_options(backend, case, dtype):
    """Forward, lse and every gradient against float64 (the reference backend on the GPU) within
    2x / 3x the reference's own same-dtype error (as tests/test_cpu_attention_options.py); the
    dropout mask is the same Philox draw in every backend, or nothing here matches."""
    from gptfast.testing import attention_magnitudes

    (h, hk), (tq, tk), d, causal, window, softcap, alibi, p = case
    B = 2
    g = torch.Generator(device="cuda").manual_seed(tq * 7 + tk)
    rnd = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.float64, generator=g)  # noqa: E731
    q, k, v, dout = rnd(B, tq, h, d), rnd(B, tk, hk, d), rnd(B, tk, hk, d), rnd(B, tq, h, d)
    slopes = None if alibi is None else torch.rand((h,) if alibi == "h" else (B, h), device="cuda",
                                                   generator=g, dtype=torch.float32) * 0.5
    kw = dict(causal=causal, softmax_scale=d ** -0.5, window_size=window, softcap=softcap, alibi_slopes=slopes,
              dropout_p=p)
    truth = _run_options("reference", q, k, v, dout, kw)
    low = [t.to(dtype) for t in (q, k, v, dout)]
    got, pt = _run_options(backend, *low, kw), _run_options("reference", *low, kw)
    mags = attention_magnitudes(*low, causal, d ** -0.5, window_size=window, softcap=softcap, alibi_slopes=slopes)
    mags = [m / (1.0 - p) for m in mags]  # kept terms are scaled by 1 / (1 - p)
    assert_options_results(got, truth, pt, mags, dtype)
    if backend == "cuda":  # the deterministic backward is bitwise reproducible with every option
        one, two = (_run_options(backend, *low, kw, deterministic=True)[2] for _ in range(2))
        assert all(torch.equal(a, b) for a, b in zip(one, two)), "deterministic backward not reproducible"


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
