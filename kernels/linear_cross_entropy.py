"""Triton logits epilogue of the fused linear cross-entropy (gptfast.ops.linear_cross_entropy).

The chunk driver there runs the GEMMs (torch's, cuBLAS) and hands each chunk's fp32 logits
z (C, V) to this epilogue, which returns the per-row losses and, given ``row_scale``, overwrites
z in place with the gradient of sum(row_scale * losses) w.r.t. the raw logits:

    z' = softcap * tanh(z / softcap)   (or z)
    loss = lse(z') - (1 - eps) z'_y - eps mean_j z'_j
    dz  = row_scale * (softmax(z') - (1 - eps) onehot(y) - eps / V) * (1 - (z'/softcap)^2)

One program per row, two passes over it in ``BLOCK_V`` tiles: the first keeps a per-lane online
maximum and sum of exponentials (one read of z: no separate max pass) plus the row sum for label
smoothing; the second, only with a gradient to write, recomputes z' from z and stores dz over z.
Ignored rows (target == ignore_index) write loss 0 and, with a gradient, a zero row without
reading z. The loss's z'_y is one scalar load. Statistics are fp32 (z is fp32 for every input
dtype; this backend has no float64). tanh is kernels/attention.py's (no libdevice in the
interpreter).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.linear_cross_entropy import make_launchers
from .attention import _tanh

MAX_BLOCK_V = 4096  # tile width cap: 16 KB of fp32 per tile, 8 warps


def settings(v: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary of ``v``."""
    block = min(triton.next_power_of_2(max(v, 16)), MAX_BLOCK_V)
    return block, min(max(block // 512, 4), 8)


@triton.jit
def _ce_logits_kernel(
    Z,  # (C, V) fp32 logits, row stride stride_z; overwritten with dz when HAS_SCALE
    T,  # (C,) int64 targets
    Scale,  # (C,) fp32 row scales, or a dummy pointer without HAS_SCALE
    Loss,  # (C,) fp32 out
    stride_z, V,
    ignore_index,
    eps,  # label smoothing
    softcap,  # > 0 with HAS_SOFTCAP
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    y = tl.load(T + row)
    cols = tl.arange(0, BLOCK_V)
    if y == ignore_index:
        tl.store(Loss + row, 0.0)
        if HAS_SCALE:
            for start in range(0, V, BLOCK_V):
                c = start + cols
                tl.store(z_row + c, tl.zeros([BLOCK_V], dtype=tl.float32), mask=c < V)
    else:
        m = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
        s = tl.zeros([BLOCK_V], dtype=tl.float32)
        total = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            c = start + cols
            mask = c < V
            z = tl.load(z_row + c, mask=mask, other=0.0)
            if HAS_SOFTCAP:
                z = softcap * _tanh(z / softcap)
            if HAS_SMOOTHING:
                total += tl.where(mask, z, 0.0)
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, z)
            live = m_new > float("-inf")  # a lane that has seen no column yet keeps s = 0
            s = tl.where(live, s * tl.exp(m - m_new) + tl.exp(z - m_new), 0.0)
            m = m_new
        mx = tl.max(m, 0)
        lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), 0))
        zy = tl.load(z_row + y)
        if HAS_SOFTCAP:
            zy = softcap * _tanh(zy / softcap)
        loss = lse - (1.0 - eps) * zy
        if HAS_SMOOTHING:
            loss -= eps * tl.sum(total, 0) / V
        tl.store(Loss + row, loss)
        if HAS_SCALE:
            scale = tl.load(Scale + row)
            for start in range(0, V, BLOCK_V):
                c = start + cols
                mask = c < V
                z = tl.load(z_row + c, mask=mask, other=0.0)
                if HAS_SOFTCAP:
                    t = _tanh(z / softcap)
                    z = softcap * t
                g = tl.exp(z - lse) - tl.where(c == y, 1.0 - eps, 0.0)
                if HAS_SMOOTHING:
                    g -= eps / V
                g *= scale
                if HAS_SOFTCAP:
                    g *= 1.0 - t * t
                tl.store(z_row + c, g, mask=mask)


def cross_entropy_logits(z: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor | None,
                         ignore_index: int, label_smoothing: float, softcap: float) -> torch.Tensor:
    """The epilogue contract (gptfast.ops.linear_cross_entropy.cross_entropy_logits_reference):
    z (C, V) fp32 contiguous rows, targets (C,) int64, row_scale (C,) fp32 or None -> losses (C,) fp32."""
    if z.dtype != torch.float32:
        raise NotImplementedError(f"gptfast.linear_cross_entropy: the triton backend's logits are float32, "
                                  f"got {z.dtype}")
    c, v = z.shape
    losses = torch.empty(c, dtype=torch.float32, device=z.device)
    if c == 0:
        return losses
    block, warps = settings(v)
    targets = targets.contiguous()
    scale = row_scale.contiguous() if row_scale is not None else losses  # dummy pointer without a scale
    _ce_logits_kernel[(c,)](
        z, targets, scale, losses, z.stride(0), v, int(ignore_index), float(label_smoothing),
        float(softcap) if softcap else 1.0,
        HAS_SCALE=row_scale is not None, HAS_SOFTCAP=bool(softcap), HAS_SMOOTHING=bool(label_smoothing),
        BLOCK_V=block, num_warps=warps)
    return losses


linear_cross_entropy_forward, linear_cross_entropy_backward = make_launchers(cross_entropy_logits)
