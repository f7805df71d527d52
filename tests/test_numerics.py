"""Regression tests for numerics defects found by the fault-and-fuzz pass (issue 11, items 0-2).

- The tolerance rule (gptfast.testing) scales with the magnitude of the summed terms, so a result
  that cancels to ~0 (attention's dq at seqlen 1) passes whatever summation order the CPU's BLAS
  picks, and a real error still fails.
- cpu attention at seqlen 1 with a seqlen stride below the head dim (a permuted view, or an
  incoming gradient through ``out.permute``) used to hand that stride to sgemm as its leading
  dimension: MKL skipped the product and the result was garbage.
- The reference backend and ``attention_ref`` used to turn NaN into zeros.
"""
from __future__ import annotations

import math

import pytest
import torch

import gptfast
from gptfast.ops.attention import attention_backward_reference, attention_forward_reference
from gptfast.testing import assert_close, assert_results_match, attention_magnitudes, sdpa_bthd

CPU_BACKENDS = gptfast.available_backends(device="cpu")
KERNEL_BACKENDS = [b for b in CPU_BACKENDS if b != "reference"]


# --------------------------------------------------------------------------- item 0: tolerances

def _reordered_attention(q, k, v, dout, causal, scale):
    """The reference launchers on inputs whose head dim is permuted (and the results permuted
    back): the same function, summed in another order -- what another BLAS code path does."""
    perm = torch.randperm(q.shape[-1], generator=torch.Generator().manual_seed(5))
    inv = torch.argsort(perm)
    qp, kp, vp, dp = (t[..., perm].contiguous() for t in (q, k, v, dout))
    out, lse = attention_forward_reference(qp, kp, vp, causal, scale)
    grads = attention_backward_reference(dp, qp, kp, vp, out, lse, causal, scale)
    return out[..., inv], [g[..., inv] for g in grads]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("seqlen", [1, 3, 97])
def test_rule_accepts_another_summation_order_and_rejects_an_error(seqlen, dtype, seed):
    b, h, d = 2, 3, 128
    q, k, v, dout = (torch.randn(b, seqlen, h, d).to(dtype) for _ in range(4))
    scale = d ** -0.5
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    leaves_pt = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, pt = sdpa_bthd(*leaves64, True, scale), sdpa_bthd(*leaves_pt, True, scale)
    ref.backward(dout.double())
    pt.backward(dout)
    ref_grads, pt_grads = [t.grad for t in leaves64], [t.grad for t in leaves_pt]
    mags = attention_magnitudes(q, k, v, dout, True, scale)
    out, grads = _reordered_attention(q, k, v, dout, True, scale)
    assert_results_match(out, ref, pt, grads, ref_grads, pt_grads, magnitudes=mags)
    if seqlen == 1:
        # dq is exactly 0 in exact arithmetic (and in PyTorch's result): the bound must still
        # allow the ~1e-6 residue of cancelling O(1) fp32 terms seen on an Intel machine
        assert float(ref_grads[0].abs().max()) < 1e-12
        assert 4 * torch.finfo(torch.float32).eps * mags[1] > 1.4e-6
    # An error far above rounding (here 1e-2 of one element of dk) fails.
    bad = grads[1].clone()
    bad[0, 0, 0, 0] += 1e-2 * max(1.0, float(bad.abs().max()))
    with pytest.raises(AssertionError, match=r"grad\[1\]"):
        assert_results_match(out, ref, pt, [grads[0], bad, grads[2]], ref_grads, pt_grads, magnitudes=mags)


# --------------------------------------------------------------------------- item 1: seqlen-1 strides

