"""The attention-dropout random number generator: Philox 4x32-10 and the dropout-mask layout.

This file is the one definition every backend (reference, cpu, triton, cuda) implements bit for bit:
the keep bit of attention-score element (b, h, i, j) is a pure function of (seed, offset, b, h, i, j,
nheads, p), so the backward regenerates the forward's mask (it is never stored) and a kernel's dropout
is checked exactly against this reference.

Generator
---------
Philox 4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC'11;
the Random123 library): a keyed bijection of a 128-bit counter (c0, c1, c2, c3) of uint32 words under
a 64-bit key (k0, k1). One round, with multipliers M0 = 0xD2511F53, M1 = 0xCD9E8D57 and
hi/lo = the upper/lower 32 bits of the 64-bit product of two uint32s:

    (c0, c1, c2, c3) <- (hi(M1*c2) ^ c1 ^ k0,  lo(M1*c2),  hi(M0*c0) ^ c3 ^ k1,  lo(M0*c0))

Ten rounds; between consecutive rounds the key is bumped by the Weyl constants, k0 += 0x9E3779B9,
k1 += 0xBB67AE85 (mod 2^32); the first round uses the key as given. The output is the final
(c0, c1, c2, c3). This is Random123's ``philox4x32_R(10, ctr, key)``, curand's Philox4_32_10 and
Triton's ``tl.philox``; the tests check Random123's known-answer vectors.

Here it is written in int64 torch ops only, so it runs unchanged on CPU and CUDA tensors. A 32x32-bit
product needs 64 unsigned bits, which int64 cannot hold; it is split instead: with M = Mh*2^16 + Ml
(16-bit halves), x*Ml and x*Mh are < 2^48 and recombine into hi/lo without ever leaving [0, 2^63)
(``_mulhilo``), so no step relies on signed overflow or arithmetic right shifts.

Dropout-mask layout
-------------------
Inputs: ``seed`` and ``offset``, 64-bit unsigned (Python ints, taken mod 2^64); ``offset`` is a
multiple of 4 (PyTorch's CUDA generator only hands out such offsets). For the score matrix of one
attention call, shape (batch, nheads, seqlen_q, seqlen_k), with i the query row and j the key column
as that call indexes them:

    key      k0 = seed mod 2^32             k1 = seed >> 32           (the 64-bit seed, low word first)
    group    g  = j // 4                    (one Philox call per 4 consecutive columns of one row)
    n        = offset / 4 + g               (< 2^62 + 2^32: never wraps 64 bits)
    counter  c0 = n mod 2^32   c1 = n >> 32   c2 = i   c3 = b * nheads + h
    draw     r  = philox4x32_10((c0, c1, c2, c3), (k0, k1))[j % 4]       (output word m -> column 4g+m)
    keep     r >= floor(p * 2^32)           (unsigned 32-bit compare; threshold computed on the host)

A ragged last group (seqlen_k not a multiple of 4) computes all 4 words and uses the first ones.
Nothing depends on seqlen_q, seqlen_k or batch: a mask is a slice of the same infinite grid, so any
tiling computes the same bits. Limits: b * nheads + h < 2^32 and i < 2^32 (checked).

Why this layout: it is exactly curand's / PyTorch's convention, where (c0, c1) is the 64-bit
position in the stream and (c2, c3) the 64-bit subsequence. Element (b, h, i, j) is component j % 4
of the first ``curand4`` after ``curand_init(seed, subsequence = (b*nheads + h) << 32 | i,
offset + 4*(j // 4))``: a call owns stream positions [offset/4, offset/4 + ceil(seqlen_k/4)) of
every subsequence of its key. Within one call, distinct (b, h, i, j // 4) give distinct counters, and
Philox is a bijection of counters. Across calls, ``dropout_rng_state`` gives each call its own
random 64-bit key with offset 0 (rather than reserving offsets of PyTorch's CUDA Philox generator,
as FlashAttention does: that reservation is a host-side call that neither torch.compile nor a CUDA
graph can record); a caller that does reserve (seed, offset) pairs can pass them instead.

Threshold: u = r * 2^-32 is uniform on [0, 1) in steps of 2^-32. The rule keeps iff u >= p', where
p' = floor(p * 2^32) * 2^-32 is p rounded down to that grid; P(keep) = 1 - p' is within 2^-32 of
1 - p, p = 0 keeps everything, and p must be < 1 (as FlashAttention), so the threshold fits in
uint32. ``p * 2^32`` is exact in double precision, so compute the threshold from the double p on the
host and pass it to kernels as an integer; a float32 p would give another threshold. Kept values are
scaled by ``keep_scale(p) = 1 / (1 - p)``.

For a kernel engineer (Triton): ``r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)`` with ``seed``
the 64-bit seed (int64 bits) and the uint32 words above; C++/CUDA: write the round above on uint32
(``__umulhi`` / a 64-bit product) or use curand as described.

(seed, offset) come from torch's default generator of the device (``dropout_rng_state``: a fresh
random 64-bit seed per call and offset 0, as a tensor on the device), so ``torch.manual_seed``
reproduces a run, and ``torch.compile`` and CUDA-graph capture can record the draw.
"""
from __future__ import annotations

