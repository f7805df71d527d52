"""Numerical comparison helpers shared by the test suite and the benchmarks.

The tolerance rule is FlashAttention's: with a high-precision reference ``ref`` and PyTorch's
own result in the same low-precision dtype ``pt``, a kernel's output ``out`` passes when
``max|out - ref| <= factor * max|pt - ref| + atol`` (factor 2 for outputs, 3 for gradients).
On failure the message names the tensor, the worst element, its index and both bounds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["assert_close", "assert_within_pytorch_error", "max_abs_diff", "sdpa_bthd"]


def sdpa_bthd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              softmax_scale: float | None = None) -> torch.Tensor:
    """PyTorch's ``F.scaled_dot_product_attention`` in gptfast's (batch, seqlen, nheads, headdim)
    layout: the built-in that attention is checked and benchmarked against."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2)


def _worst(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, tuple[int, ...], float, float]:
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs expected {tuple(e.shape)}")
    if a.numel() == 0:
        return 0.0, (), 0.0, 0.0
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        idx = torch.nonzero(nan_a != nan_e)[0]
        i = tuple(int(v) for v in idx)
        return float("inf"), i, float(a[i]), float(e[i])
    diff = (a - e).abs()
    diff[nan_a] = 0.0
    # inf - inf is nan: equal infinities match, anything else is an infinite error
    inf_mismatch = torch.isnan(diff)
    diff[inf_mismatch] = float("inf")
    flat = int(torch.argmax(diff))
    i = tuple(int(v) for v in torch.unravel_index(torch.tensor(flat), a.shape))
    return float(diff[i]), i, float(a[i]), float(e[i])


def max_abs_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| in float64 (NaN where one side has NaN and the other not)."""
    return _worst(actual, expected)[0]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0,
                 name: str = "tensor") -> None:
    """Element-wise ``|actual - expected| <= atol + rtol * |expected|``, reporting the worst element."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    if a.numel() == 0:
        return
    err, idx, av, ev = _worst(a, e)
    excess = (a - e).abs() - (atol + rtol * e.abs())
    excess = torch.nan_to_num(excess, nan=0.0)
    if err == float("inf") or bool((excess > 0).any()):
        j = idx if err == float("inf") else tuple(
            int(v) for v in torch.unravel_index(torch.argmax(excess), a.shape))
        raise AssertionError(
            f"{name}: mismatch at index {j}: got {float(a[j])!r}, expected {float(e[j])!r} "
            f"(|diff| {abs(float(a[j]) - float(e[j])):.3e} > atol {atol:.1e} + rtol {rtol:.1e}*|expected|); "
            f"max |diff| {err:.3e} at {idx}")


def assert_within_pytorch_error(out: torch.Tensor, ref: torch.Tensor, pt: torch.Tensor, *,
                                factor: float = 2.0, atol: float = 1e-6, name: str = "tensor") -> None:
    """FlashAttention's rule: ``max|out-ref| <= factor * max|pt-ref| + atol``.

    ``ref`` is the high-precision ground truth, ``pt`` PyTorch's result in ``out``'s dtype.
    """
    err, idx, got, want = _worst(out, ref)
    pt_err = _worst(pt, ref)[0]
    bound = factor * pt_err + atol
    if not err <= bound:
        raise AssertionError(
            f"{name}: max |out - ref| = {err:.3e} at index {idx} (got {got!r}, ref {want!r}) exceeds "
            f"{factor:g} x PyTorch's own error {pt_err:.3e} + atol {atol:.1e} = {bound:.3e}")
