"""Backend registry: (op, backend) -> forward/backward launchers, and backend selection.

Every backend of an op exposes the same two launchers. They take tensors and return tensors;
they never build autograd graphs (the op's custom op and its registered autograd formula do
that, in ``gptfast/ops/<op>.py``) and they may assume their inputs were validated there.
Outputs are fresh, contiguous tensors (never views of inputs): ``torch.library`` requires it and
the fake implementations promise it.

Launcher contract
-----------------
attention (q, k, v: (batch, seqlen, nheads, headdim), one dtype, one device, stride(-1) == 1,
seqlen stride >= headdim (no broadcast or overlapping rows), batch/head strides arbitrary;
seqlen_q == seqlen_k)::

    attention_forward(q, k, v, causal: bool, softmax_scale: float)
        -> out (batch, seqlen, nheads, headdim), q.dtype, contiguous
           lse (batch, nheads, seqlen), float32 (float64 for float64 inputs):
               log(sum_j exp(scale * q_i.k_j)) over unmasked j
    attention_backward(dout, q, k, v, out, lse, causal: bool, softmax_scale: float,
                       deterministic: bool = False)
        -> dq, dk, dv   (shapes and dtypes of q, k, v)
           deterministic: no atomics, bitwise reproducible (backends without atomics ignore it)

    A row with no unmasked key (impossible for causal self-attention with seqlen_q == seqlen_k)
    has out = 0, lse = -inf and zero gradients.

    An implementation that declares ``features`` (ATTENTION_FEATURES) takes k, v of shape
    (batch, seqlen_k, nheads_k, headdim) and, for a call that uses any feature, the keywords
    ``window=(left, right)`` (normalised: right = 0 when causal), ``softcap`` (0: none),
    ``alibi_slopes`` (float32 (nheads,) / (batch, nheads) or None), ``dropout_p`` and
    ``rng_state`` (int64 tensor [seed, offset] of gptfast.ops._philox's mask, on the CPU or q's
    device, or None) on both launchers; dk, dv are summed over each kv head's query heads. A call
    without features passes none of them, so a kernel that implements none keeps the signatures
    above.

    An implementation with the ``varlen`` layout feature takes packed q (total_q, nheads, headdim)
    and k, v (total_k, nheads_k, headdim) with the keyword ``varlen=(cu_seqlens_q, cu_seqlens_k,
    max_seqlen_q, max_seqlen_k)`` (int32 (batch + 1,) prefix sums on q's device, two ints) and every
    option keyword, on both launchers (the backward takes ``deterministic`` positionally); it
    returns out (total_q, nheads, headdim) and lse (nheads, total_q) (gptfast.ops.varlen).

layer_norm (x: (..., N) contiguous, its M rows the leading dimensions flattened (any number,
including none: (N,) is one row); weight, bias: (N,) contiguous or None, dtype of x; y, s, dy,
dx, residual and dresidual have x's shape, written (M, N) below)::

    layer_norm_forward(x, weight, bias, eps: float)
        -> y (M, N) x.dtype, mean (M,), rstd (M,): float32 (float64 for float64 inputs)
    layer_norm_backward(dy, x, weight, mean, rstd, has_bias: bool)
        -> dx (M, N) x.dtype, dweight (N,) or None (when weight is None), dbias (N,) or None

    Fused residual add (FlashAttention's ``layer_norm_fn(..., residual=r, prenorm=True)``), with
    the keyword ``residual`` (M, N) contiguous, dtype of x, on the forward::

    layer_norm_forward(x, weight, bias, eps, residual=r)
        -> y, mean, rstd as above for s = x + r rounded to x.dtype, and s (M, N) x.dtype:
           one pass that reads x and r and writes s and y (s is normalised as rounded, so the
           result is the unfused ``layer_norm(x + r)``'s)

    and the keyword ``dresidual`` (M, N) contiguous, dtype of x, or None, on the backward, which
    is then given the saved s as its ``x``::

    layer_norm_backward(dy, s, weight, mean, rstd, has_bias, dresidual=ds)
        -> dx + ds (accumulated in fp32, rounded once), dweight, dbias: the gradient of s, which
           is that of both x and r (ds is the gradient of the returned s, the residual stream)

gelu_ffn (x: (M, K) contiguous; w1: (H, K), w2: (N, H) in nn.Linear layout, any strides;
b1: (H,) or None, b2: (N,) or None, contiguous; all of x's dtype; approximate in {"tanh", "none"})::

    gelu_ffn_forward(x, w1, b1, w2, b2, approximate: str)
        -> out (M, N) x.dtype, h (M, H) x.dtype: the pre-activation x @ w1.T + b1
    gelu_ffn_backward(dout, x, h, w1, w2, has_b1: bool, has_b2: bool, approximate: str)
        -> dx, dw1, db1 or None, dw2, db2 or None

    GELU(h) is recomputed from h in the backward, never saved.

gated_ffn (x: (M, K) contiguous; w_gate, w_up: (H, K), w_down: (N, H) in nn.Linear layout, any
strides; b_gate, b_up: (H,) or None, b_down: (N,) or None, contiguous; all of x's dtype;
activation in {"silu", "gelu_tanh", "gelu"})::

    gated_ffn_forward(x, w_gate, b_gate, w_up, b_up, w_down, b_down, activation: str)
        -> out (M, N) x.dtype,
           g (M, H) x.dtype: the gate pre-activation x @ w_gate.T + b_gate,
           u (M, H) x.dtype: the up projection x @ w_up.T + b_up
           a = act(g) * u is evaluated in fp32 from g, u as rounded to x.dtype, rounded once to
           x.dtype, and out = a @ w_down.T + b_down.
    gated_ffn_backward(dout, x, g, u, w_gate, w_up, w_down, has_b_gate: bool, has_b_up: bool,
                       has_b_down: bool, activation: str)
        -> dx, dw_gate, db_gate or None, dw_up, db_up or None, dw_down, db_down or None
           da = dout @ w_down (fp32 acc), dw_down = dout.T @ a (a recomputed from g, u, rounded to
           x.dtype as in the forward), dg = da * u * act'(g), du = da * act(g) (fp32, each rounded
           once to x.dtype), dw_gate = dg.T @ x, dw_up = du.T @ x, dx = dg @ w_gate + du @ w_up,
           db_* = column sums (fp32 acc) of dg / du / dout.

    act(g) * u is recomputed from g and u in the backward, never saved. (The fused (2H, K)
    gate_up weight of the public op arrives here as its two row-slice views.)

rms_norm (x: (..., N) contiguous, its M rows the leading dimensions flattened; weight: (N,)
contiguous or None, dtype of x; offset: float added to the weight (Gemma: 1.0); y, s, dy, dx,
residual and dresidual have x's shape)::

    rms_norm_forward(x, weight, eps: float, offset: float)
        -> y x.dtype = x * rstd * (offset + weight) rounded once, rstd (M,) = 1/sqrt(mean(x^2) + eps):
           float32 (float64 for float64 inputs)
    rms_norm_backward(dy, x, weight, rstd, offset: float)
        -> dx x.dtype, dweight (N,) or None (when weight is None)

    with the fused residual add as layer_norm's: ``residual=r`` on the forward (then s third,
    rounded to x.dtype, normalised as rounded) and ``dresidual=ds`` on the backward (given s as x;
    dx + ds accumulated in fp32, rounded once).

kvcache (decoding over a KV cache, forward only: gptfast.ops.kvcache; q (B, Tq, H, D) contiguous;
k_cache, v_cache (B_cache, T_cache, Hk, D), or paged (num_blocks, page_block_size, Hk, D), one
shape, stride(-1) == 1; int32 contiguous tensors on q's device)::

    kvcache_forward(q, k_cache, v_cache, block_table, cache_batch_idx, key_start, key_end,
                    softmax_scale: float, window_left: int, window_right: int, softcap: float,
                    alibi_slopes, num_splits: int)
        -> out (B, Tq, H, D) q.dtype, lse (B, H, Tq) float32 (float64 for float64 inputs)

    Sequence b attends to the cache positions key_start[b] .. key_end[b] - 1 (Tk_b keys, none
    when key_end <= key_start) of cache row cache_batch_idx[b] (None: b), or through block_table
    (B, max_blocks) (None: contiguous) -- read in place, never gathered -- with the dense options'
    semantics over (Tq, Tk_b); the window is normalised (right = 0 when causal). num_splits: key
    chunks per (sequence, head) a kernel may reduce in parallel (0: its heuristic); the result
    does not depend on it beyond rounding.

``dout``/``dy`` arrive contiguous for layer_norm, gelu_ffn and gated_ffn, and laid out like q for attention
(stride(-1) == 1, seqlen stride >= headdim: no broadcast or overlapping rows).
The backend is resolved when an op runs (the forward and, again, the backward), so a compiled
model follows the selection rules at run time; every backend honours this same contract, so a
backward on another backend than its forward (say, forward inside ``use_backend`` and backward
outside it) is still correct.

Selection
---------
The backend for a call is, in order: the ``backend=`` argument, the innermost
``gptfast.use_backend(name)`` context, the ``GPTFAST_BACKEND`` environment variable, else
``"auto"``. An explicit name that cannot run on the inputs raises; ``"auto"`` walks
``AUTO_ORDER`` for the device, skipping backends that do not exist for the op or do not support
the dtype silently, and backends that should work but cannot load with one warning.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

OPS = ("attention", "layer_norm", "gelu_ffn")
# Training ops of other decoders' blocks (the Llama family's), not used by gptfast's GPT (so
# `gptfast train --backend` does not require them); registered per backend as their kernels land.
EXTRA_OPS = ("rms_norm", "linear_cross_entropy", "gated_ffn")
# Forward-only inference ops (no backward launcher); not called in training, so `gptfast train
# --backend` does not require them. cuda has no kvcache kernel: auto routes around it.
DECODE_OPS = ("kvcache",)
ALL_OPS = OPS + EXTRA_OPS + DECODE_OPS
# The ops each kernel backend implements (the reference implements ALL_OPS).
TRITON_OPS = OPS + ("rms_norm", "linear_cross_entropy", "gated_ffn") + DECODE_OPS  # kernels/<op>.py
CPU_OPS = OPS + ("rms_norm", "linear_cross_entropy", "gated_ffn") + DECODE_OPS  # csrc/cpu/
CUDA_OPS = OPS + ("rms_norm", "linear_cross_entropy", "gated_ffn")  # csrc/cuda/
BACKENDS = ("reference", "triton", "cuda", "cpu")

# Fastest first. Triton is never auto-selected on the CPU: there it runs in the interpreter,
# which is for testing only (orders of magnitude slower than the reference).
AUTO_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}
_DEFAULT_ORDER = ("reference",)

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Per-call features of attention beyond equal-length multi-head self-attention, by the name an
# error message gives them (gptfast.ops.attention computes which ones a call uses). A backend
# declares those it implements: ``auto`` picks the first backend that implements all of a call's,
# an explicit backend lacking one raises NotImplementedError naming it.
ATTENTION_FEATURES = ("gqa", "seqlen_q != seqlen_k", "window_size", "softcap", "alibi_slopes", "dropout_p")
# Call layouts beyond the dense (batch, seqlen, nheads, headdim) one: "varlen" is packed
# variable-length sequences (gptfast.ops.varlen; launchers get the ``varlen`` keyword).
LAYOUT_FEATURES = ("varlen",)
# What each kernel backend's attention implements (the reference implements all of them).
KERNEL_ATTENTION_FEATURES: dict[str, frozenset[str]] = {
    "cpu": frozenset(ATTENTION_FEATURES + LAYOUT_FEATURES),  # csrc/cpu/attention.cpp; tests/test_cpu_attention_options.py, tests/test_varlen.py
    "triton": frozenset(ATTENTION_FEATURES + LAYOUT_FEATURES),  # kernels/attention.py; tests/test_triton_attention_options.py, tests/test_triton_varlen.py
    "cuda": frozenset(ATTENTION_FEATURES + LAYOUT_FEATURES),  # csrc/cuda/attention.cu; tests/test_cuda_emulated.py, tests/gpu
}
# The reference backend also takes float64 so that torch.autograd.gradcheck can check it.
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)


def _always(device: torch.device) -> str | None:
    return None


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    # Cached: a failed import is retried by Python on every attempt, and this runs on every op call.
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def _triton_requirement(device: torch.device) -> str | None:
    error = _triton_import_error()
    if error is not None:
        return error
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "triton runs on CPU tensors only under TRITON_INTERPRET=1 (testing only)"
    return None


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op."""

    op: str
    backend: str
    devices: tuple[str, ...]
    module: str
    fwd_name: str
    bwd_name: str
    dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES
    requirement: Callable[[torch.device], str | None] = field(default=_always, compare=False)
    note: str = ""
    features: frozenset[str] = frozenset()  # ATTENTION_FEATURES this implementation supports

    def missing(self, features: frozenset[str]) -> list[str]:
        """The features of a call that this implementation lacks, in ATTENTION_FEATURES order."""
        return [f for f in ATTENTION_FEATURES + LAYOUT_FEATURES if f in features and f not in self.features]

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when this implementation can run on ``device``, else why not."""
        if device.type not in self.devices:
            return f"runs on {'/'.join(self.devices)}, not {device.type}"
        return self.requirement(device)


@dataclass(frozen=True)
class Launchers:
    backend: str
    fwd: Callable
    bwd: Callable


_REGISTRY: dict[tuple[str, str], Impl] = {}
_LOADED: dict[tuple[str, str], Launchers] = {}
_WARNED: set[tuple[str, str, str]] = set()
_CONTEXT: contextvars.ContextVar[str | None] = contextvars.ContextVar("gptfast_backend", default=None)


def register(impl: Impl) -> None:
    if impl.op not in ALL_OPS:
        raise ValueError(f"unknown op {impl.op!r}; ops are {ALL_OPS}")
    if impl.backend not in BACKENDS:
        raise ValueError(f"unknown backend {impl.backend!r}; backends are {BACKENDS}")
    _REGISTRY[(impl.op, impl.backend)] = impl
    _LOADED.pop((impl.op, impl.backend), None)


def _bwd_name(op: str, name: str) -> str:
    return "" if op in DECODE_OPS else name


for _op in ALL_OPS:
    register(Impl(
        op=_op, backend="reference", devices=("cpu", "cuda"), module=f"gptfast.ops.{_op}",
        fwd_name=f"{_op}_forward_reference", bwd_name=_bwd_name(_op, f"{_op}_backward_reference"),
        dtypes=REFERENCE_DTYPES, note="pure PyTorch, explicit backward",
        features=frozenset(ATTENTION_FEATURES + LAYOUT_FEATURES) if _op == "attention" else frozenset(),
    ))
for _op in TRITON_OPS:
    register(Impl(
        op=_op, backend="triton", devices=("cuda", "cpu"), module=f"gptfast.kernels.{_op}",
        fwd_name=f"{_op}_forward", bwd_name=_bwd_name(_op, f"{_op}_backward"),
        requirement=_triton_requirement, note="Triton kernels (CPU: interpreter, for tests)",
        features=KERNEL_ATTENTION_FEATURES["triton"] if _op == "attention" else frozenset(),
    ))


def _cpu_requirement(device: torch.device) -> str | None:
    # Builds the extension on the first call and caches the outcome (gptfast._build): later calls,
    # one per op call under auto, only read the cached result.
    from .. import _build
    return _build.unavailable_reason("cpu")


for _op in CPU_OPS:
    register(Impl(
        op=_op, backend="cpu", devices=("cpu",), module="gptfast.ops._cpu",
        fwd_name=f"{_op}_forward", bwd_name=_bwd_name(_op, f"{_op}_backward"), dtypes=REFERENCE_DTYPES,
        requirement=_cpu_requirement,
        note="C++ kernels (csrc/cpu): OpenMP, vectorised, fp32 accumulation; built on first use",
        features=KERNEL_ATTENTION_FEATURES["cpu"] if _op == "attention" else frozenset(),
    ))


def _cuda_requirement(device: torch.device) -> str | None:
    # mma.sync.m16n8k16 with fp32 accumulation on bf16, cp.async and ldmatrix need sm_80. (Without
    # a visible GPU -- planning a GPU run, `gptfast bench --dry-run` -- only the build counts.)
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"needs compute capability 8.0 or newer (mma.sync bf16, cp.async); this GPU is {major}.{minor}"
    # Like the cpu backend: builds (about a minute of nvcc, once; cached on disk) on the first call.
    from .. import _build
    return _build.unavailable_reason("cuda")


for _op in CUDA_OPS:
    register(Impl(
        op=_op, backend="cuda", devices=("cuda",), module="gptfast.ops._cuda",
        fwd_name=f"{_op}_forward", bwd_name=f"{_op}_backward",
        # attention runs on tensor cores (mma.sync) in 16-bit only; float32 goes to triton.
        dtypes=(torch.float16, torch.bfloat16) if _op == "attention" else KERNEL_DTYPES,
        requirement=_cuda_requirement,
        note="CUDA C++ kernels (csrc/cuda): mma.sync FlashAttention-2, cuBLASLt GEMMs; built on first use",
        features=KERNEL_ATTENTION_FEATURES["cuda"] if _op == "attention" else frozenset(),
    ))


def _check_name(name: str) -> str:
    name = name.strip().lower()
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown gptfast backend {name!r}; choose one of {('auto',) + BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the gptfast ops inside the ``with`` block on backend ``name``.

    ``name`` is one of ``"auto"``, ``"reference"``, ``"triton"``, ``"cuda"``, ``"cpu"``. An explicit
    ``backend=`` argument on a call still wins. Contexts nest; the innermost applies.
    """
    token = _CONTEXT.set(_check_name(name))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def checked_name(backend: str | None) -> str:
    """``backend`` validated, as the string the custom ops carry ("" for None: decide when run)."""
    return "" if backend is None else _check_name(backend)