import math
import operator

import torch

__all__ = ["philox4x32_10", "dropout_threshold", "keep_scale", "dropout_bits", "dropout_keep_mask",
           "dropout_mask_like", "dropout_rng_state", "rng_state_values", "PHILOX_M0", "PHILOX_M1", "PHILOX_W0",
           "PHILOX_W1"]

PHILOX_M0 = 0xD2511F53  # round multipliers (Random123 PHILOX_M4x32_0/1)
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9  # Weyl key increments: golden ratio and sqrt(3) - 1, as 0.32 fixed point
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
_TWO32 = 1 << 32


def _word(x, what: str):
    """A uint32 word as int64 (tensor) or int, reduced mod 2^32."""
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(f"gptfast.philox4x32_10: {what} must be an integer tensor, got {x.dtype}")
        return x.to(torch.int64) & _MASK32
    return operator.index(x) & _MASK32


def _mulhilo(m: int, x):
    """(hi, lo) 32-bit halves of m * x for a uint32 constant m and uint32 values x (int64 or int).

    Every intermediate stays in [0, 2^49) except hi, which is < 2^32: int64 never overflows.
    """
    p_lo = x * (m & 0xFFFF)               # < 2^48
    p_hi = x * (m >> 16)                  # < 2^48; m * x = p_hi * 2^16 + p_lo
    t = ((p_hi & 0xFFFF) << 16) + p_lo    # < 2^49;  m * x = (p_hi >> 16) * 2^32 + t
    return (p_hi >> 16) + (t >> 32), t & _MASK32


