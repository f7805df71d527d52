"""Numerical comparison helpers shared by the test suite and the benchmarks.

The tolerance rule is FlashAttention's, with an absolute term that scales with what was summed:
with a float64 reference ``ref`` and PyTorch's own result in the tested dtype ``pt``, a kernel's
output ``out`` passes when

    max|out - ref| <= factor * max|pt - ref| + ROUNDING_FACTOR * eps_acc * M

(factor 2 for outputs, 3 for gradients). ``eps_acc`` is the epsilon of the dtype the kernels
accumulate in (fp32 for fp16/bf16/fp32 inputs, fp64 for fp64) and ``M`` is the magnitude of the
terms that were added up to make the result: for a sum ``sum_i t_i`` that is ``sum_i |t_i|``,
propagated to first order through every intermediate, times sqrt(n) for the longest reduction
length n (the typical growth of a float sum's error; the worst case is n) -- ``*_magnitudes``
below, one function per op, evaluated in float64 on the same inputs. A result that cancels to ~0 out of O(1) terms -- attention's dq at
seqlen 1, where ``dp - delta`` is exactly 0 in exact arithmetic -- is then held to the rounding
of those O(1) terms, which depends on the BLAS code path the CPU picks, and not to a fixed
1e-6 that passes on one machine and fails on another. The absolute term never depends on the
result's own size, so it cannot hide an error that is large compared with the rounding.
On failure the message names the tensor, the worst element, its index and both bounds.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["assert_close", "assert_within_pytorch_error", "assert_matches_reference", "max_abs_diff",
           "sdpa_bthd", "rounding_atol", "accumulation_eps", "attention_magnitudes",
           "layer_norm_magnitudes", "rms_norm_magnitudes", "gelu_ffn_magnitudes", "gated_ffn_magnitudes",
           "ROUNDING_FACTOR"]

# How many eps_acc * M a kernel may be off beyond PyTorch's own error. Measured over every test
# that uses this rule on the CPU (the whole suite, fuzz included; cpu, reference and triton
# backends; with 1 thread, and with 2 on a loaded machine): the most any result needed was 0.39
# (the fuzz's float64 LayerNorm at N = 7), 0.13 in fp32 (cpu LayerNorm at N = 1000); attention's
# dq at seqlen 1 needed 0.005. 4 is 10x the worst, and still far below the error of a real bug
# (a wrong mask, a lost tile: 1e-3..1).
ROUNDING_FACTOR = 4.0


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
    diff[nan_a | (a == e)] = 0.0  # NaN where expected; equal infinities (inf - inf is NaN) match
    # any other NaN difference is inf against a finite value or the opposite inf: an infinite error
    diff[torch.isnan(diff)] = float("inf")
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


# --------------------------------------------------------------------------- term magnitudes

def accumulation_eps(dtype: torch.dtype) -> float:
    """Machine epsilon of the accumulation dtype of a kernel taking ``dtype`` inputs."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def rounding_atol(magnitude: float, dtype: torch.dtype, factor: float = ROUNDING_FACTOR) -> float:
    """The absolute term of the tolerance rule: ``factor * eps_acc(dtype) * magnitude``."""
    return factor * accumulation_eps(dtype) * float(magnitude)


def _max(t: torch.Tensor | None) -> float | None:
    if t is None:
        return None
    return float(t.abs().max()) if t.numel() else 0.0


def _f64(*tensors):
    return [None if t is None else t.detach().to(torch.float64) for t in tensors]


