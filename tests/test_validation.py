"""Bad input raises a clear error that names the argument, before any kernel runs."""
from __future__ import annotations

import pytest
import torch

import gptfast

B, T, H, D = 2, 5, 3, 16


def qkv(**kw):
    return [torch.randn(B, T, H, D, **kw) for _ in range(3)]


# ------------------------------------------------------------------------------ attention

@pytest.mark.parametrize("mutate,exc,match", [
    (lambda q, k, v: (q.double().int(), k, v), TypeError, "q has dtype torch.int32"),
    (lambda q, k, v: (q, k.half(), v), TypeError, "k has dtype torch.float16 but q has torch.float32"),
    (lambda q, k, v: (q, k, v.bfloat16()), TypeError, "v has dtype torch.bfloat16"),
    (lambda q, k, v: (q[0], k, v), ValueError, "q must have 4 dimensions"),
    (lambda q, k, v: (q, k[..., :8], v), ValueError, "k must have shape"),
    (lambda q, k, v: (q, k, v[:, :, :2]), ValueError, "v must have k's shape"),
    (lambda q, k, v: (q, k[:1], v[:1]), ValueError, "k must have shape"),
    (lambda q, k, v: (q, k[:, :, :2], v[:, :, :2]), ValueError, r"nheads \(3\) a multiple of nheads_k"),
    (lambda q, k, v: (q, k[:, :3], v[:, :3].transpose(0, 1)), ValueError, "v must have k's shape"),
    (lambda q, k, v: ("q", k, v), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v: (q, k, v.to("meta")), ValueError, "v is on meta but q is on cpu"),
])
def test_attention_rejects(mutate, exc, match):
    with pytest.raises(exc, match=match):
        gptfast.attention(*mutate(*qkv()))


@pytest.mark.parametrize("headdim", [0, 257, 512])
def test_attention_headdim_range(headdim):
    q = torch.randn(1, 4, 2, headdim)
    with pytest.raises(ValueError, match=r"head dim \(q.shape\[3\]\) must be in 1..256"):
        gptfast.attention(q, q, q)


def test_attention_bad_options():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="causal must be a bool"):
        gptfast.attention(q, k, v, causal="yes")
    with pytest.raises(ValueError, match="softmax_scale must be a finite number"):
        gptfast.attention(q, k, v, softmax_scale=float("nan"))


def test_float64_only_on_reference():
    q, k, v = qkv(dtype=torch.float64)
    gptfast.attention(q, k, v, backend="reference")  # gradcheck needs this
    with pytest.raises((TypeError, RuntimeError, NotImplementedError), match="triton"):
        gptfast.attention(q, k, v, backend="triton")


# ------------------------------------------------------------------------------ layer_norm

@pytest.mark.parametrize("args,exc,match", [
    (lambda x, w, b: (x.long(), w, b), TypeError, "x has dtype torch.int64"),
    (lambda x, w, b: (x, w.half(), b), TypeError, "weight has dtype torch.float16 but x has torch.float32"),
    (lambda x, w, b: (x, w[:-1], b), ValueError, r"weight must have shape \(8,\)"),
    (lambda x, w, b: (x, w, b[None]), ValueError, "bias must have 1 dimensions"),
    (lambda x, w, b: (x, w.to("meta"), b), ValueError, "weight is on meta but x is on cpu"),
    (lambda x, w, b: (x[..., :0], None, None), ValueError, "must be > 0"),
    (lambda x, w, b: (torch.tensor(1.0), None, None), ValueError, "at least 1 dimension"),
])
def test_layer_norm_rejects(args, exc, match):
    x, w, b = torch.randn(3, 8), torch.ones(8), torch.zeros(8)
    with pytest.raises(exc, match=match):
        gptfast.layer_norm(*args(x, w, b))


@pytest.mark.parametrize("eps", [-1e-5, "1e-5", float("nan"), True])
def test_layer_norm_bad_eps(eps):
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        gptfast.layer_norm(torch.randn(2, 4), None, None, eps=eps)


# ------------------------------------------------------------------------------ gelu_ffn

def ffn_args():
    return [torch.randn(4, 6), torch.randn(10, 6), torch.randn(10), torch.randn(3, 10), torch.randn(3)]


@pytest.mark.parametrize("index,new,exc,match", [
    (0, torch.randn(4, 7), ValueError, "w1 must have shape"),
    (1, torch.randn(10, 6, 1), ValueError, "w1 must have 2 dimensions"),
    (2, torch.randn(9), ValueError, r"b1 must have shape \(10,\)"),
    (3, torch.randn(3, 9), ValueError, "w2 must have shape"),
    (4, torch.randn(4), ValueError, r"b2 must have shape \(3,\)"),
    (1, torch.randn(10, 6, dtype=torch.float16), TypeError, "w1 has dtype torch.float16 but x has torch.float32"),
    (0, torch.randint(0, 3, (4, 6)), TypeError, "x has dtype torch.int64"),
    (3, torch.randn(3, 10, device="meta"), ValueError, "w2 is on meta but x is on cpu"),
])
def test_gelu_ffn_rejects(index, new, exc, match):
    args = ffn_args()
    args[index] = new
    with pytest.raises(exc, match=match):
        gptfast.gelu_ffn(*args)


def test_gelu_ffn_bad_approximate():
    with pytest.raises(ValueError, match="approximate must be one of"):
        gptfast.gelu_ffn(*ffn_args(), approximate="sigmoid")


# ------------------------------------------------------------------------------ modules

def test_nn_layernorm_rejects_multidim_shape():
    with pytest.raises(ValueError, match="last dimension only"):
        gptfast.nn.LayerNorm((4, 8))


def test_model_rejects_too_long_sequence():
    from gptfast.model import GPT, GPTConfig
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8))
    with pytest.raises(ValueError, match="exceeds block_size 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="n_embd .* divisible by n_head"):
        GPT(GPTConfig(n_embd=10, n_head=3, n_layer=1, vocab_size=8, block_size=4))
