"""The Triton logits epilogue of linear_cross_entropy (kernels/linear_cross_entropy.py) against the
reference epilogue evaluated in float64 on the same fp32 logits.

Interpreter-sized (TRITON_INTERPRET=1 on the CPU): vocabularies of one column, below, at and above
one tile, and several tiles with a ragged tail (the tile width is narrowed to 64 so that V = 1000
walks 16 tiles); label smoothing, softcap, with and without a gradient to write; a dominant logit
(exp must not overflow), a row of equal logits (loss log V, uniform softmax), ignored rows and the
last class. The op end-to-end on this backend (fp32 / bf16 / fp16 rule, empty and all-ignored
batches, autocast, torch.compile): tests/test_linear_cross_entropy.py. ``check_epilogue`` runs on
a GPU too (tests/gpu/test_triton_gpu.py)."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from gptfast.ops.linear_cross_entropy import cross_entropy_logits_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check_epilogue(c, v, smoothing, softcap, scaled, block_cap=None, monkeypatch=None):
    from gptfast.kernels import linear_cross_entropy as lce
    if block_cap is not None:
        monkeypatch.setattr(lce, "MAX_BLOCK_V", block_cap)
    torch.manual_seed(v + c)
    z = torch.randn(c, v, device=DEVICE) * 4
    z[1 % c, 0] = 80.0  # one dominant logit
    if c > 2:
        z[2] = 50.0  # equal large logits: loss log(V), softmax uniform
    t = torch.randint(0, v, (c,), device=DEVICE)
    t[0] = v - 1
    if c > 3:
        t[3] = -100
    scale = torch.rand(c, device=DEVICE) + 0.5 if scaled else None
    want_z = z.double()
    want = cross_entropy_logits_reference(want_z, t, None if scale is None else scale.double(), -100, smoothing,
                                          softcap)
    got_z = z.clone()
    got = lce.cross_entropy_logits(got_z, t, scale, -100, smoothing, softcap)
    assert got.dtype == torch.float32 and got.shape == (c,)
    # fp32 logits of magnitude up to 80: the loss is a difference of such terms, so a few ulp of 80
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-5)
    if c > 3:
        assert got[3] == 0
    if c > 2:
        torch.testing.assert_close(got[2].double(), torch.tensor(math.log(v), dtype=torch.float64, device=DEVICE),
                                   rtol=1e-5, atol=1e-5)
    if scaled:
        torch.testing.assert_close(got_z.double(), want_z, rtol=1e-5, atol=1e-6)
        if c > 3:
            assert (got_z[3] == 0).all()
        if not softcap:  # each row of a (smoothed) softmax cross-entropy gradient sums to zero
            assert got_z.double().sum(1).abs().max() < 1e-5 * math.sqrt(v)


@pytest.mark.parametrize("v", [1, 17, 1000, 4099])
@pytest.mark.parametrize("smoothing, softcap, scaled", [(0.0, 0.0, True), (0.3, 0.0, True), (0.0, 7.0, True),
                                                        (0.1, 2.0, False)])
def test_epilogue_matches_the_reference_epilogue(v, smoothing, softcap, scaled):
    check_epilogue(6, v, smoothing, softcap, scaled)


@pytest.mark.parametrize("smoothing, softcap", [(0.0, 0.0), (0.2, 30.0)])
def test_epilogue_over_many_tiles_with_a_ragged_tail(smoothing, softcap, monkeypatch):
    check_epilogue(5, 1000, smoothing, softcap, True, block_cap=64, monkeypatch=monkeypatch)


def test_epilogue_settings_and_bad_dtype():
    from gptfast.kernels import linear_cross_entropy as lce
    assert lce.settings(1) == (16, 4) and lce.settings(1000) == (1024, 4) and lce.settings(50304) == (4096, 8)
    z = torch.randn(3, 10, dtype=torch.float64, device=DEVICE)
    with pytest.raises(NotImplementedError, match="triton backend's logits are float32"):
        lce.cross_entropy_logits(z, torch.zeros(3, dtype=torch.long, device=DEVICE), None, -100, 0.0, 0.0)
    empty = lce.cross_entropy_logits(torch.empty(0, 10, device=DEVICE), torch.empty(0, dtype=torch.long, device=DEVICE),
                                     None, -100, 0.0, 0.0)
    assert empty.shape == (0,)