def attention_magnitudes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor | None,
                         causal: bool = True, softmax_scale: float | None = None, *,
                         window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                         alibi_slopes: torch.Tensor | None = None) -> list[float | None]:
    """Magnitudes ``[out, dq, dk, dv]`` of the terms attention sums, q/k/v/dout (B, T, H, D),
    each the max over its tensor, times sqrt(max(headdim, seqlens)).

    s = scale q.k has terms of size S = scale |q|.|k|, which is also the absolute error of s in
    units of eps, so p = exp(s - lse) is relatively off by eps * S. Hence
    out: (p (1 + S)) |v|;  dv: (p (1 + S))^T |dO|;  ds = p (dp - delta) with dp = dO.v and
    delta = dO.o: p (|dO|.|v| + |dO|.|o| + |dp - delta| S);  dq: scale |ds| |k|;  dk: scale |ds|^T |q|.
    The gradients are None when ``dout`` is None. The options (and GQA: k, v with fewer heads,
    dk, dv summed over each kv head's group) change p, the masks and the group sums; softcap and
    ALiBi add no terms of their own beyond S (|tanh| <= 1, the bias is exact in the inputs).
    """
    from .ops.attention import _expand_kv, _group_sum, _scores, normalise

    q, k, v, dout = _f64(q, k, v, dout)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    h, hk = q.shape[2], k.shape[2]
    qh, kh, vh = q.transpose(1, 2), _expand_kv(k, h), _expand_kv(v, h)   # (B, H, T, D)
    tq, tk = q.shape[1], k.shape[1]
    opts = normalise(causal, window_size, softcap, 0.0, tk)
    s, _ = _scores(q, k, opts, scale, alibi_slopes)
    big_s = abs(scale) * qh.abs() @ kh.abs().transpose(-1, -2)
    no_keys = (s == float("-inf")).all(-1, keepdim=True)
    p = torch.softmax(s, -1).masked_fill(no_keys, 0.0)
    p_mag = p * (1.0 + big_s)
    root_n = math.sqrt(max(q.shape[-1], tq, tk))
    out = [root_n * _max(p_mag @ vh.abs())]
    if dout is None:
        return out + [None, None, None]
    do = dout.transpose(1, 2)
    o = p @ vh
    dp = do @ vh.transpose(-1, -2)
    delta = (do * o).sum(-1, keepdim=True)
    ds_mag = p * (do.abs() @ vh.abs().transpose(-1, -2) + (do.abs() * o.abs()).sum(-1, keepdim=True)
                  + (dp - delta).abs() * big_s)
    grads = (abs(scale) * ds_mag @ kh.abs(), _group_sum(abs(scale) * ds_mag.transpose(-1, -2) @ qh.abs(), hk),
             _group_sum(p_mag.transpose(-1, -2) @ do.abs(), hk))
    return out + [root_n * _max(g) for g in grads]


def layer_norm_magnitudes(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                          dout: torch.Tensor | None, eps: float = 1e-5) -> list[float | None]:
    """Magnitudes ``[out, dx, dweight, dbias]`` of LayerNorm's terms over the last dim of x, each
    the max over its tensor, times sqrt(N) (sqrt(max(N, rows)) for the gradients).

    xhat = (x - mean) rstd is computed from terms of size X = (|x| + |mean|) rstd (the cancellation
    in x - mean); y = xhat w + b: X |w| + |b|; with g = dy w,
    dx = rstd (g - mean(g) - xhat mean(g xhat)):
    rstd (|g| + mean|g| + X mean(|g| |xhat|) + |xhat| mean(|g| X));
    dweight = sum_rows dy xhat: sum |dy| X; dbias = sum_rows |dy|. None for absent parameters.
    """
    x, weight, bias, dout = _f64(x, weight, bias, dout)
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    mean = x2.mean(-1, keepdim=True)
    rstd = torch.rsqrt((x2 - mean).pow(2).mean(-1, keepdim=True) + eps)
    big_x = (x2.abs() + mean.abs()) * rstd
    xhat = ((x2 - mean) * rstd).abs()
    w_abs = weight.abs() if weight is not None else torch.ones(n, dtype=torch.float64, device=x.device)
    y = big_x * w_abs + (bias.abs() if bias is not None else 0.0)
    if dout is None:
        return [math.sqrt(n) * _max(y), None, None, None]
    dy = dout.reshape(-1, n).abs()
    g = dy * w_abs
    dx = rstd * (g + g.mean(-1, keepdim=True) + big_x * (g * xhat).mean(-1, keepdim=True)
                 + xhat * (g * big_x).mean(-1, keepdim=True))
    root_n = math.sqrt(max(n, x2.shape[0]))
    return [root_n * _max(y), root_n * _max(dx),
            root_n * _max((dy * big_x).sum(0)) if weight is not None else None,
            root_n * _max(dy.sum(0)) if bias is not None else None]