# Each op call reads two environment variables. os.environ.get goes through Mapping.get and
# encodes the key (~0.5 us a read, a tenth of a tiny op's host budget); CPython's os.environ
# keeps the encoded mapping in ``_data``, updated by every os.environ write (what tests and
# users change), so reading that is both current and cheap. Elsewhere: the public path.
_ENV_DATA = getattr(os.environ, "_data", None)
if os.name == "posix" and isinstance(_ENV_DATA, dict):
    _ENV_KEYS = {name: os.fsencode(name) for name in ("GPTFAST_BACKEND", "TRITON_INTERPRET")}

    def _env(name: str) -> str | None:
        value = _ENV_DATA.get(_ENV_KEYS[name])
        return None if value is None else os.fsdecode(value)
else:  # pragma: no cover - Windows keeps str keys
    def _env(name: str) -> str | None:
        return os.environ.get(name)


def requested_backend(backend: str | None) -> str:
    """The backend name a call asks for, after argument, context and environment."""
    if backend is not None:
        return _check_name(backend)
    ctx = _CONTEXT.get()
    if ctx is not None:
        return ctx
    env = _env("GPTFAST_BACKEND")
    if env and env.strip():
        env = env.strip()
        try:
            return _check_name(env)
        except ValueError as exc:
            raise ValueError(f"GPTFAST_BACKEND: {exc}") from None
    return "auto"