def philox4x32_10(counter, key):
    """Philox 4x32-10 of ``counter`` under ``key``, vectorised with broadcasting.

    counter: 4 words (int64 tensors of any broadcastable shapes and one device, or Python ints),
    values in [0, 2^32) (others are taken mod 2^32). key: 2 words, tensors or ints. Returns the 4
    output words as int64 tensors of the broadcast shape with values in [0, 2^32) (ints when every
    input is an int). Matches Random123's ``philox4x32_R(10, ctr, key)`` word for word.
    """
    if len(counter) != 4 or len(key) != 2:
        raise ValueError(f"gptfast.philox4x32_10: counter needs 4 words and key 2, got "
                         f"{len(counter)} and {len(key)}")
    c0, c1, c2, c3 = (_word(c, f"counter[{n}]") for n, c in enumerate(counter))
    k0, k1 = (_word(k, f"key[{n}]") for n, k in enumerate(key))
    for r in range(PHILOX_ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _index(fn: str, name: str, v, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise TypeError(f"gptfast.{fn}: {name} must be an int, got {type(v).__name__}")
    v = operator.index(v)
    if v < lo or (hi is not None and v > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"gptfast.{fn}: {name} must be {bound}, got {v}")
    return v


def _check_p(fn: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"gptfast.{fn}: p must be a float, got {type(p).__name__}")
    p = float(p)
    if not 0.0 <= p < 1.0:  # also rejects NaN
        raise ValueError(f"gptfast.{fn}: p must be in [0, 1), got {p}")
    return p


def dropout_threshold(p: float) -> int:
    """floor(p * 2^32) for a dropout probability p in [0, 1): keep iff the uint32 draw >= this."""
    return math.floor(_check_p("dropout_threshold", p) * _TWO32)  # exact: a power-of-two scale


def keep_scale(p: float) -> float:
    """1 / (1 - p), the factor applied to kept attention probabilities (p in [0, 1))."""
    return 1.0 / (1.0 - _check_p("keep_scale", p))


def dropout_bits(seed: int, offset: int, batch: int, nheads: int, seqlen_q: int, seqlen_k: int,
                 device: torch.device | str | None = None, batch_start: int = 0) -> torch.Tensor:
    """The uint32 draws r of the layout in the module docstring, as int64 (batch, nheads, seqlen_q, seqlen_k).

    ``batch_start`` offsets the batch index: the result is batch entries batch_start ..
    batch_start + batch - 1 (a variable-length call draws sequence b's mask as batch entry b).
    A reference: materialises O(batch * nheads * seqlen_q * seqlen_k) int64 values.
    """
    fn = "dropout_bits"
    seed = _index(fn, "seed", seed, -(1 << 63), _MASK64) & _MASK64       # int64 bits are welcome
    offset = _index(fn, "offset", offset, -(1 << 63), _MASK64) & _MASK64
    if offset % 4:
        raise ValueError(f"gptfast.{fn}: offset must be a multiple of 4 (a position in the Philox "
                         f"stream counted in 32-bit values, as torch's CUDA generator does), got {offset}")
    batch, nheads, seqlen_q, seqlen_k, batch_start = (_index(fn, n, v, 0) for n, v in (
        ("batch", batch), ("nheads", nheads), ("seqlen_q", seqlen_q), ("seqlen_k", seqlen_k),
        ("batch_start", batch_start)))
    if (batch_start + batch) * nheads > _TWO32:
        raise ValueError(f"gptfast.{fn}: batch * nheads must be <= 2^32 (counter word 3), got "
                         f"{batch_start + batch} * {nheads}")
    if seqlen_q > _TWO32:
        raise ValueError(f"gptfast.{fn}: seqlen_q must be <= 2^32 (counter word 2), got {seqlen_q}")
    device = torch.device("cpu") if device is None else torch.device(device)
    ngroups = -(-seqlen_k // 4)
    arange = lambda n: torch.arange(n, dtype=torch.int64, device=device)  # noqa: E731
    n = (offset >> 2) + arange(ngroups).view(1, 1, ngroups)   # < 2^62 + 2^32: fits int64
    rows = arange(seqlen_q).view(1, seqlen_q, 1)
    bh = (batch_start * nheads + arange(batch * nheads)).view(batch * nheads, 1, 1)
    words = philox4x32_10((n & _MASK32, n >> 32, rows, bh), (seed & _MASK32, seed >> 32))
    words = torch.broadcast_tensors(*words)                    # (B*H, Tq, G) each
    bits = torch.stack(words, dim=-1).reshape(batch * nheads, seqlen_q, 4 * ngroups)  # word m -> 4g+m
    return bits[..., :seqlen_k].reshape(batch, nheads, seqlen_q, seqlen_k)


def dropout_keep_mask(seed: int, offset: int, batch: int, nheads: int, seqlen_q: int, seqlen_k: int,
                      p: float, device: torch.device | str | None = None, batch_start: int = 0) -> torch.Tensor:
    """Bool (batch, nheads, seqlen_q, seqlen_k): True where score (b, h, i, j) is kept at dropout p.

    Kept iff ``dropout_bits(...)[b, h, i, j] >= floor(p * 2^32)``; see the module docstring for
    the exact counter/key layout every backend follows. p in [0, 1); p = 0 keeps everything.
    """
    threshold = math.floor(_check_p("dropout_keep_mask", p) * _TWO32)
    return dropout_bits(seed, offset, batch, nheads, seqlen_q, seqlen_k, device, batch_start) >= threshold


dropout_mask_like = dropout_keep_mask  # the name backends' tests use for "the reference mask"


def dropout_rng_state(device: torch.device | str) -> torch.Tensor:
    """This call's dropout generator state: an int64 tensor ``[seed, offset]`` on ``device``.

    ``seed`` is 64 fresh random bits from torch's default generator of ``device`` (two 32-bit
    ``torch.randint`` draws, low word first, combined with tensor ops) and ``offset`` is 0: every
    call gets its own Philox key, so two calls share counters only if their 64-bit keys collide
    (probability ~n^2 / 2^65 over n calls). The state is drawn with tensor ops only, on the device
    of the data, so that

    - ``torch.manual_seed`` reproduces a run, and a call advances the generator as PyTorch's own
      random ops do (a CUDA graph replay therefore draws fresh keys, as F.dropout does);
    - ``torch.compile(fullgraph=True)`` traces it (no Python int leaves the graph; compiled code
      draws from inductor's generator, so its keys differ from eager's for the same seed, as with
      F.dropout), and CUDA-graph capture records it;
    - kernels read the key from the tensor: on the device, without a host synchronisation.

    The int64 values are the 64-bit patterns (a seed >= 2^63 reads as negative).
    """
    device = torch.device(device)
    words = torch.randint(0, _TWO32, (2,), dtype=torch.int64, device=device)
    seed = words[0] | (words[1] << 32)  # wraps into the sign bit: the same 64 bits
    return torch.stack([seed, torch.zeros_like(seed)])


def rng_state_values(rng_state: torch.Tensor) -> tuple[int, int]:
    """(seed, offset) of an rng_state as unsigned 64-bit Python ints (reads the tensor)."""
    if not isinstance(rng_state, torch.Tensor) or rng_state.dtype != torch.int64 or rng_state.numel() != 2:
        raise ValueError("gptfast.rng_state_values: rng_state must be an int64 tensor [seed, offset], got "
                         f"{rng_state!r:.80}")
    seed, offset = rng_state.tolist()
    return seed & _MASK64, offset & _MASK64