def rms_norm_magnitudes(x: torch.Tensor, weight: torch.Tensor | None, dout: torch.Tensor | None,
                        eps: float = 1e-6, offset: float = 0.0) -> list[float | None]:
    """Magnitudes ``[out, dx, dweight]`` of RMSNorm's terms over the last dim of x, each the max over
    its tensor, times sqrt(N) (sqrt(max(N, rows)) for the gradients), as :func:`layer_norm_magnitudes`.

    xhat = x rstd (no cancellation: |xhat| itself); y = xhat w' with w' = offset + w, whose terms are
    |offset| + |w|; with
    g = dy w', dx = rstd (g - xhat mean(g xhat)): rstd (|g| + |xhat| mean(|g| |xhat|));
    dweight = sum_rows |dy| |xhat|. None for an absent weight.
    """
    x, weight, dout = _f64(x, weight, dout)
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    rstd = torch.rsqrt(x2.pow(2).mean(-1, keepdim=True) + eps)
    xhat = x2.abs() * rstd
    # the terms of offset + w: |offset| + |w| (their sum may cancel; each is rounded)
    w_abs = abs(offset) + weight.abs() if weight is not None else torch.ones(n, dtype=torch.float64, device=x.device)
    y = xhat * w_abs
    if dout is None:
        return [math.sqrt(n) * _max(y), None, None]
    dy = dout.reshape(-1, n).abs()
    g = dy * w_abs
    dx = rstd * (g + xhat * (g * xhat).mean(-1, keepdim=True))
    root_n = math.sqrt(max(n, x2.shape[0]))
    return [root_n * _max(y), root_n * _max(dx), root_n * _max((dy * xhat).sum(0)) if weight is not None else None]


def gelu_ffn_magnitudes(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                        b2: torch.Tensor | None, dout: torch.Tensor | None,
                        approximate: str = "tanh") -> list[float | None]:
    """Magnitudes ``[out, dx, dw1, db1, dw2, db2]`` of the GELU-FFN's terms (x (..., K), nn.Linear
    weights), each the max over its tensor, times sqrt of the longest reduction (K, H; rows too for
    the gradients).

    h = x w1^T + b1 has terms Sh = |x| |w1|^T + |b1| (its absolute error in eps); a = GELU(h):
    A = |a| + |GELU'(h)| Sh; out: A |w2|^T + |b2|. Backward, with dA = dy w2 (terms SdA = |dy| |w2|)
    and dh = dA GELU'(h): Dh = SdA |GELU'(h)| + |dA| Sh (|GELU''| <= 0.8 < 1);
    dx: Dh |w1|; dw1: Dh^T |x|; db1: sum Dh; dw2: |dy|^T A; db2: sum |dy|.
    """
    from .ops.gelu_ffn import gelu, gelu_grad

    x, w1, b1, w2, b2, dout = _f64(x, w1, b1, w2, b2, dout)
    x2 = x.reshape(-1, x.shape[-1])
    h = F.linear(x2, w1, b1)
    big_h = x2.abs() @ w1.abs().t() + (b1.abs() if b1 is not None else 0.0)
    dgelu = gelu_grad(h, approximate).abs()
    big_a = gelu(h, approximate).abs() + dgelu * big_h
    root_n = math.sqrt(max(x2.shape[1], w1.shape[0]))
    out = [root_n * _max(big_a @ w2.abs().t() + (b2.abs() if b2 is not None else 0.0))]
    if dout is None:
        return out + [None] * 5
    root_n = math.sqrt(max(x2.shape[0], x2.shape[1], w1.shape[0]))
    dy = dout.reshape(-1, dout.shape[-1])
    big_dh = (dy.abs() @ w2.abs()) * dgelu + (dy @ w2).abs() * big_h
    grads = (big_dh @ w1.abs(), big_dh.t() @ x2.abs(), big_dh.sum(0) if b1 is not None else None,
             dy.abs().t() @ big_a, dy.abs().sum(0) if b2 is not None else None)
    return out + [None if g is None else root_n * _max(g) for g in grads]