def _load(impl: Impl) -> Launchers:
    key = (impl.op, impl.backend)
    loaded = _LOADED.get(key)
    if loaded is None:
        module = importlib.import_module(impl.module)
        bwd = getattr(module, impl.bwd_name) if impl.bwd_name else None  # forward-only (DECODE_OPS)
        loaded = Launchers(impl.backend, getattr(module, impl.fwd_name), bwd)
        _LOADED[key] = loaded
    return loaded


_RESOLVED: dict[tuple, tuple[Impl, Launchers]] = {}


def resolve(op: str, device: torch.device, dtype: torch.dtype, backend: str | None = None,
            features: frozenset[str] = frozenset()) -> Launchers:
    """Pick and load the launchers for ``op`` on ``device``/``dtype`` that implement every one of
    ``features`` (ATTENTION_FEATURES the call uses); see the module docstring.

    Memoised per (op, requested name, device, dtype, features, TRITON_INTERPRET): a hit is
    reused while the registry and the loaded launchers it came from are unchanged, so each op
    call pays two dict lookups here, not a walk of the selection rules. Errors are not memoised."""
    name = requested_backend(backend)
    key = (op, name, device, dtype, features, _env("TRITON_INTERPRET"))
    hit = _RESOLVED.get(key)
    if hit is not None:
        impl, launchers = hit
        if _REGISTRY.get((op, impl.backend)) is impl and _LOADED.get((op, impl.backend)) is launchers:
            return launchers
    launchers = _resolve(op, device, dtype, name, features)
    _RESOLVED[key] = (_REGISTRY[(op, launchers.backend)], launchers)
    return launchers


