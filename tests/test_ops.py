"""Every CPU backend of every op against PyTorch's built-ins, forward and all gradients.

Ground truth is the PyTorch built-in (SDPA, F.layer_norm, Linear+GELU+Linear) evaluated in
float64. fp32 results must match it within tight absolute tolerances; fp16/bf16 results within
DESIGN.md's rule: 2x (outputs) / 3x (gradients) PyTorch's own error in the same dtype.
The Triton backend is excluded here (its interpreter runs need small grids, see test_triton_*).
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import gptfast
from gptfast.testing import (assert_close, assert_results_match, attention_magnitudes, gelu_ffn_magnitudes,
                             layer_norm_magnitudes, sdpa_bthd)

CPU_BACKENDS = [b for b in gptfast.available_backends(device="cpu") if b != "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _leaves(tensors, dtype):
    return [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]


def check_against_builtin(ours, builtin, inputs, dtype, magnitudes, *, grad_upstream=None, name=""):
    """Compare ``ours(*inputs)`` with ``builtin(*inputs)``: output and the gradient of each input,
    by gptfast.testing's rule (PyTorch's own error + rounding of the summed terms).

    ``inputs`` are fp32 tensors (or None); each variant gets its own leaves in its dtype.
    ``magnitudes(*float64 inputs, float64 upstream grad)`` is the op's ``*_magnitudes``.
    ``grad_upstream(out)`` makes the upstream gradient (default: a random tensor like out).
    """
    x64, xpt, xours = _leaves(inputs, torch.float64), _leaves(inputs, dtype), _leaves(inputs, dtype)
    ref, pt, out = builtin(*x64), builtin(*xpt), ours(*xours)
    assert out.dtype == pt.dtype, f"{name}: output dtype {out.dtype}, PyTorch gives {pt.dtype}"
    assert out.shape == ref.shape
    g = torch.randn(ref.shape, dtype=torch.float32) if grad_upstream is None else grad_upstream(ref)
    g_low = g.to(dtype)
    ref.backward(g_low.to(torch.float64))
    pt.backward(g_low)
    out.backward(g_low)
    grads = lambda xs: [None if x is None else x.grad for x in xs]  # noqa: E731
    assert_results_match(out, ref, pt, grads(xours), grads(x64), grads(xpt),
                         magnitudes=magnitudes(*x64, g_low.double()), name=name)


# --------------------------------------------------------------------------- attention

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("seqlen,headdim", list(itertools.product([1, 3, 97, 130, 257], [16, 40, 64, 111, 128])))
def test_attention_matches_sdpa(backend, dtype, causal, seqlen, headdim, seed):
    shape = (2, seqlen, 3, headdim)
    q, k, v = (torch.randn(shape) for _ in range(3))
    check_against_builtin(lambda q, k, v: gptfast.attention(q, k, v, causal=causal, backend=backend),
                          lambda q, k, v: sdpa_bthd(q, k, v, causal), [q, k, v], dtype,
                          lambda q, k, v, g: attention_magnitudes(q, k, v, g, causal),
                          name=f"attention T={seqlen} D={headdim}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_attention_noncontiguous_inputs_and_grad(backend, seed):
    # q, k, v as strided views of one packed projection, as in a GPT block, and an upstream
    # gradient whose last dimension is strided.
    b, t, h, d = 2, 33, 4, 24
    packed = torch.randn(b, t, 3, h, d, dtype=torch.float64, requires_grad=True)
    q, k, v = packed.unbind(2)
    assert not q.is_contiguous()
    out = gptfast.attention(q, k, v, causal=True, softmax_scale=0.3, backend=backend)
    g = torch.randn(b, t, h, 2 * d, dtype=torch.float64)[..., ::2]
    (grad_ours,) = torch.autograd.grad(out, packed, g)
    ref = sdpa_bthd(q, k, v, True, 0.3)
    (grad_ref,) = torch.autograd.grad(ref, packed, g)
    assert_close(out, ref, atol=1e-12, name="out")
    assert_close(grad_ours, grad_ref, atol=1e-12, name="grad")


def test_flash_attn_func_signature(seed):
    q, k, v = (torch.randn(1, 10, 2, 16) for _ in range(3))
    out = gptfast.flash_attn_func(q, k, v)  # FlashAttention's default is causal=False
    assert_close(out, sdpa_bthd(q, k, v, causal=False), atol=1e-5)
    out = gptfast.flash_attn_func(q, k, v, 0.0, 0.5, True)  # positional, as flash_attn
    assert_close(out, sdpa_bthd(q, k, v, True, 0.5), atol=1e-5)
    # options run on the first backend that has them under auto (tests/test_attention_options.py;
    # the cpu kernels have them all: tests/test_cpu_attention_options.py)
    out = gptfast.flash_attn_func(q, k, v, window_size=(4, 0))
    assert_close(out, gptfast.attention_ref(q, k, v, False, window_size=(4, 0)), atol=1e-5)
    if "cpu" in CPU_BACKENDS:
        torch.manual_seed(3)
        with gptfast.use_backend("cpu"):
            out = gptfast.flash_attn_func(q, k, v, dropout_p=0.1)
        torch.manual_seed(3)
        assert_close(out, gptfast.attention(q, k, v, False, dropout_p=0.1, backend="reference"), atol=1e-5)


# --------------------------------------------------------------------------- layer_norm

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [1, 123, 768, 1000])
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "bias", "none"])
def test_layer_norm_matches_torch(backend, dtype, hidden, affine, seed):
    x = torch.randn(2, 7, hidden) * 3 + 1.5  # offset mean: catches a one-pass variance
    w = torch.randn(hidden) if "weight" in affine else None
    b = torch.randn(hidden) if "bias" in affine else None
    check_against_builtin(lambda x, w, b: gptfast.layer_norm(x, w, b, 1e-5, backend=backend),
                          lambda x, w, b: F.layer_norm(x, (hidden,), w, b, 1e-5), [x, w, b], dtype,
                          lambda x, w, b, g: layer_norm_magnitudes(x, w, b, g, 1e-5),
                          name=f"layer_norm N={hidden} {affine}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_layer_norm_noncontiguous(backend, seed):
    x = torch.randn(40, 6, dtype=torch.float64).t().requires_grad_()  # (6, 40), stride (1, 6)
    w, b = torch.randn(40, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    g = torch.randn(6, 80, dtype=torch.float64)[:, ::2]
    y = gptfast.layer_norm(x, w, b, backend=backend)
    (gx,) = torch.autograd.grad(y, x, g)
    ref = F.layer_norm(x, (40,), w, b)
    (gref,) = torch.autograd.grad(ref, x, g)
    assert_close(y, ref, atol=1e-12, name="y")
    assert_close(gx, gref, atol=1e-12, name="dx")


# --------------------------------------------------------------------------- gelu_ffn

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("m,k,hid,n", [(1, 16, 64, 16), (21, 123, 50, 37), (65, 96, 384, 96)])
@pytest.mark.parametrize("biases", [True, False], ids=["bias", "nobias"])
def test_gelu_ffn_matches_torch(backend, dtype, approximate, m, k, hid, n, biases, seed):
    x = torch.randn(m, k)
    w1, w2 = torch.randn(hid, k) / k ** 0.5, torch.randn(n, hid) / hid ** 0.5
    b1, b2 = (torch.randn(hid), torch.randn(n)) if biases else (None, None)
    check_against_builtin(
        lambda *a: gptfast.gelu_ffn(*a, approximate=approximate, backend=backend),
        lambda *a: gptfast.gelu_ffn_ref(*a, approximate=approximate),
        [x, w1, b1, w2, b2], dtype, lambda *a: gelu_ffn_magnitudes(*a, approximate=approximate),
        name=f"gelu_ffn {m}x{k}x{hid}x{n}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gelu_ffn_transposed_weights_and_batched_input(backend, seed):
    # Hugging Face's Conv1D stores (in, out): a transposed view must work without a copy.
    conv1 = torch.randn(24, 80, dtype=torch.float64, requires_grad=True)   # (K, H)
    conv2 = torch.randn(80, 24, dtype=torch.float64, requires_grad=True)   # (H, N)
    b1, b2 = torch.randn(80, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    out = gptfast.gelu_ffn(x, conv1.t(), b1, conv2.t(), b2, backend=backend)
    assert out.shape == (3, 5, 24)
    ref = gptfast.gelu_ffn_ref(x, conv1.t(), b1, conv2.t(), b2)
    g = torch.randn_like(ref)
    ours = torch.autograd.grad(out, (x, conv1, conv2), g)
    theirs = torch.autograd.grad(ref, (x, conv1, conv2), g)
    assert_close(out, ref, atol=1e-12)
    for a, b in zip(ours, theirs):
        assert_close(a, b, atol=1e-11)


def test_gelu_formulas_match_pytorch():
    from gptfast.ops.gelu_ffn import gelu, gelu_grad
    h = torch.linspace(-12, 12, 4001, dtype=torch.float64)
    for approximate in ("tanh", "none"):
        assert_close(gelu(h, approximate), F.gelu(h, approximate=approximate), atol=1e-14)
        (auto,) = torch.autograd.grad(F.gelu(h.requires_grad_(), approximate=approximate).sum(), h)
        assert_close(gelu_grad(h.detach(), approximate), auto, atol=1e-13)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("which", ["q", "k", "v", "dout"])
def test_attention_broadcast_rows_and_size_one_headdim(backend, which, seed):
    """expand()ed inputs (seqlen stride 0) and a head dim of 1 with an odd last stride are valid:
    they must give the same answer as contiguous copies (the cpu kernels hand rows to BLAS, which
    rejects a row pitch below the row length)."""
    b, t, h, d = 2, 8, 2, 16
    full = {n: torch.randn(b, t, h, d, dtype=torch.float64) for n in ("q", "k", "v", "dout")}
    full[which] = torch.randn(b, 1, h, d, dtype=torch.float64).expand(b, t, h, d)
    leaves = [full[n].requires_grad_() if n != "dout" else full[n] for n in ("q", "k", "v")]
    out = gptfast.attention(*leaves, causal=True, backend=backend)
    grads = torch.autograd.grad(out, leaves, full["dout"])
    copies = [x.detach().contiguous().requires_grad_() for x in leaves]
    ref = sdpa_bthd(*copies, causal=True)
    ref_grads = torch.autograd.grad(ref, copies, full["dout"].contiguous())
    assert_close(out, ref, atol=1e-12, name="out")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, atol=1e-12, name="grad")

    q = torch.randn(1, 4, 1, 3, dtype=torch.float64).transpose(2, 3)  # (1, 4, 3, 1), stride(-1) == 3
    assert q.stride(-1) != 1 and q.is_contiguous()
    assert_close(gptfast.attention(q, q, q, backend=backend), sdpa_bthd(q, q, q), atol=1e-12)