def gated_ffn_magnitudes(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor | None, w_down: torch.Tensor,
                         activation: str = "silu", b_gate: torch.Tensor | None = None, b_up: torch.Tensor | None = None,
                         b_down: torch.Tensor | None = None, dout: torch.Tensor | None = None) -> list[float | None]:
    """Magnitudes ``[out, dx, dw_gate, dw_up, dw_down, db_gate, db_up, db_down]`` of the gated FFN's
    terms (gptfast.gated_ffn's arguments, in its order; ``w_up=None``: fused gate_up ``w_gate``,
    whose dw_gate / db_gate then cover both halves and dw_up / db_up are None), each the max over
    its tensor, times sqrt of the longest reduction (K, H; rows too for the gradients). None for
    absent parameters, and for every gradient when ``dout`` is None.

    g = x w_gate^T + b_gate, u = x w_up^T + b_up have terms Sg = |x| |w_gate|^T + |b_gate| and Su
    (their absolute errors in eps); with c = act(g), c' = act'(g) (|act''| <= 1 for SiLU and both
    GELUs): a = c u: A = |c| |u| + |c'| Sg |u| + |c| Su; out: A |w_down|^T + |b_down|. Backward, with
    da = dy w_down (terms SdA = |dy| |w_down|): du = da c: Du = SdA |c| + |da| |c'| Sg;
    dg = da u c': Dg = SdA |u| |c'| + |da| Su |c'| + |da| |u| Sg; dx: Dg |w_gate| + Du |w_up|;
    dw_gate: Dg^T |x|; dw_up: Du^T |x|; db_gate, db_up: sum Dg, sum Du; dw_down: |dy|^T A;
    db_down: sum |dy|.
    """
    from .ops.gated_ffn import activation as act_fn, activation_grad

    fused = w_up is None
    x, w_gate, w_up, w_down, b_gate, b_up, b_down, dout = _f64(x, w_gate, w_up, w_down, b_gate, b_up, b_down, dout)
    if fused:
        w_gate, w_up = w_gate.chunk(2, 0)
        if b_gate is not None:
            b_gate, b_up = b_gate.chunk(2, 0)
    x2 = x.reshape(-1, x.shape[-1])
    g, u = F.linear(x2, w_gate, b_gate), F.linear(x2, w_up, b_up)
    big_g = x2.abs() @ w_gate.abs().t() + (b_gate.abs() if b_gate is not None else 0.0)
    big_u = x2.abs() @ w_up.abs().t() + (b_up.abs() if b_up is not None else 0.0)
    c, dc = act_fn(g, activation).abs(), activation_grad(g, activation).abs()
    big_a = c * u.abs() + dc * big_g * u.abs() + c * big_u
    root_n = math.sqrt(max(x2.shape[1], w_gate.shape[0]))
    out = [root_n * _max(big_a @ w_down.abs().t() + (b_down.abs() if b_down is not None else 0.0))]
    if dout is None:
        return out + [None] * 7
    root_n = math.sqrt(max(x2.shape[0], x2.shape[1], w_gate.shape[0]))
    dy = dout.reshape(-1, dout.shape[-1])
    s_da, da = dy.abs() @ w_down.abs(), (dy @ w_down).abs()
    big_du = s_da * c + da * dc * big_g
    big_dg = s_da * u.abs() * dc + da * big_u * dc + da * u.abs() * big_g
    dwg, dwu = big_dg.t() @ x2.abs(), big_du.t() @ x2.abs()
    dbg = big_dg.sum(0) if b_gate is not None else None
    dbu = big_du.sum(0) if b_up is not None else None
    if fused:
        dwg, dwu = torch.cat([dwg, dwu]), None
        dbg, dbu = (None if dbg is None else torch.cat([dbg, dbu])), None
    grads = (big_dg @ w_gate.abs() + big_du @ w_up.abs(), dwg, dwu, dy.abs().t() @ big_a, dbg, dbu,
             dy.abs().sum(0) if b_down is not None else None)
    return out + [None if t is None else root_n * _max(t) for t in grads]