def _resolve(op: str, device: torch.device, dtype: torch.dtype, name: str, features: frozenset[str]) -> Launchers:
    if name != "auto":
        impl = _REGISTRY.get((op, name))
        if impl is None:
            raise NotImplementedError(
                f"gptfast.{op}: the {name!r} backend has no {op} implementation yet; "
                f"available here: {available_backends(op, device)}")
        missing = impl.missing(features)
        if missing:
            able = [b for b in available_backends(op, device) if not _REGISTRY[(op, b)].missing(features)]
            raise NotImplementedError(
                f"gptfast.{op}: backend {name!r} does not support {', '.join(missing)} yet; "
                f"backends here that do: {able}")
        reason = impl.unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"gptfast.{op}: backend {name!r} cannot run on {device}: {reason}")
        if dtype not in impl.dtypes:
            raise TypeError(f"gptfast.{op}: backend {name!r} supports dtypes "
                            f"{[str(d) for d in impl.dtypes]}, got {dtype}")
        try:
            return _load(impl)
        except Exception as exc:
            raise RuntimeError(f"gptfast.{op}: backend {name!r} failed to load: {exc}") from exc

    for candidate in AUTO_ORDER.get(device.type, _DEFAULT_ORDER):
        impl = _REGISTRY.get((op, candidate))
        if (impl is None or device.type not in impl.devices or dtype not in impl.dtypes
                or impl.missing(features)):
            continue
        reason = impl.requirement(device)
        if reason is None:
            try:
                return _load(impl)
            except Exception as exc:  # fall through to the next backend
                reason = f"failed to load ({type(exc).__name__}: {exc})"
        key = (op, candidate, device.type)
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(f"gptfast.{op}: backend {candidate!r} is unavailable on {device.type} "
                          f"({reason}); falling back", RuntimeWarning, stacklevel=4)
    if features:
        raise NotImplementedError(f"gptfast.{op}: no backend on {device.type} supports {sorted(features)} "
                                  f"in dtype {dtype}")
    raise TypeError(f"gptfast.{op}: no backend supports dtype {dtype} on {device.type}")