def _seqlen_one_views(b, h, d, dtype, g):
    """q, k, v of shape (b, 1, h, d) whose seqlen stride is 1 (< d): permuted (b, h, d, 1) storage."""
    return [torch.randn(b, h, d, 1, dtype=dtype, generator=g).permute(0, 3, 1, 2) for _ in range(3)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_attention_seqlen_one_with_a_small_seqlen_stride(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton has no float64 kernels")
    g = torch.Generator().manual_seed(0)
    q, k, v = _seqlen_one_views(1, 2, 8, dtype, g)
    assert q.shape == (1, 1, 2, 8) and q.stride(1) < q.shape[-1]
    out = gptfast.attention(q, k, v, backend=backend)
    torch.testing.assert_close(out, v, rtol=0, atol=1e-6)  # softmax over one key is 1: out == v

    # The realistic form: contiguous inputs, and an incoming gradient through out.permute(0, 2, 3, 1)
    # with seqlen 1, whose seqlen stride is 1.
    leaves = [torch.randn(2, 1, 3, 16, dtype=dtype, generator=g).requires_grad_() for _ in range(3)]
    out = gptfast.attention(*leaves, causal=True, backend=backend)
    dout = torch.randn(2, 3, 16, 1, dtype=dtype, generator=g).permute(0, 3, 1, 2)
    assert dout.stride(1) == 1
    grads = torch.autograd.grad(out, leaves, dout)
    copies = [t.detach().clone().requires_grad_() for t in leaves]
    ref = sdpa_bthd(*copies, True)
    ref_grads = torch.autograd.grad(ref, copies, dout.contiguous())
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_close(out, ref, atol=tol, name="out")
    for name, a, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(a, r, atol=tol, name=name)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="cpu backend unavailable")
def test_cpu_launchers_accept_any_seqlen_stride_at_seqlen_one():
    # The launchers themselves (below the Python op's layout check): the kernel must give a
    # one-row BLAS operand a valid pitch, whatever stride it is handed.
    from gptfast.ops import _cpu
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64):
        q, k, v = _seqlen_one_views(2, 3, 24, dtype, g)
        out, lse = _cpu.attention_forward(q, k, v, True, 0.2)
        ref_out, ref_lse = attention_forward_reference(q, k, v, True, 0.2)
        assert_close(out, ref_out, atol=1e-6, name="out")
        dout = torch.randn(2, 3, 24, 1, dtype=dtype, generator=g).permute(0, 3, 1, 2)
        grads = _cpu.attention_backward(dout, q, k, v, out, lse, True, 0.2, False)
        ref_grads = attention_backward_reference(dout, q, k, v, ref_out, ref_lse, True, 0.2)
        for a, r in zip(grads, ref_grads):
            assert_close(a, r, atol=1e-5, name="grad")


# --------------------------------------------------------------------------- item 2: NaN policy

def _sees(i, j, causal):
    return j <= i or not causal


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["attention_ref"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_reaches_exactly_the_rows_that_see_it(backend, causal, where):
    t, j = 6, 3
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, t, 2, 8, generator=g) for _ in range(3))
    {"q": q, "k": k, "v": v}[where][0, j, 1, 5] = float("nan")
    if backend == "attention_ref":
        out = gptfast.attention_ref(q, k, v, causal=causal)
    else:
        out = gptfast.attention(q, k, v, causal=causal, backend=backend)
    sdpa = sdpa_bthd(q, k, v, causal)
    rows = torch.isnan(out[0, :, 1]).any(-1).tolist()
    assert not torch.isnan(out[0, :, 0]).any(), "NaN leaked into another head"
    if where == "q":
        expected = [i == j for i in range(t)]
    else:
        expected = [_sees(i, j, causal) for i in range(t)]
    if where == "v":
        # p_ij * NaN is NaN even where p_ij = 0, so within a tile a NaN value may reach rows
        # that do not see it (SDPA's matmul does the same); it must never be hidden.
        assert all(r for r, e in zip(rows, expected) if e), f"NaN hidden: rows {rows}"
    else:
        assert rows == expected, f"NaN rows {rows}, expected {expected} (SDPA gives " \
                                 f"{torch.isnan(sdpa[0, :, 1]).any(-1).tolist()})"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_in_a_key_reaches_the_gradients_of_the_rows_that_see_it(backend):
    t, j = 5, 2
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, t, 1, 8, generator=g) for _ in range(3))
    k[0, j, 0, 0] = float("nan")
    leaves = [x.requires_grad_() for x in (q, k, v)]
    out = gptfast.attention(*leaves, causal=True, backend=backend)
    dq, dk, dv = torch.autograd.grad(out, leaves, torch.randn(out.shape, generator=g))
    # rows i >= j saw the NaN key: all of their dq is NaN. Rows i < j did not; only the NaN's own
    # coordinate may reach them (dq_i = sum_j ds_ij k_j with ds_ij = 0, and 0 * NaN is NaN).
    assert torch.isnan(dq[0, j:]).all()
    assert torch.isfinite(dq[0, :j, :, 1:]).all()


def test_reference_keeps_zero_for_rows_without_keys_and_nan_for_nan_rows():
    from gptfast.ops.attention import _probabilities
    s = torch.tensor([[[[float("-inf"), float("-inf")], [0.0, float("nan")], [1.0, 2.0]]]])
    lse = torch.logsumexp(s, -1)
    p = _probabilities(s, lse)
    assert torch.equal(p[0, 0, 0], torch.zeros(2))                 # no visible key: 0
    assert torch.isnan(p[0, 0, 1]).all()                           # a NaN score: NaN, not 0
    assert_close(p[0, 0, 2], torch.softmax(s[0, 0, 2], -1), atol=1e-7)
    assert math.isinf(float(lse[0, 0, 0])) and math.isnan(float(lse[0, 0, 1]))