def linear_cross_entropy_magnitudes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                    targets: torch.Tensor, dloss: torch.Tensor | None, *, ignore_index: int = -100,
                                    reduction: str = "mean", label_smoothing: float = 0.0) -> list[float | None]:
    """Magnitudes ``[loss, dx, dweight, dbias]`` of the fused linear cross-entropy's terms (x (M, K),
    weight (V, K), targets (M,), ``dloss`` the loss's incoming gradient: a scalar or (M,)), each
    the max over its tensor times sqrt of the longest reduction (K, V; M too for the gradients).

    The logits' terms Z = |x| |w|^T + |b| bound their absolute error in eps; the loss (lse, z_y and
    the mean of z are each 1-Lipschitz in the logits) has terms 2 max Z, scaled by the row's
    weight (1 / rows for "mean"). The logits' gradient dz = s (p - target distribution) has terms
    Dz = |s| (p + q) (1 + Z) (p the softmax, q the smoothed one-hot; p's relative error is Z's
    absolute one); dx: Dz |w|, dweight: Dz^T |x|, dbias: sum Dz.
    """
    x, weight, bias = _f64(x, weight, bias)
    x2, t = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    valid = t != ignore_index
    n = max(int(valid.sum()), 1)
    big_z = x2.abs() @ weight.abs().t() + (bias.abs() if bias is not None else 0.0)
    row = valid.double() / (n if reduction == "mean" else 1)
    loss = math.sqrt(max(x2.shape[1], weight.shape[0])) * 2 * _max(big_z * (row[:, None] if reduction != "none" else 1))
    if dloss is None:
        return [loss, None, None, None]
    s = valid.double() * dloss.double().abs().reshape(-1) if reduction == "none" else row * float(dloss.abs())
    p = torch.softmax(F.linear(x2, weight, bias), -1)
    q = torch.zeros_like(p).scatter_(1, torch.where(valid, t, 0)[:, None], 1.0) * (1 - label_smoothing)
    q += label_smoothing / weight.shape[0]
    big_dz = s[:, None] * (p + q) * (1 + big_z)
    root_n = math.sqrt(max(x2.shape[0], x2.shape[1], weight.shape[0]))
    grads = (big_dz @ weight.abs(), big_dz.t() @ x2.abs(), big_dz.sum(0) if bias is not None else None)
    return [loss] + [None if g is None else root_n * _max(g) for g in grads]


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor, pt: torch.Tensor, *, magnitude: float,
                             factor: float = 2.0, name: str = "tensor") -> None:
    """DESIGN.md's rule for a result of ``out.dtype``: ``max|out - ref| <= factor * max|pt - ref|
    + rounding_atol(magnitude, out.dtype)``; ``magnitude`` from the op's ``*_magnitudes``."""
    assert_within_pytorch_error(out, ref, pt, factor=factor, atol=rounding_atol(magnitude, out.dtype),
                                name=name)


def assert_results_match(out: torch.Tensor, ref: torch.Tensor, pt: torch.Tensor,
                         grads: tuple = (), ref_grads: tuple = (), pt_grads: tuple = (), *,
                         magnitudes: list[float | None], name: str = "") -> None:
    """An op's output (factor 2) and each input gradient (factor 3) against the float64 ground
    truth by :func:`assert_matches_reference`. ``magnitudes`` is ``[out, grad_0, grad_1, ...]`` as
    the op's ``*_magnitudes`` returns it; a gradient that is None (input without grad) is skipped."""
    assert_matches_reference(out, ref, pt, magnitude=magnitudes[0], factor=2, name=f"{name} out".strip())
    for i, (a, r, c) in enumerate(zip(grads, ref_grads, pt_grads)):
        if a is None:
            continue
        assert_matches_reference(a, r, c, magnitude=magnitudes[1 + i], factor=3,
                                 name=f"{name} grad[{i}]".strip())