def available_backends(op: str | None = None, device: torch.device | str | None = None) -> list[str]:
    """Names of the backends that can run ``op`` (or any op, when None) on ``device``.

    ``device`` defaults to ``"cuda"`` when a GPU is visible, else ``"cpu"``. The list is in
    ``auto`` preference order for that device, followed by any other runnable backend.
    """
    if op is not None and op not in ALL_OPS:
        raise ValueError(f"unknown op {op!r}; ops are {ALL_OPS}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    ops = (op,) if op else OPS
    order = list(AUTO_ORDER.get(device.type, _DEFAULT_ORDER))
    order += [b for b in BACKENDS if b not in order]
    return [b for b in order
            if any((o, b) in _REGISTRY and _REGISTRY[(o, b)].unavailable_reason(device) is None
                   for o in ops)]


def backend_table(devices: tuple[str, ...] | None = None) -> list[dict]:
    """One row per (op, backend, device): whether it runs here and, if not, why."""
    if devices is None:
        devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    rows = []
    for op in ALL_OPS:
        for backend in BACKENDS:
            impl = _REGISTRY.get((op, backend))
            for dev in devices:
                if impl is None:
                    rows.append(dict(op=op, backend=backend, device=dev, available=False,
                                     reason="not implemented yet"))
                    continue
                reason = impl.unavailable_reason(torch.device(dev))
                rows.append(dict(op=op, backend=backend, device=dev, available=reason is None,
                                 reason=reason or impl.note))
    return rows
