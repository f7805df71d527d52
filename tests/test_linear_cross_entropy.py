"""gptfast.ops.linear_cross_entropy (work in progress: the chunked reference math) against
F.cross_entropy(F.linear(...)) in float64: every reduction, ignore_index, label smoothing,
softcap, bias, chunk sizes that do and do not divide the rows."""
from __future__ import annotations

import pytest
import torch

from gptfast.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing, softcap, bias", [(0.0, None, False), (0.1, None, True), (0.0, 30.0, True),
                                                      (0.2, 5.0, False)])
@pytest.mark.parametrize("chunk_rows", [None, 1, 7])
def test_matches_cross_entropy_of_the_full_logits(reduction, smoothing, softcap, bias, chunk_rows, seed):
    m, k, v = 23, 16, 50
    x = torch.randn(m, k, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(v, k, dtype=torch.float64) * 0.5).requires_grad_()
    b = torch.randn(v, dtype=torch.float64, requires_grad=True) if bias else None
    t = torch.randint(0, v, (m,))
    t[::5] = -100
    params = [p for p in (x, w, b) if p is not None]
    got = linear_cross_entropy(x, w, t, b, reduction=reduction, label_smoothing=smoothing, softcap=softcap,
                               chunk_rows=chunk_rows)
    want = linear_cross_entropy_ref(x, w, t, b, reduction=reduction, label_smoothing=smoothing, softcap=softcap)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g),
                               rtol=1e-10, atol=1e-12)


def test_leading_dims_and_errors(seed):
    x, w = torch.randn(2, 3, 8), torch.randn(11, 8)
    t = torch.randint(0, 11, (2, 3))
    assert linear_cross_entropy(x, w, t, reduction="none").shape == (2, 3)
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy(x, torch.randn(11, 9), t)
    with pytest.raises(ValueError, match="targets must have"):
        linear_cross_entropy(x, w, t[:, :2])
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(x, w, t, reduction="avg")
