"""Triton attention (kernels/attention.py) on packed variable-length sequences (the ``varlen``
layout, gptfast.ops.varlen) against the float64 reference: forward, lse and every gradient, with
every option; and a packed batch of equal lengths against the dense batched kernel, bit for bit.

On CPU this runs in Triton's interpreter (conftest.py), whose tiles are 32 query rows x 16 keys:
the lengths below (0, 1, a few, up to 37) put sequences inside one tile, across tile edges, and
next to empty ones, so a kernel that reads or writes a neighbour's rows, loses a tail block or
misplaces an lse row fails. Each case is a different mix of GQA, causal, window, softcap, ALiBi
(H,) / (B, H), dropout and head dim (every value of each factor appears at least once).

Tolerances. fp32: the kernel and the reference compute the same function in fp32 and float64, so
``2e-5 * max(1, max|ref|)`` as tests/test_triton_attention_options.py (measured worst ~1e-6
relative); with dropout this is also the exact-mask check (one flipped keep bit moves an output
by ~1e-2). fp16: the kernel rounds P and dS to fp16 before each tensor-core dot, so each result is
off by ~2^-11 times the magnitude of its summed terms: ``4 * 2^-11 * M`` per sequence, with M from
gptfast.testing.attention_magnitudes on that sequence (x 1/(1-p) with dropout: a kept term is
scaled by it, a dropped one is 0).
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

import gptfast  # noqa: E402
from gptfast.ops import varlen as V  # noqa: E402
from gptfast.testing import assert_close, attention_magnitudes  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H = 4
# log2(0) of the running sum of a row without keys (then replaced by -inf), in the interpreter's numpy
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")
F64 = torch.float64

# (lens_q, lens_k, kv heads, causal, window, softcap, alibi, dropout_p, head dim)
CASES = [
    ([3, 0, 37, 1], [5, 4, 19, 0], 2, True, (-1, -1), 0.0, None, 0.0, 16),
    ([1, 33, 6], [17, 40, 0], 4, False, (5, 3), 30.0, "bh", 0.17, 40),
    ([20, 0, 9], [20, 3, 30], 2, True, (16, -1), 0.0, "h", 0.17, 64),
    ([2, 35], [39, 1], 1, False, (-1, 4), 30.0, None, 0.0, 16),
    ([12, 1, 0, 33], [12, 1, 0, 33], 2, False, (-1, -1), 0.0, "bh", 0.17, 40),
    ([0, 0], [0, 3], 2, True, (-1, -1), 0.0, None, 0.0, 16),
]
FP16_CASES = [CASES[1], CASES[2]]


def _id(c):
    lq, lk, hk, causal, window, softcap, alibi, p, d = c
    return (f"q{'_'.join(map(str, lq))}-k{'_'.join(map(str, lk))}-hk{hk}-{'causal' if causal else 'full'}"
            f"-w{window[0]}_{window[1]}-sc{softcap:g}-alibi{alibi}-p{p:g}-d{d}")


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def _make(case, seed):
    lq, lk, hk, causal, window, softcap, alibi, p, d = case
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64).to(DEVICE)  # noqa: E731
    q, k, v, dout = rnd(sum(lq), H, d), rnd(sum(lk), hk, d), rnd(sum(lk), hk, d), rnd(sum(lq), H, d)
    slopes = None
    if alibi is not None:
        slopes = (torch.rand((H,) if alibi == "h" else (len(lq), H), generator=g) * 0.5).to(DEVICE)
    kw = dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes, dropout_p=p)
    return (q, k, v), dout, kw


def _run(backend, dtype, inputs, dout, case, kw, rng_seed=1234):
    lq, lk = case[0], case[1]
    leaves = [t.to(dtype).requires_grad_() for t in inputs]
    torch.manual_seed(rng_seed)  # the same dropout (seed, offset) for both backends
    out, lse = V.attention_varlen(*leaves, _cu(lq), _cu(lk), max(lq), max(lk), backend=backend,
                                  return_lse=True, **kw)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype)) if out.numel() else [torch.zeros_like(t) for t in leaves]
    return out, lse, list(grads)


def _check_shapes_and_empty_rows(case, out, lse, grads, r_lse, inputs, name):
    q, k, v = inputs
    assert out.shape == q.shape and out.is_contiguous() and lse.shape == (H, q.shape[0])
    assert lse.dtype == torch.float32
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    empty = r_lse == float("-inf")  # rows that see no key: out 0, lse -inf, no NaN anywhere
    assert torch.equal(lse == float("-inf"), empty), f"{name}: rows with lse = -inf differ"
    assert not any(torch.isnan(t).any() for t in (out, lse, *grads)), f"{name}: NaN"
    assert (out[empty.transpose(0, 1)] == 0).all(), f"{name}: a row that sees no key is not 0"
    assert (grads[0][empty.transpose(0, 1)] == 0).all(), f"{name}: dq of a row that sees no key is not 0"
    ck = _cu(case[1]).tolist()
    for b, n in enumerate(case[0]):
        if n == 0:  # keys no query sees: zero gradients, exactly
            assert (grads[1][ck[b]:ck[b + 1]] == 0).all() and (grads[2][ck[b]:ck[b + 1]] == 0).all(), name


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_varlen_fp32_matches_reference(case):
    inputs, dout, kw = _make(case, seed=CASES.index(case))
    out, lse, grads = _run("triton", torch.float32, inputs, dout, case, kw)
    r_out, r_lse, r_grads = _run("reference", F64, inputs, dout, case, kw)
    name = _id(case)
    _check_shapes_and_empty_rows(case, out, lse, grads, r_lse, inputs, name)
    tol = lambda ref: 2e-5 * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)  # noqa: E731
    assert_close(out, r_out, atol=tol(r_out), name=f"{name} out")
    finite = r_lse != float("-inf")
    assert_close(lse[finite], r_lse[finite], atol=tol(r_lse[finite]), name=f"{name} lse")
    for n, a, r in zip(("dq", "dk", "dv"), grads, r_grads):
        assert_close(a, r, atol=tol(r), name=f"{name} {n}")


@pytest.mark.parametrize("case", FP16_CASES, ids=[_id(c) for c in FP16_CASES])
def test_varlen_fp16_matches_reference(case):
    lq, lk, hk, causal, window, softcap, alibi, p, d = case
    inputs, dout, kw = _make(case, seed=100 + CASES.index(case))
    inputs, dout = [t.half().double() for t in inputs], dout.half().double()  # exact in fp16
    out, lse, grads = _run("triton", torch.float16, inputs, dout, case, kw)
    r_out, r_lse, r_grads = _run("reference", F64, inputs, dout, case, kw)
    name = _id(case) + " fp16"
    assert out.dtype == torch.float16 and all(g.dtype == torch.float16 for g in grads)
    _check_shapes_and_empty_rows(case, out, lse, grads, r_lse, inputs, name)
    finite = r_lse != float("-inf")
    assert_close(lse[finite], r_lse[finite], atol=2e-5 * max(1.0, r_lse[finite].abs().max().item()),
                 name=f"{name} lse")  # fp32 scores of the same fp16 inputs
    cq, ck = _cu(lq).tolist(), _cu(lk).tolist()
    q, k, v = inputs
    slopes = kw["alibi_slopes"]
    window = V.normalise(causal, window, softcap, 0.0, max(lk)).window  # as the varlen call normalises
    for b in range(len(lq)):
        rq, rk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        if rq.start == rq.stop or rk.start == rk.stop:
            continue  # no queries, or no keys: zeros, checked exactly above
        s_b = slopes if slopes is None or slopes.dim() == 1 else slopes[b:b + 1]
        mags = attention_magnitudes(q[rq][None], k[rk][None], v[rk][None], dout[rq][None], causal, 1 / math.sqrt(d),
                                    window_size=window, softcap=softcap, alibi_slopes=s_b)
        for n, a, r, rows, m in zip(("out", "dq", "dk", "dv"), (out, *grads), (r_out, *r_grads),
                                    (rq, rq, rk, rk), mags):
            assert_close(a[rows], r[rows], atol=4 * 2.0 ** -11 * m / (1 - p), name=f"{name} seq {b} {n}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_varlen_equal_lengths_equal_the_dense_kernel_bit_for_bit(dtype):
    """Sequence b of a packed batch of equal lengths is batch entry b of the dense call: the same
    tiles, masks, ALiBi row and dropout counters, hence the same bits (forward, lse, gradients)."""
    b, t, hk, d = 3, 19, 2, 16
    g = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(b, t, n, d, generator=g).to(DEVICE, dtype) for n in (H, hk, hk, H))
    slopes = (torch.rand(b, H, generator=g) * 0.5).to(DEVICE)
    kw = dict(causal=True, window_size=(20, -1), softcap=30.0, alibi_slopes=slopes, dropout_p=0.17,
              backend="triton", return_lse=True)
    dense_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    torch.manual_seed(5)
    dense, dense_lse = gptfast.attention(*dense_leaves, **kw)
    dense_grads = torch.autograd.grad(dense, dense_leaves, dout)
    packed_leaves = [x.flatten(0, 1).clone().requires_grad_() for x in (q, k, v)]
    cu = _cu([t] * b)
    torch.manual_seed(5)
    packed, packed_lse = V.attention_varlen(*packed_leaves, cu, cu, t, t, **kw)
    packed_grads = torch.autograd.grad(packed, packed_leaves, dout.flatten(0, 1))
    assert torch.equal(packed, dense.flatten(0, 1))
    assert torch.equal(packed_lse, dense_lse.transpose(0, 1).flatten(1))  # (B, H, T) -> (H, B*T)
    for n, a, r in zip(("dq", "dk", "dv"), packed_grads, dense_grads):
        assert torch.equal(a, r.flatten(0, 1)), n


def test_varlen_launchers_directly():
    """The launcher contract itself: packed out (total_q, H, D) contiguous and lse (H, total_q),
    strided inputs (q a slice of a fused buffer), every sequence empty of keys or of queries."""
    from gptfast.kernels.attention import attention_backward, attention_forward
    g = torch.Generator().manual_seed(4)
    lq, lk, d = [0, 5, 3], [2, 0, 7], 16
    buf = torch.randn(sum(lq), 3, H, d, generator=g).to(DEVICE)
    q = buf[:, 0]
    k, v = (torch.randn(sum(lk), 2, d, generator=g).to(DEVICE) for _ in range(2))
    assert not q.is_contiguous()
    varlen = (_cu(lq), _cu(lk), max(lq), max(lk))
    out, lse = attention_forward(q, k, v, False, 0.3, varlen=varlen)
    r_out, r_lse = V.attention_varlen_forward_reference(q, k, v, *varlen, False, 0.3)
    assert out.shape == q.shape and out.is_contiguous() and lse.shape == (H, sum(lq))
    assert torch.all(out[:5] == 0) and torch.all(lse[:, :5] == float("-inf"))  # sequence 1 has no keys
    assert_close(out, r_out, atol=2e-5, name="out")
    assert_close(lse[:, 5:], r_lse[:, 5:], atol=2e-5, name="lse")
    dout = torch.randn(sum(lq), H, d, generator=g).to(DEVICE)
    grads = attention_backward(dout, q, k, v, out, lse, False, 0.3, False, varlen=varlen)
    r_grads = V.attention_varlen_backward_reference(dout, q, k, v, r_out, r_lse, *varlen, False, 0.3)
    assert torch.all(grads[1][:2] == 0) and torch.all(grads[2][:2] == 0)  # sequence 0 has no queries
    for n, a, r in zip(("dq", "dk", "dv"), grads, r_grads):
        assert_close(a, r, atol=2e-5 * max(1.0, r.abs().max().item()), name=n)
