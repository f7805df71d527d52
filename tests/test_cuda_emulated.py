"""Numerics of the CUDA kernels (csrc/cuda/attention.cu, csrc/cuda/layer_norm.cu, csrc/cuda/rms_norm.cu,
linear_cross_entropy's logits epilogue csrc/cuda/linear_cross_entropy.cu, and the element-wise and
column-sum kernels of csrc/cuda/gelu_ffn.cu) on a CPU. The GELU feed-forward block's GEMMs
(cuBLASLt, csrc/cuda/gelu_ffn.cpp) are not emulated: only gelu_ffn.cu's own gelu_forward,
gelu_backward (dh in place, GELU(h) recomputed, db1 partials) and column_sum (db2) launches.
The gated FFN (csrc/cuda/gated_ffn.*) runs whole: its host code's plan (gated_ffn.h, the function
gated_ffn.cpp calls: every GEMM's operands, transpositions, leading dimensions, offsets into the
(M, 2H) [dg du] buffer, the fused [w_gate; w_up] dx GEMM and the accumulating second one) with its
GEMMs on a CPU loop of cuBLASLt's semantics (bounds-checked against the registered buffers) and its
kernels emulated, forward and backward, against the float64 formula of the launcher contract, in
fp32/fp16/bf16, the three activations, each bias on or off, odd sizes, every weight layout.

tests/cuda_emu/ emulates the CUDA features these kernels use (see its README.md): rewrite.py copies
the current csrc/cuda sources, replacing inline PTX, launches and shared-memory declarations with
calls into include/emu_shim.h, and g++ (-O2, strict aliasing on) builds one library per kernel
file, cached by a hash of its inputs. The tests call the kernels' own launch functions through
ctypes on NaN-guarded buffers and compare every output with a float64 reference.

What this proves: the kernels' index math, tiling, masking (causal, partial blocks, padded head
dims; GQA/MQA, seqlen_q != seqlen_k, sliding windows, rows without keys; the packed varlen
layout with empty sequences, against gptfast.ops.varlen's reference and bitwise against the dense
batch), the score modifiers (softcap, ALiBi, dropout with _philox.py's mask bit for bit), online softmax, the fragment bookkeeping between ldmatrix and mma.sync calls, cp.async
group counting, the barrier placement (a shared-memory race detector is on for every launch: any race, out-of-
bounds or misaligned access, deadlock or divergent warp collective fails the test), the host-side
launch logic (grid sizes, instantiation switches, vector/scalar path choice -- 16-byte accesses
are checked for alignment and bounds --, rows per backward block, the column sums' chunking) and
the numerics of the chosen algorithms, in fp16 and bf16 (and fp32 for LayerNorm and GELU).

What it does NOT prove:
- tensor-core arithmetic: an emulated mma.sync sums the 16 products exactly and rounds once to
  fp32; the hardware's accumulation order and internal rounding differ slightly. ex2.approx is
  an exact exp2 here (the hardware is within ~2 ulp). tanhf/erff/expf are glibc's (within 1 ulp;
  CUDA's are within 2).
- the PTX register layouts themselves: kernel and emulator both take the m16n8k16 fragment layout
  and ldmatrix's row-address/register mapping from the PTX ISA ("Matrix Fragments for
  mma.m16n8k16", "ldmatrix"); a shared misreading would pass here.
- real concurrency: threads of a block run as coroutines switched only at barriers and warp
  collectives, so memory ordering, fences and the ordering of fp32 atomicAdd (dQ) are not
  exercised beyond two blocks running on two OS threads; the race detector, not the schedule,
  is what checks synchronisation.
- anything about performance, registers, spills, occupancy or nvcc's code generation (that is
  tests/test_cuda_backend.py and the GPU tests in tests/gpu/).

Tolerances (DESIGN.md "Testing rules"): with `ref` the float64 result on the same rounded inputs
and `pt` PyTorch's result computed in the kernel's dtype (naive attention with fp16/bf16 matmuls
and softmax; F.layer_norm), every 16-bit-or-fp32 output must satisfy
    max|out - ref| <= 2 * max|pt - ref| + atol    (3x for gradients),
atol = gptfast.testing.rounding_atol of the magnitude of the summed terms for attention and
LayerNorm (gptfast.testing.*_magnitudes: the floor for outputs that PyTorch happens to get exactly
right, e.g. dQ = 0 at T = 1, scaled by what was summed rather than by the result). fp32 statistics
(attention's logsumexp, LayerNorm's mean and rstd, RMSNorm's rstd) must match float64 to 1e-5 (relative to
max(1, |ref|)). GELU: `pt` is F.gelu and aten.gelu_backward in the dtype (db1/db2: their .sum(0)),
the reference PyTorch's formulas in float64; atol = 1e-5 * max(1, max|ref|) for 16-bit and
1e-7 * max(1, max|ref|) for fp32. db1 must also be the column sum of the kernel's own rounded dh
(the header's contract), and a NaN in h must give NaN in exactly that a/dh element and db1 column.
RMSNorm: `pt` is F.rms_norm in the dtype, atol from gptfast.testing.rms_norm_magnitudes. The
cross-entropy epilogue (fp32 logits): `pt` is cross_entropy_logits_reference in fp32, the truth the
same in float64, atol from the magnitudes of the loss's and dz's terms (run_ce_logits).

Checked by hand with mutated builds of attention.cu (tests/cuda_emu/README.md): removing the
forward's `__syncthreads()` after the QK^T loop is reported as a race, `cp_async_wait<2>` for
`<1>` as a read of an in-flight copy, a dK/dV store without its `col < D` check as an
out-of-bounds store, and a causal mask of `>=` for `>` (forward or backward) fails out or dq/dk
with errors ~100x over the bound; a window's left edge one key short fails out
(test_emulator_detects_window_off_by_one). Of gelu_ffn.cu: the db1 partial row indexed by blockIdx.x for
blockIdx.y fails db1 (unwritten NaN partials), store_vec without `j < valid` and a forward tail
loop of `i <= numel` write into guard zones, no `__syncthreads()` in write_column_partials is a
race, the finalize stepping chunks by 1 for kTileY and `2.f * kKappa` for `3.f` in tanh-GELU' fail
db1 and dh by >1000x the bound. test_emulator_detects_missing_syncthreads (a barrier removed from
layer_norm.cu) and test_emulator_detects_misaligned_vector_access (gelu_backward's 16-byte path
without its `cols % kN == 0` condition) keep two such checks as tests.
"""
from __future__ import annotations

import ctypes
import hashlib
import itertools
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gptfast
from gptfast.ops import _philox
from gptfast.ops.attention import attention_backward_reference, attention_forward_reference, normalise
from gptfast.ops.gelu_ffn import gelu, gelu_grad
from gptfast.ops.layer_norm import layer_norm_backward_reference, layer_norm_forward_reference
from gptfast.ops.linear_cross_entropy import cross_entropy_logits_reference
from gptfast.ops.rms_norm import rms_norm_backward_reference, rms_norm_forward_reference
from gptfast.ops.varlen import attention_varlen_backward_reference, attention_varlen_forward_reference
from gptfast.testing import (assert_within_pytorch_error, attention_magnitudes, layer_norm_magnitudes, max_abs_diff,
                             rms_norm_magnitudes, rounding_atol)

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc" / "cuda"
EMU = Path(__file__).resolve().parent / "cuda_emu"
CXXFLAGS = ["-std=c++20", "-O2", "-pthread", "-fPIC", "-shared", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas"]
API = {"attention": "attention_api.cpp", "layer_norm": "layer_norm_api.cpp", "gelu_ffn": "gelu_ffn_api.cpp",
       "rms_norm": "rms_norm_api.cpp", "linear_cross_entropy": "linear_cross_entropy_api.cpp",
       "gated_ffn": "gated_ffn_api.cpp"}


def _load_rewrite():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cuda_emu_rewrite", EMU / "rewrite.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rewrite = _load_rewrite()


# --- toolchain and build ------------------------------------------------------------------------

def _compiler():
    """(g++ path, its version), or (None, why the emulation cannot be built here)."""
    cxx = shutil.which("g++")
    if cxx is None:
        return None, "g++ not found"
    try:
        version = subprocess.run([cxx, "-dumpversion"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"g++ does not run: {e}"
    if int(version.split(".")[0] or 0) < 12:  # C++20 atomic_ref<float>, _Float16
        return None, f"g++ {version} is older than 12"
    return cxx, version


def _inputs(lib):
    files = [CSRC / f for f in rewrite.SOURCES[lib]]
    files += [EMU / "rewrite.py", EMU / API[lib]] + sorted((EMU / "include").glob("*.h"))
    return files


def _build_root(tmp_path_factory):
    root = os.environ.get("GPTFAST_BUILD_DIR")
    if root:
        path = Path(root) / "cuda_emu"
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("cuda_emu")


def build_library(lib, out_dir, mutate=None, mutate_file=None):
    """Rewrites csrc/cuda for `lib` and starts compiling it into out_dir; _done(result) is the .so.

    Cached: a library built from the same inputs (their hash is in its name) is returned as is.
    mutate: optional function (source text of the .cu, or of `mutate_file`, another of the library's
    csrc/cuda inputs) -> mutated text, applied before rewriting.
    Skips the test when g++ is unusable; fails it when the build fails.
    """
    cxx, version = _compiler()
    if cxx is None:
        pytest.skip(f"CUDA emulation cannot be built: {version}")
    h = hashlib.sha256(f"{version} {CXXFLAGS}".encode())
    for f in _inputs(lib):
        h.update(f.name.encode() + f.read_bytes())
    if mutate is not None:
        cu = mutate_file or rewrite.SOURCES[lib][0]
        text = (CSRC / cu).read_text()
        mutated = mutate(text)
        assert mutated != text, "the mutation changed nothing"
        h.update(mutated.encode())
    so = Path(out_dir) / f"lib{lib}_emu_{h.hexdigest()[:16]}.so"
    if so.exists():
        return so
    src = CSRC
    if mutate is not None:
        src = Path(tempfile.mkdtemp(prefix="mutant_", dir=out_dir))
        for name in rewrite.SOURCES[lib]:
            shutil.copy(CSRC / name, src / name)
        (src / cu).write_text(mutated)
    gen = Path(tempfile.mkdtemp(prefix=f"{lib}_", dir=out_dir))
    rewrite.rewrite(src, gen, lib)
    tmp = so.with_suffix(f".{os.getpid()}.tmp")
    cmd = [cxx, *CXXFLAGS, f"-I{EMU / 'include'}", f"-I{gen}", "-o", str(tmp), str(EMU / API[lib])]
    return _Build(cmd, tmp, so, cleanup=[gen] + ([src] if src != CSRC else []))


class _Build:
    """A running compile; .result() waits and returns the library path (fails the test on errors)."""

    def __init__(self, cmd, tmp, so, cleanup):
        self.cmd, self.tmp, self.so, self.cleanup = cmd, tmp, so, cleanup
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def result(self):
        out, _ = self.proc.communicate()
        if self.proc.returncode != 0:  # the rewritten sources stay for inspection
            pytest.fail(f"building the CUDA emulation failed:\n{' '.join(self.cmd)}\n{out[-6000:]}")
        os.replace(self.tmp, self.so)
        for d in self.cleanup:
            shutil.rmtree(d, ignore_errors=True)
        return self.so


def _done(build):
    """The library path of build_library's result (waits for a running compile)."""
    return build if isinstance(build, Path) else build.result()


class Lib:
    """ctypes view of one emulated library plus the findings channel."""

    def __init__(self, path):
        self.dll = ctypes.CDLL(str(path))
        self.dll.emu_register.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.dll.emu_report.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self.dll.emu_set_device.argtypes = [ctypes.c_int, ctypes.c_int]
        self.report()  # start clean

    def report(self):
        buf = ctypes.create_string_buffer(1 << 16)
        self.dll.emu_report(buf, 1 << 16)
        return buf.value.decode()

    def finish(self, *bufs):
        """Fails on any emulator finding or a written guard zone."""
        findings = self.report()
        assert not findings, f"the emulator reported:\n{findings}"
        for b in bufs:
            assert b.guards_intact(), f"a kernel wrote outside the {tuple(b.t.shape)} buffer"


@pytest.fixture(scope="module")
def build_root(tmp_path_factory):
    return _build_root(tmp_path_factory)


@pytest.fixture(scope="module")
def libs(build_root):
    builds = {lib: build_library(lib, build_root) for lib in API}  # both compile at once
    return {lib: Lib(_done(b)) for lib, b in builds.items()}


# --- buffers ------------------------------------------------------------------------------------

GUARD = 64  # elements of NaN on each side of every buffer
_INT_VIEW = {torch.float32: (torch.int32, 0x7FC00000, 1 << 22), torch.float16: (torch.int16, 0x7E00, 1 << 9),
             torch.bfloat16: (torch.int16, 0x7FC0, 1 << 6)}  # quiet NaN bits, payload range
_payloads = itertools.count(1)


class Buf:
    """A tensor inside a NaN-filled allocation: writes outside it are detected, reads of it give NaN.

    The view starts 16-byte aligned plus `misalign` elements, and is registered with the emulator
    as valid global memory. Every buffer's NaN carries its own payload, and the guards are compared
    bit for bit: a kernel that reads past one buffer's end and stores the NaN it got past another's
    is caught too.
    """

    def __init__(self, lib, shape, dtype, init=None, misalign=0):
        n = math.prod(shape)
        self.flat = torch.empty((n + 2 * GUARD + 16,), dtype=dtype)
        ity, qnan, span = _INT_VIEW[dtype]
        self.nan_bits = qnan | (next(_payloads) % (span - 1) + 1)
        self.flat.view(ity).fill_(self.nan_bits)
        es = self.flat.element_size()
        off = GUARD
        while (self.flat.data_ptr() + off * es) % 16:
            off += 1
        self.off, self.n = off + misalign, n
        self.t = self.flat[self.off:self.off + n].view(shape)
        if init is not None:
            self.t.copy_(init)
        lib.dll.emu_register(self.t.data_ptr(), n * es)

    def ptr(self):
        return self.t.data_ptr()

    def guards_intact(self):
        g = torch.cat([self.flat[:self.off], self.flat[self.off + self.n:]])
        return bool((g.view(_INT_VIEW[g.dtype][0]) == self.nan_bits).all())


def check(name, out, ref, pt, factor, atol_rel=None, *, magnitude=None):
    """DESIGN.md's rule (gptfast.testing): max|out - ref| <= factor * max|pt - ref| + atol, with
    atol = rounding_atol(magnitude) for the reductions (attention, LayerNorm: the magnitude of the
    summed terms, gptfast.testing.*_magnitudes) or atol_rel * max(1, max|ref|) for the element-wise
    GELU kernels, whose terms are the result itself. Returns max|out - ref|."""
    assert not torch.isnan(out).any(), f"{name}: NaN in the kernel's output"
    if magnitude is not None:
        atol = rounding_atol(magnitude, out.dtype)
    else:
        atol = atol_rel * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    assert_within_pytorch_error(out, ref, pt, factor=factor, atol=atol, name=name)
    return max_abs_diff(out, ref)


def check_fp32(name, out, ref, rtol=1e-5):
    assert not torch.isnan(out).any(), f"{name}: NaN"
    err = ((out.double() - ref).abs() / ref.abs().clamp_min(1.0)).max().item()
    assert err <= rtol, f"{name}: error {err:.3g} > {rtol:g} (relative to max(1, |ref|))"


# --- attention ----------------------------------------------------------------------------------

P, I, F32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
I64, U32, F64 = ctypes.c_int64, ctypes.c_uint32, ctypes.c_double


def _attn_signatures(dll):
    dll.emu_attention_set_max_smem.argtypes = [I]
    dll.emu_attention_set_options.argtypes = [I64, I64, F64, P, I64, F64, U32, P]
    dll.emu_attention_forward.argtypes = [P, P, P, P, I, I, I, I, I, I, F32, I, P, P]
    dll.emu_attention_backward.argtypes = [P, P, P, P, I, I, I, I, I, I, F32, I, P, P, P, P, P, P, P, P]


@dataclass(frozen=True)
class AttnOptions:
    """The options of one emulated attention call, as a user passes them (normalised by the test,
    as csrc/attention.cpp does): seqlen_k and nheads_k (None: q's), a window, softcap, ALiBi slopes
    of shape (H,) ("h") or (B, H) ("bh"), dropout with the generator state (seed, offset)."""

    tk: int | None = None
    hk: int | None = None
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: str | None = None
    dropout_p: float = 0.0
    rng: tuple[int, int] = (0x243F6A8885A308D3, 4 * 0x13198A2E0)  # 64-bit seed, offset past 2^32


PLAIN = AttnOptions()


def rng_tensor(rng):
    """rng_state for (seed, offset): int64 [seed, offset], their 64-bit patterns. The emulated kernels
    read these 16 bytes through the pointer the options carry, when they run (as on the GPU)."""
    seed64, offset = rng
    return torch.tensor([seed64 - 2**64 if seed64 >= 2**63 else seed64, offset], dtype=torch.int64)


def attention_reference(q, k, v, do, causal, scale, kw=None, bwd_out=None):
    """float64 out, lse (B, H, Tq), dq, dk, dv: gptfast's reference launchers on float64 inputs.

    bwd_out: the `out` the backward reference gets (default: its own float64 forward's)."""
    q, k, v, do = (x.double() for x in (q, k, v, do))
    kw = kw or {}
    out, lse = attention_forward_reference(q, k, v, causal, scale, **kw)
    o_bwd = out if bwd_out is None else bwd_out.double()
    return (out, lse, *attention_backward_reference(do, q, k, v, o_bwd, lse, causal, scale, **kw))


def attention_pytorch(q, k, v, do, causal, scale, ref_kw=None):
    """PyTorch in the inputs' dtype (the FlashAttention tests' `pt`): out, dq, dk, dv."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = gptfast.attention_ref(*leaves, causal, scale, upcast=False, **(ref_kw or {}))
    out.backward(do)
    return (out.detach(), *(x.grad for x in leaves))


def run_attention(lib, B, T, H, D, causal, dtype, deterministic, layout="contiguous", seed=0, qscale=1.0,
                  opts=PLAIN, repeat_backward=False, v_override=None, rng_at_launch=None):
    """One forward and backward on the emulator, checked against float64 (T: seqlen_q, H: nheads;
    `opts` the rest). repeat_backward: run the backward twice and require bit-identical gradients.
    rng_at_launch: (seed, offset) written into the key tensor after the options were set (with
    opts.rng) and before the launches; the reference then draws with these."""
    _attn_signatures(lib.dll)
    lib.dll.emu_clear_registry()  # the buffers of earlier runs are gone
    torch.manual_seed(seed)
    Tq, Tk, Hk = T, opts.tk if opts.tk is not None else T, opts.hk if opts.hk is not None else H
    scale = 1.0 / math.sqrt(D)
    q, do = torch.randn(B, Tq, H, D), torch.randn(B, Tq, H, D)
    k, v = torch.randn(B, Tk, Hk, D), torch.randn(B, Tk, Hk, D)
    if v_override is not None:
        v = v_override
    q, k, v, do = ((q * qscale).to(dtype), k.to(dtype), v.to(dtype), do.to(dtype))
    slopes = None if opts.alibi is None else torch.rand((H,) if opts.alibi == "h" else (B, H)) * 0.5
    norm = normalise(causal, opts.window, opts.softcap, opts.dropout_p, Tk)  # csrc/attention.cpp's rule
    seed64, offset = opts.rng
    threshold = _philox.dropout_threshold(opts.dropout_p) if opts.dropout_p > 0 else 0
    bufs = []

    def place(x):
        """x (B, T, heads, D) in the requested memory layout; returns the (B, T, heads, D) view."""
        b_, t_, h_, d_ = x.shape
        if layout == "bhtd":  # (B, H, T, D) storage: head stride T*D, row stride D
            b = Buf(lib, (b_, h_, t_, d_), dtype, x.transpose(1, 2))
            view = b.t.transpose(1, 2)
        elif layout == "packed_qkv":  # one of the three slices of a (B, T, 3, H, D) tensor
            b = Buf(lib, (b_, t_, 3, h_, d_), dtype)
            b.t[:, :, 1] = x
            view = b.t[:, :, 1]
        else:
            b = Buf(lib, tuple(x.shape), dtype, x)
            view = b.t
        bufs.append(b)
        return view

    def strides(*views):
        st = [s for t in views for s in t.stride()[:3]]
        return (ctypes.c_int64 * 15)(*(st + [0] * (15 - len(st))))

    sb = None
    if slopes is not None:
        sb = Buf(lib, tuple(slopes.shape), torch.float32, slopes)
        bufs.append(sb)
    key = rng_tensor(opts.rng)  # alive until the kernels are done: they read it
    lib.dll.emu_attention_set_options(norm.window[0], norm.window[1], norm.softcap, sb.ptr() if sb else None,
                                      H if opts.alibi == "bh" else 0, norm.dropout_p, threshold, key.data_ptr())
    if rng_at_launch is not None:
        key.copy_(rng_tensor(rng_at_launch))
        seed64, offset = rng_at_launch
    qv, kv, vv = place(q), place(k), place(v)
    out = Buf(lib, (B, Tq, H, D), dtype)
    lse = Buf(lib, (B, H, Tq), torch.float32)
    bf16 = int(dtype == torch.bfloat16)
    rc = lib.dll.emu_attention_forward(qv.data_ptr(), kv.data_ptr(), vv.data_ptr(), strides(qv, kv, vv), B, Tq, Tk, H,
                                       Hk, D, scale, bf16, out.ptr(), lse.ptr())
    assert rc == 0, f"forward launch returned cudaError {rc}"
    lib.finish(out, lse, *bufs)

    # The backward gets the kernel's own out and lse (as in training); out/dout in the same layout.
    ov, dov = place(out.t.clone()), place(do)

    def backward():
        delta = Buf(lib, (B, H, Tq), torch.float32)
        dq = Buf(lib, (B, Tq, H, D), dtype)
        dk, dv = (Buf(lib, (B, Tk, H, D), dtype) for _ in range(2))  # per query head
        acc = None if deterministic else Buf(lib, (B, Tq, H, D), torch.float32, torch.zeros(B, Tq, H, D))
        rc = lib.dll.emu_attention_backward(
            qv.data_ptr(), kv.data_ptr(), vv.data_ptr(), strides(qv, kv, vv, ov, dov), B, Tq, Tk, H, Hk, D, scale,
            bf16, ov.data_ptr(), dov.data_ptr(), lse.ptr(), delta.ptr(), dq.ptr(), dk.ptr(), dv.ptr(),
            acc.ptr() if acc else None)
        assert rc == 0, f"backward launch returned cudaError {rc}"
        lib.finish(dq, dk, dv, delta, *bufs, *([acc] if acc else []))
        # csrc/cuda/attention.cpp's group_sum: each kv head's group of query heads, in the dtype.
        group = lambda x: x.t.view(B, Tk, Hk, H // Hk, D).sum(3)  # noqa: E731
        return dq.t.clone(), group(dk), group(dv)

    dq, dk, dv = backward()
    if repeat_backward:
        again = backward()
        for name, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), again):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16)), f"{name}: not bitwise reproducible"

    rng_state = rng_tensor((seed64, offset))
    kw = dict(window=norm.window, softcap=norm.softcap, alibi_slopes=slopes, dropout_p=norm.dropout_p,
              rng_state=rng_state if norm.dropout_p > 0 else None)
    keep = None
    if norm.dropout_p > 0:
        keep = _philox.dropout_keep_mask(seed64, offset, B, H, Tq, Tk, norm.dropout_p)
    ref_kw = dict(window_size=opts.window, softcap=opts.softcap, alibi_slopes=slopes, dropout_p=norm.dropout_p,
                  dropout_mask=keep)
    # With dropout the backward's reference gets the kernel's out: delta = rowsum(dO * O) (the
    # FlashAttention-2 formula, the reference launcher's too) cancels dP * keep exactly only for the
    # exact O, and O = P keep / (1 - p) V rounded to the dtype leaves dS ~ eps(dtype) |dO| |O| where
    # exact arithmetic gives 0 (a row that sees one key: dq = 0), which PyTorch's autograd, which
    # has no delta, does not see. Without dropout O is checked against its own reference above.
    bwd_out = out.t if norm.dropout_p > 0 else None
    o_ref, lse_ref, dq_ref, dk_ref, dv_ref = attention_reference(q, k, v, do, causal, scale, kw, bwd_out)
    o_pt, dq_pt, dk_pt, dv_pt = attention_pytorch(q, k, v, do, causal, scale, ref_kw)
    mags = attention_magnitudes(q, k, v, do, causal, scale, window_size=opts.window, softcap=opts.softcap,
                                alibi_slopes=slopes)
    mags = [m / (1.0 - norm.dropout_p) for m in mags]  # kept terms are scaled by 1 / (1 - p)
    errs = {"out": check("out", out.t, o_ref, o_pt, 2, magnitude=mags[0])}
    empty = torch.isneginf(lse_ref)  # rows that see no key: lse -inf, out and dq 0
    assert torch.equal(torch.isneginf(lse.t), empty), "lse: the rows without keys differ"
    if not empty.all():
        check_fp32("lse", lse.t[~empty], lse_ref[~empty])
    for name, x, ref, pt, m in zip(("dq", "dk", "dv"), (dq, dk, dv), (dq_ref, dk_ref, dv_ref),
                                   (dq_pt, dk_pt, dv_pt), mags[1:]):
        errs[name] = check(name, x, ref, pt, 3, magnitude=m)
    errs["kernel_out"] = out.t.clone()
    return errs


FP16, BF16 = torch.float16, torch.bfloat16
# (B, T, H, D, causal, dtype, deterministic dQ, layout). Every head-dim instantiation (64, 128, 256)
# and two padded ones (40 -> 64, 112 -> 128); T = 1, 65 and 130 cut 64-row blocks (and the
# 32-column key blocks at D = 256) partially; both dtypes, causal or not, atomic and deterministic
# dQ in every instantiation; strided and packed inputs.
ATTENTION_CASES = [
    (2, 130, 2, 64, True, FP16, False, "contiguous"),
    (1, 130, 2, 64, False, BF16, True, "contiguous"),
    (2, 65, 1, 64, False, BF16, False, "packed_qkv"),
    (1, 130, 2, 40, True, BF16, True, "contiguous"),
    (2, 65, 2, 40, False, FP16, False, "contiguous"),
    (2, 1, 3, 40, True, FP16, True, "contiguous"),
    (1, 130, 2, 128, True, BF16, False, "contiguous"),
    (1, 65, 2, 128, False, FP16, True, "contiguous"),
    (2, 65, 2, 112, True, FP16, True, "bhtd"),
    (1, 130, 1, 112, False, BF16, False, "contiguous"),
    (2, 1, 2, 128, False, BF16, False, "contiguous"),
    (1, 130, 1, 256, True, FP16, True, "contiguous"),
    (1, 65, 2, 256, False, BF16, True, "contiguous"),
    (1, 65, 1, 256, True, BF16, False, "contiguous"),
    (1, 1, 2, 256, True, FP16, False, "contiguous"),
]


def _case_id(c):
    B, T, H, D, causal, dtype, det, layout = c
    return (f"B{B}T{T}H{H}D{D}-{'causal' if causal else 'full'}-{str(dtype).split('.')[1]}-"
            f"{'det' if det else 'atomic'}-{layout}")


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=_case_id)
def test_attention_emulated(libs, case):
    run_attention(libs["attention"], *case)


@pytest.mark.parametrize("D,deterministic", [(64, False), (128, True)], ids=["D64-atomic", "D128-det"])
def test_attention_emulated_single_buffered_backward(libs, D, deterministic):
    """A GPU with 99 KiB of shared memory per block (sm_86/89/120) gets the backward kernels
    without double buffering (the default here models sm_90, which gets them double-buffered)."""
    dll = libs["attention"].dll
    dll.emu_attention_set_max_smem(99 * 1024)
    try:
        run_attention(libs["attention"], 1, 130, 2, D, True, FP16, deterministic, seed=5)
    finally:
        dll.emu_attention_set_max_smem(227 * 1024)


def test_attention_emulated_large_scores(libs):
    """Scores x8 (inputs x sqrt(8)): the running max changes between key blocks; stays accurate."""
    run_attention(libs["attention"], 1, 130, 2, 64, False, FP16, False, qscale=8.0, seed=3)


# FlashAttention 2.8's dense options, each against the float64 reference launchers (the kernel's
# dropout must be the reference's Philox mask exactly, or `out` and every gradient fail):
# (B, Tq, H, D, causal, dtype, deterministic dQ, qscale, options). Every pair of {GQA, MQA,
# Tq < Tk, Tq > Tk, causal, window, softcap, ALiBi (H,) / (B, H), dropout, deterministic} appears
# at least once; head dims 40, 64, 96, 128, 256; windows that leave rows without keys (Tq > Tk,
# or (120, 130) at shift -60: rows 0..57 see nothing); the plain instantiation (masks, GQA,
# lengths only) and the kHasModifiers one.
O = AttnOptions
OPTION_CASES = [
    (2, 113, 6, 64, True, FP16, False, 1.0, O(tk=203, hk=2, window=(40, -1), softcap=30.0, alibi="h",
                                              dropout_p=0.17)),                         # everything
    (2, 239, 3, 40, True, BF16, True, 1.0, O(tk=1, hk=1, softcap=30.0, alibi="bh", dropout_p=0.17)),
    (2, 1, 4, 96, False, FP16, True, 1.0, O(tk=239, hk=2, window=(17, 3), alibi="bh", dropout_p=0.17)),
    (1, 3, 3, 128, False, BF16, False, 1.0, O(tk=80, hk=1, softcap=30.0, dropout_p=0.17)),
    (1, 64, 4, 128, False, FP16, True, 1.0, O(window=(5, 9), softcap=30.0, alibi="h")),
    (2, 64, 6, 64, True, BF16, False, 1.0, O(tk=128, hk=2)),                          # plain GQA
    (1, 113, 4, 40, True, FP16, True, 1.0, O(tk=203)),                                # bottom-right causal
    (1, 64, 2, 256, False, BF16, True, 1.0, O(dropout_p=0.17)),                       # dropout only
    (1, 64, 2, 64, False, FP16, False, 3.0, O(softcap=2.0)),                          # tanh saturates
    (2, 64, 2, 256, True, FP16, False, 1.0, O(alibi="bh")),                           # ALiBi only
    (1, 239, 3, 128, False, BF16, True, 1.0, O(tk=1, hk=1, window=(0, 0))),           # one key, Tk = 1
    (1, 3, 6, 40, True, FP16, False, 1.0, O(tk=80, hk=2, window=(2, -1), alibi="h")),  # 3 keys a row
    (1, 130, 2, 64, False, FP16, True, 1.0, O(tk=70, hk=1, window=(5, 2))),           # empty rows
    (2, 97, 4, 96, False, BF16, False, 1.0, O(window=(20, 7))),                       # two-sided window
]


def _opt_id(c):
    B, T, H, D, causal, dtype, det, qscale, o = c
    tk, hk = o.tk if o.tk is not None else T, o.hk if o.hk is not None else H
    parts = [f"B{B}Tq{T}Tk{tk}H{H}Hk{hk}D{D}", "causal" if causal else "full", str(dtype).split(".")[1],
             "det" if det else "atomic"]
    if o.window != (-1, -1):
        parts.append(f"w{o.window[0]}_{o.window[1]}")
    if o.softcap:
        parts.append(f"softcap{o.softcap:g}")
    if o.alibi:
        parts.append(f"alibi_{o.alibi}")
    if o.dropout_p:
        parts.append(f"drop{o.dropout_p:g}")
    return "-".join(parts)


@pytest.mark.parametrize("case", OPTION_CASES, ids=_opt_id)
def test_attention_emulated_options(libs, case):
    B, T, H, D, causal, dtype, det, qscale, opts = case
    run_attention(libs["attention"], B, T, H, D, causal, dtype, det, qscale=qscale, opts=opts, seed=11,
                  repeat_backward=det)


def test_attention_emulated_options_single_buffered_backward(libs):
    """The kHasModifiers backward kernels without double buffering (99 KiB of shared memory)."""
    dll = libs["attention"].dll
    dll.emu_attention_set_max_smem(99 * 1024)
    try:
        run_attention(libs["attention"], 1, 70, 4, 128, True, BF16, True, seed=5,
                      opts=O(tk=90, hk=2, window=(30, -1), softcap=30.0, alibi="h", dropout_p=0.17))
    finally:
        dll.emu_attention_set_max_smem(227 * 1024)


@pytest.mark.parametrize("rng", [(0x0123456789ABCDEF, 0), (0xF123456789ABCDEF, 4 * 0x12345678901)],
                         ids=["seed-low", "seed-high-bit-offset-past-2^32"])
def test_attention_emulated_dropout_mask_is_philox_bit_for_bit(libs, rng):
    """With v the identity (key j -> head-dim column j), out[b, i, h, j] = p_ij * keep_ij / (1 - p):
    the kept set is read off the kernel's output and must be _philox's mask exactly, for a 64-bit
    seed (high bit set) and an offset whose stream position needs both counter words."""
    B, Tq, Tk, H, D, p = 2, 37, 50, 3, 64, 0.17
    eye = torch.eye(Tk, D)[None, :, None, :].expand(B, Tk, H, D)
    errs = run_attention(libs["attention"], B, Tq, H, D, False, FP16, False, seed=2,
                         opts=O(tk=Tk, dropout_p=p, rng=rng), v_override=eye)
    keep = _philox.dropout_keep_mask(*rng, B, H, Tq, Tk, p)
    assert 0 < (~keep).sum() < keep.numel()
    kept = errs["kernel_out"][..., :Tk].permute(0, 2, 1, 3) > 0
    assert torch.equal(kept, keep), f"{(kept != keep).sum()} of {keep.numel()} keep bits differ"


def test_attention_emulated_dropout_reads_the_key_at_launch(libs):
    """The kernels read (seed, offset) through the rng tensor's address when they run, so nothing
    was captured when the options were set (what makes a CUDA-graph replay draw a fresh mask): the
    options are set with one key, the tensor then holds another, and the forward's mask (read off
    out with v the identity) and the backward's gradients must be those of the second key."""
    B, Tq, Tk, H, D, p = 1, 37, 50, 2, 64, 0.17
    first, second = (0x0123456789ABCDEF, 4 * 7), (0x7EDCBA9876543210, 4 * 0x12345678901)
    eye = torch.eye(Tk, D)[None, :, None, :].expand(B, Tk, H, D)
    errs = run_attention(libs["attention"], B, Tq, H, D, False, FP16, False, seed=2,
                         opts=O(tk=Tk, dropout_p=p, rng=first), v_override=eye, rng_at_launch=second)
    kept = errs["kernel_out"][..., :Tk].permute(0, 2, 1, 3) > 0
    keep_first, keep_second = (_philox.dropout_keep_mask(*r, B, H, Tq, Tk, p) for r in (first, second))
    assert not torch.equal(keep_first, keep_second)
    assert torch.equal(kept, keep_second), f"{(kept != keep_second).sum()} of {kept.numel()} keep bits differ"


# --- attention, packed variable-length layout -------------------------------------------------

def _varlen_signatures(dll):
    _attn_signatures(dll)
    dll.emu_attention_set_varlen.argtypes = [P, P, I]


def emu_attention(lib, q, k, v, do, scale, deterministic, opts=PLAIN, causal=False, slopes=None, cu=None,
                  kv_packed=False):
    """The kernels on (B, T, heads, D) tensors q, k, v, do (packed: B = 1 and cu = (cu_seqlens_q,
    cu_seqlens_k) int32): out, lse, dq, dk, dv, the gradients summed over each kv head's group as
    csrc/cuda/attention.cpp does. `opts`: window, softcap, dropout already normalised (as
    csrc/attention.cpp passes them). kv_packed: k and v are the two slices of one (B, Tk, 2, Hk, D)
    buffer (row stride 2 * Hk * D)."""
    _varlen_signatures(lib.dll)
    lib.dll.emu_clear_registry()
    B, Tq, H, D = q.shape
    Tk, Hk = k.shape[1], k.shape[2]
    dtype = q.dtype
    bufs = []

    def place(x):
        b = Buf(lib, tuple(x.shape), x.dtype, x)
        bufs.append(b)
        return b.t

    if kv_packed:
        kvb = Buf(lib, (B, Tk, 2, Hk, D), dtype)
        kvb.t[:, :, 0], kvb.t[:, :, 1] = k, v
        bufs.append(kvb)
        kv, vv = kvb.t[:, :, 0], kvb.t[:, :, 1]
    else:
        kv, vv = place(k), place(v)
    qv = place(q)
    sb = place(slopes) if slopes is not None else None
    threshold = _philox.dropout_threshold(opts.dropout_p) if opts.dropout_p > 0 else 0
    key = rng_tensor(opts.rng)  # alive until the kernels are done: they read it
    lib.dll.emu_attention_set_options(opts.window[0], opts.window[1], opts.softcap, sb.data_ptr() if sb is not None
                                      else None, H if slopes is not None and slopes.dim() == 2 else 0,
                                      opts.dropout_p, threshold, key.data_ptr())
    if cu is not None:  # int32, read by the kernels with plain loads (not bounds-checked)
        cu = tuple(c.contiguous() for c in cu)
        for c in cu:
            lib.dll.emu_register(c.data_ptr(), c.numel() * 4)
        lib.dll.emu_attention_set_varlen(cu[0].data_ptr(), cu[1].data_ptr(), cu[0].numel() - 1)

    def strides(*views):
        st = [x for t in views for x in t.stride()[:3]]
        return (ctypes.c_int64 * 15)(*(st + [0] * (15 - len(st))))

    bf16 = int(dtype == torch.bfloat16)
    try:
        out = Buf(lib, (B, Tq, H, D), dtype)
        lse = Buf(lib, (B, H, Tq), torch.float32)
        rc = lib.dll.emu_attention_forward(qv.data_ptr(), kv.data_ptr(), vv.data_ptr(), strides(qv, kv, vv), B, Tq,
                                           Tk, H, Hk, D, scale, bf16, out.ptr(), lse.ptr())
        assert rc == 0, f"forward launch returned cudaError {rc}"
        lib.finish(out, lse, *bufs)
        ov, dov = place(out.t.clone()), place(do)
        delta = Buf(lib, (B, H, Tq), torch.float32)
        dq = Buf(lib, (B, Tq, H, D), dtype)
        dk, dv = (Buf(lib, (B, Tk, H, D), dtype) for _ in range(2))  # per query head
        acc = None if deterministic else Buf(lib, (B, Tq, H, D), torch.float32, torch.zeros(B, Tq, H, D))
        rc = lib.dll.emu_attention_backward(
            qv.data_ptr(), kv.data_ptr(), vv.data_ptr(), strides(qv, kv, vv, ov, dov), B, Tq, Tk, H, Hk, D, scale,
            bf16, ov.data_ptr(), dov.data_ptr(), lse.ptr(), delta.ptr(), dq.ptr(), dk.ptr(), dv.ptr(),
            acc.ptr() if acc else None)
        assert rc == 0, f"backward launch returned cudaError {rc}"
        lib.finish(dq, dk, dv, delta, *bufs, *([acc] if acc else []))
    finally:
        lib.dll.emu_attention_set_varlen(None, None, 0)
    group = lambda x: x.t.view(B, Tk, Hk, H // Hk, D).sum(3)  # noqa: E731
    return out.t.clone(), lse.t.clone(), dq.t.clone(), group(dk), group(dv)


def _cu(lengths):
    return torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)


def run_attention_varlen(lib, lens_q, lens_k, H, Hk, D, causal, dtype, deterministic, opts=PLAIN, seed=0,
                         kv_packed=False):
    """One packed forward and backward (sequence b: lens_q[b] queries, lens_k[b] keys) on the
    emulator, against gptfast.ops.varlen's float64 reference launchers; `pt` (the tolerance's
    yardstick) is PyTorch per sequence in the dtype. opts.tk / opts.hk are ignored (lens_k, Hk)."""
    torch.manual_seed(seed)
    tq, tk, nseq = sum(lens_q), sum(lens_k), len(lens_q)
    scale = 1.0 / math.sqrt(D)
    q, do = (torch.randn(1, tq, H, D).to(dtype) for _ in range(2))
    k, v = (torch.randn(1, tk, Hk, D).to(dtype) for _ in range(2))
    slopes = None if opts.alibi is None else torch.rand((H,) if opts.alibi == "h" else (nseq, H)) * 0.5
    max_k = max(lens_k, default=0)
    norm = normalise(causal, opts.window, opts.softcap, opts.dropout_p, max_k)  # the varlen functions' rule
    eff = AttnOptions(window=norm.window, softcap=norm.softcap, dropout_p=norm.dropout_p, rng=opts.rng)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    out, lse, dq, dk, dv = emu_attention(lib, q, k, v, do, scale, deterministic, eff, causal, slopes, (cu_q, cu_k),
                                         kv_packed)
    lse = lse[0]  # (H, total_q), FlashAttention's varlen layout

    seed64, offset = opts.rng
    rng_state = torch.tensor([seed64 - 2**64 if seed64 >= 2**63 else seed64, offset], dtype=torch.int64)
    kw = dict(window=norm.window, softcap=norm.softcap, alibi_slopes=slopes, dropout_p=norm.dropout_p,
              rng_state=rng_state if norm.dropout_p > 0 else None)
    q64, k64, v64, do64 = (x[0].double() for x in (q, k, v, do))
    args = (cu_q, cu_k, max(lens_q, default=0), max_k, causal, scale)
    o_ref, lse_ref = attention_varlen_forward_reference(q64, k64, v64, *args, **kw)
    # With dropout the backward reference gets the kernel's out (see run_attention).
    o_bwd = out[0].double() if norm.dropout_p > 0 else o_ref
    dq_ref, dk_ref, dv_ref = attention_varlen_backward_reference(do64, q64, k64, v64, o_bwd, lse_ref, *args, **kw)

    pts = [torch.zeros_like(x[0]) for x in (q, q, k, v)]  # out, dq, dk, dv: 0 where a sequence is empty
    mags = [0.0] * 4
    for b in range(nseq):
        rq, rk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        if lens_q[b] == 0 or lens_k[b] == 0:
            continue
        sl = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[b:b + 1])
        keep = None
        if norm.dropout_p > 0:
            keep = _philox.dropout_keep_mask(seed64, offset, 1, H, lens_q[b], lens_k[b], norm.dropout_p,
                                             batch_start=b)
        ref_kw = dict(window_size=norm.window, softcap=norm.softcap, alibi_slopes=sl, dropout_p=norm.dropout_p,
                      dropout_mask=keep)
        qb, kb, vb, dob = q[:, rq], k[:, rk], v[:, rk], do[:, rq]
        for acc_, x, rows in zip(pts, attention_pytorch(qb, kb, vb, dob, causal, scale, ref_kw), (rq, rq, rk, rk)):
            acc_[rows] = x[0]
        m = attention_magnitudes(qb, kb, vb, dob, causal, scale, window_size=norm.window, softcap=norm.softcap,
                                 alibi_slopes=sl)
        mags = [max(a, x / (1.0 - norm.dropout_p)) for a, x in zip(mags, m)]
    check("out", out[0], o_ref, pts[0], 2, magnitude=mags[0])
    empty = torch.isneginf(lse_ref)
    assert torch.equal(torch.isneginf(lse), empty), "lse: the rows without keys differ"
    if not empty.all():
        check_fp32("lse", lse[~empty], lse_ref[~empty])
    for name, x, ref, pt, m in zip(("dq", "dk", "dv"), (dq, dk, dv), (dq_ref, dk_ref, dv_ref), pts[1:], mags[1:]):
        check(name, x[0], ref, pt, 3, magnitude=m)
    return out, lse, dq, dk, dv


# (lens_q, lens_k, H, Hk, D, causal, dtype, deterministic dQ, options, kv_packed). Lengths 0 and 1,
# 63/64/65 and 130 (64-row blocks cut partially, a sequence starting mid-block), sequences with
# queries but no keys (out 0, lse -inf) and keys but no queries (dK = dV = 0), Tq > Tk and Tq < Tk
# per sequence (bottom-right masks), GQA/MQA; the head-dim instantiations 64, 128 (112 padded),
# 256 (and 40 padded); the plain kernels and the kHasModifiers ones with every option.
VARLEN_CASES = [
    ([65, 0, 1, 130], [65, 0, 1, 130], 2, 1, 64, True, FP16, False, O(), False),           # self-attention, MQA
    ([3, 64, 0, 70, 5], [80, 64, 5, 0, 1], 4, 2, 40, True, BF16, True, O(), True),          # bottom-right, empty
    ([63, 1, 97], [63, 50, 130], 2, 2, 112, False, FP16, True,
     O(window=(20, 5), softcap=30.0, alibi="bh"), False),                                    # window, softcap, ALiBi
    ([37, 0, 66], [50, 9, 66], 3, 1, 64, False, FP16, False, O(alibi="h", dropout_p=0.17), False),  # dropout
    ([33, 65], [70, 1], 2, 1, 256, True, BF16, False, O(softcap=30.0, dropout_p=0.17), False),
    ([1, 129], [129, 2], 2, 2, 128, False, BF16, True, O(window=(3, -1)), True),
]


def _varlen_id(c):
    lq, lk, H, Hk, D, causal, dtype, det, o, kvp = c
    parts = [f"q{'_'.join(map(str, lq))}-k{'_'.join(map(str, lk))}-H{H}Hk{Hk}D{D}", "causal" if causal else "full",
             str(dtype).split(".")[1], "det" if det else "atomic"]
    if o.window != (-1, -1):
        parts.append(f"w{o.window[0]}_{o.window[1]}")
    if o.softcap:
        parts.append(f"softcap{o.softcap:g}")
    if o.alibi:
        parts.append(f"alibi_{o.alibi}")
    if o.dropout_p:
        parts.append(f"drop{o.dropout_p:g}")
    if kvp:
        parts.append("kvpacked")
    return "-".join(parts)


@pytest.mark.parametrize("case", VARLEN_CASES, ids=_varlen_id)
def test_attention_emulated_varlen(libs, case):
    lq, lk, H, Hk, D, causal, dtype, det, opts, kvp = case
    run_attention_varlen(libs["attention"], lq, lk, H, Hk, D, causal, dtype, det, opts, seed=7, kv_packed=kvp)


def test_attention_emulated_varlen_equal_lengths_is_the_dense_batch(libs):
    """Equal lengths: the packed call is the dense batch bit for bit (out, lse, dq, dk, dv), with
    dropout (sequence b draws batch entry b's Philox mask), ALiBi (B, H), GQA and a window; the
    deterministic dQ, so that no sum depends on the schedule."""
    lib = libs["attention"]
    B, Tq, Tk, H, Hk, D = 3, 50, 70, 4, 2, 64
    torch.manual_seed(9)
    q, do = (torch.randn(B, Tq, H, D).half() for _ in range(2))
    k, v = (torch.randn(B, Tk, Hk, D).half() for _ in range(2))
    slopes = torch.rand(B, H) * 0.5
    norm = normalise(True, (40, -1), 0.0, 0.17, Tk)
    opts = AttnOptions(window=norm.window, dropout_p=norm.dropout_p)
    scale = 1.0 / math.sqrt(D)
    dense = emu_attention(lib, q, k, v, do, scale, True, opts, True, slopes)
    pack = lambda x: x.reshape(1, -1, *x.shape[2:])  # noqa: E731
    cu = (_cu([Tq] * B), _cu([Tk] * B))
    packed = emu_attention(lib, pack(q), pack(k), pack(v), pack(do), scale, True, opts, True, slopes, cu)
    lse_dense = dense[1].permute(1, 0, 2).reshape(1, H, B * Tq)  # (B, H, Tq) -> (H, B * Tq)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), (pack(dense[0]), lse_dense, *map(pack, dense[2:])),
                          packed):
        assert torch.equal(a, b), f"{name}: packed != dense batch ({(a != b).sum()} elements differ)"


# --- layer norm ---------------------------------------------------------------------------------

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _ln_signatures(dll):
    L = ctypes.c_int64
    dll.emu_ln_forward.argtypes = [P, P, P, P, P, P, P, P, L, I, F32, I]
    dll.emu_ln_backward_num_blocks.argtypes = [P, P, P, P, P, P, P, P, P, L, I, I, ctypes.POINTER(I)]
    dll.emu_ln_backward.argtypes = [P, P, P, P, P, P, P, P, P, P, P, L, I, I, I]


def run_layer_norm(lib, M, N, dtype, has_w, has_b, misalign=0, nan_row=None, seed=0, residual=False):
    """Forward and backward of one (M, N) problem; returns the backward's number of blocks.

    With ``residual``: the fused add. The forward gets x and r and must store s = x + r rounded
    once (bit for bit the float64 sum rounded to the dtype) and normalise s as stored; the backward
    gets the kernel's s as its x and a dresidual, and dx must be LayerNorm's dx + dresidual, held to
    PyTorch's unfused result (its dx + dresidual in the dtype) by the same rule."""
    _ln_signatures(lib.dll)
    lib.dll.emu_clear_registry()
    lib.dll.emu_set_device(2, 2)  # 2 SMs x 2 blocks: the backward gives each block several rows
    torch.manual_seed(seed)
    eps = 1e-5
    x = (torch.randn(M, N) * 2 + 0.5).to(dtype)
    if nan_row is not None:
        x[nan_row, N // 2] = float("nan")
    w = (1 + 0.5 * torch.randn(N)).to(dtype) if has_w else None
    b = torch.randn(N).to(dtype) if has_b else None
    dy = torch.randn(M, N).to(dtype)
    r = (torch.randn(M, N) * 3 - 1).to(dtype) if residual else None
    dres = torch.randn(M, N).to(dtype) if residual else None
    ptr = lambda buf: buf.ptr() if buf is not None else None  # noqa: E731

    xb = Buf(lib, (M, N), dtype, x, misalign)
    wb = Buf(lib, (N,), dtype, w, misalign) if has_w else None
    bb = Buf(lib, (N,), dtype, b, misalign) if has_b else None
    rb = Buf(lib, (M, N), dtype, r, misalign) if residual else None
    sb = Buf(lib, (M, N), dtype, misalign=misalign) if residual else None
    y = Buf(lib, (M, N), dtype, misalign=misalign)
    mean, rstd = Buf(lib, (M,), torch.float32), Buf(lib, (M,), torch.float32)
    ins = [xb] + [t for t in (wb, bb, rb) if t is not None]
    rc = lib.dll.emu_ln_forward(xb.ptr(), ptr(wb), ptr(bb), ptr(rb), y.ptr(), ptr(sb), mean.ptr(), rstd.ptr(), M,
                                N, eps, DTYPE_CODE[dtype])
    assert rc == 0, f"forward launch returned cudaError {rc}"
    lib.finish(y, mean, rstd, *ins, *([sb] if residual else []))

    if residual:  # from here on the normalised row is s, as the unfused layer_norm(x + r) sees it
        s_ref = (x.double() + r.double()).to(dtype)
        bits = _INT_VIEW[dtype][0]
        assert torch.equal(sb.t.view(bits), s_ref.view(bits)), \
            f"s is not x + r rounded once: max |s - ref| {max_abs_diff(sb.t, s_ref):.3e}"
        x, xb = s_ref, sb
    xd, wd, bd = (None if t is None else t.double() for t in (x, w, b))
    y_ref, mu, rs = layer_norm_forward_reference(xd, wd, bd, eps)
    if nan_row is not None:  # NaN propagates into its row only, the other rows stay exact
        assert torch.isnan(y.t[nan_row]).all() and math.isnan(mean.t[nan_row]) and math.isnan(rstd.t[nan_row])
        keep = torch.arange(M) != nan_row
        y_pt = F.layer_norm(x[keep], (N,), w, b, eps)
        check("y", y.t[keep], y_ref[keep], y_pt, 2, magnitude=layer_norm_magnitudes(x[keep], w, b, None, eps)[0])
        check_fp32("mean", mean.t[keep], mu[keep])
        check_fp32("rstd", rstd.t[keep], rs[keep])
        return None

    xr = x.detach().requires_grad_()
    wr = w.detach().requires_grad_() if has_w else None
    br = b.detach().requires_grad_() if has_b else None
    y_pt = F.layer_norm(xr, (N,), wr, br, eps)
    y_pt.backward(dy)
    mags = layer_norm_magnitudes(x, w, b, dy, eps)
    check("y", y.t, y_ref, y_pt.detach(), 2, magnitude=mags[0])
    check_fp32("mean", mean.t, mu)
    check_fp32("rstd", rstd.t, rs)

    dyb = Buf(lib, (M, N), dtype, dy, misalign)
    drb = Buf(lib, (M, N), dtype, dres, misalign) if residual else None
    dx = Buf(lib, (M, N), dtype, misalign=misalign)
    dw = Buf(lib, (N,), dtype) if has_w else None
    db = Buf(lib, (N,), dtype) if has_b else None
    nb = I(0)
    rc = lib.dll.emu_ln_backward_num_blocks(dyb.ptr(), xb.ptr(), ptr(wb), mean.ptr(), rstd.ptr(), ptr(drb), dx.ptr(),
                                            ptr(dw), ptr(db), M, N, DTYPE_CODE[dtype], ctypes.byref(nb))
    assert rc == 0 and 1 <= nb.value <= M
    # Partial workspaces start as NaN: the kernel must write every element before reading it.
    dwp = Buf(lib, (nb.value, N), torch.float32) if has_w else None
    dbp = Buf(lib, (nb.value, N), torch.float32) if has_b else None
    rc = lib.dll.emu_ln_backward(dyb.ptr(), xb.ptr(), ptr(wb), mean.ptr(), rstd.ptr(), ptr(drb), dx.ptr(), ptr(dw),
                                 ptr(db), ptr(dwp), ptr(dbp), M, N, nb.value, DTYPE_CODE[dtype])
    assert rc == 0, f"backward launch returned cudaError {rc}"
    lib.finish(dx, dyb, mean, rstd, *ins, *[t for t in (dw, db, dwp, dbp, drb) if t is not None])

    dx_ref, dw_ref, db_ref = layer_norm_backward_reference(dy.double(), xd, wd, mu, rs, has_b)
    dx_pt, dx_mag = xr.grad, mags[1]
    if residual:  # PyTorch unfused: its dx rounded, then + dresidual rounded again
        dx_ref, dx_pt = dx_ref + dres.double(), xr.grad + dres
        dx_mag += dres.abs().max().item()
    check("dx", dx.t, dx_ref, dx_pt, 3, magnitude=dx_mag)
    if has_w:
        check("dw", dw.t, dw_ref, wr.grad, 3, magnitude=mags[2])
    if has_b:
        check("db", db.t, db_ref, br.grad, 3, magnitude=mags[3])
    return nb.value


FP32 = torch.float32
# (M, N, dtype, weight, bias, misalign). Vector path: N a multiple of 16 bytes and aligned
# pointers; scalar path: N = 1, 123, 8201 or pointers one element off 16-byte alignment.
# N = 8200 and 8201 exceed the backward's register slots (8192 vector, 4096 scalar elements per
# 512-thread block) and 8201 the scalar forward's (8192); 16400 exceeds the fp32 vector forward's
# 16384. M = 37 on the emulated 2 SMs x 2 blocks gives 9-10 rows per backward block.
LAYER_NORM_CASES = [
    (37, 768, FP32, True, True, 0),
    (37, 768, FP16, True, True, 0),
    (37, 768, BF16, True, False, 0),
    (37, 768, BF16, True, True, 1),
    (37, 123, FP32, False, True, 0),
    (37, 123, FP16, True, True, 0),
    (37, 123, BF16, False, False, 0),
    (5, 1, FP32, True, True, 0),
    (3, 1, FP16, False, False, 0),
    (9, 8200, FP32, True, True, 0),
    (9, 8200, BF16, True, False, 0),
    (6, 8201, FP32, True, True, 0),
    (5, 8200, FP16, False, True, 1),
    (2, 16400, FP32, True, True, 0),
]


def _ln_id(c):
    M, N, dtype, w, b, mis = c
    flags = f"{'w' if w else 'now'}-{'b' if b else 'nob'}{'-misaligned' if mis else ''}"
    return f"M{M}N{N}-{str(dtype).split('.')[1]}-{flags}"


@pytest.mark.parametrize("case", LAYER_NORM_CASES, ids=_ln_id)
def test_layer_norm_emulated(libs, case):
    nb = run_layer_norm(libs["layer_norm"], *case)
    if case[0] == 37:
        assert nb == 4, "expected 4 backward blocks (9-10 rows each) on the emulated device"


def test_layer_norm_emulated_nan_propagates(libs):
    run_layer_norm(libs["layer_norm"], 6, 768, FP16, True, True, nan_row=2)


# The fused residual add, (M, N, dtype, weight, bias, misalign) as above: vector path (768, 8200,
# 16400 fp32: beyond the vector forward's slots, so s is re-read) and scalar path (N = 1, 123, 8201:
# beyond the scalar forward's and backward's slots; 768 with misaligned pointers); M = 1 and odd M.
LAYER_NORM_RESIDUAL_CASES = [
    (37, 768, FP32, True, True, 0),
    (37, 768, BF16, True, False, 0),
    (37, 768, FP16, False, True, 1),
    (37, 123, BF16, True, True, 0),
    (1, 123, FP16, False, False, 0),
    (5, 1, FP32, True, True, 0),
    (9, 8200, FP16, True, True, 0),
    (3, 8201, BF16, True, True, 0),
    (2, 16400, FP32, True, False, 0),
]


@pytest.mark.parametrize("case", LAYER_NORM_RESIDUAL_CASES, ids=_ln_id)
def test_layer_norm_emulated_residual(libs, case):
    run_layer_norm(libs["layer_norm"], *case, residual=True)


# --- RMSNorm ------------------------------------------------------------------------------------

def _rms_signatures(dll):
    L = ctypes.c_int64
    dll.emu_rms_forward.argtypes = [P, P, P, P, P, P, L, I, F32, F32, I]
    dll.emu_rms_backward_num_blocks.argtypes = [P, P, P, P, P, P, P, L, I, F32, I, ctypes.POINTER(I)]
    dll.emu_rms_backward.argtypes = [P, P, P, P, P, P, P, P, L, I, I, F32, I]


def run_rms_norm(lib, M, N, dtype, has_w, offset, misalign=0, residual=False, seed=0):
    """Forward and backward of one (M, N) RMSNorm; returns the backward's number of blocks.

    Against the float64 reference launchers on the same rounded inputs, PyTorch's F.rms_norm in
    the dtype (scale offset + w formed in the dtype) as `pt`. With ``residual`` as run_layer_norm:
    s must be x + r rounded once, bit for bit, and is what is normalised; dx + dresidual is held to
    PyTorch's unfused dx + dresidual."""
    _rms_signatures(lib.dll)
    lib.dll.emu_clear_registry()
    lib.dll.emu_set_device(2, 2)  # 2 SMs x 2 blocks: the backward gives each block several rows
    torch.manual_seed(seed)
    eps = 1e-6
    x = (torch.randn(M, N) * 2 + 0.5).to(dtype)
    w = (0.5 * torch.randn(N)).to(dtype) if has_w else None
    dy = torch.randn(M, N).to(dtype)
    r = (torch.randn(M, N) * 3 - 1).to(dtype) if residual else None
    dres = torch.randn(M, N).to(dtype) if residual else None
    ptr = lambda buf: buf.ptr() if buf is not None else None  # noqa: E731
    code = DTYPE_CODE[dtype]

    xb = Buf(lib, (M, N), dtype, x, misalign)
    wb = Buf(lib, (N,), dtype, w, misalign) if has_w else None
    rb = Buf(lib, (M, N), dtype, r, misalign) if residual else None
    sb = Buf(lib, (M, N), dtype, misalign=misalign) if residual else None
    y = Buf(lib, (M, N), dtype, misalign=misalign)
    rstd = Buf(lib, (M,), torch.float32)
    ins = [t for t in (xb, wb, rb) if t is not None]
    rc = lib.dll.emu_rms_forward(xb.ptr(), ptr(wb), ptr(rb), y.ptr(), ptr(sb), rstd.ptr(), M, N, eps, offset, code)
    assert rc == 0, f"forward launch returned cudaError {rc}"
    lib.finish(y, rstd, *ins, *([sb] if residual else []))

    if residual:
        s_ref = (x.double() + r.double()).to(dtype)
        bits = _INT_VIEW[dtype][0]
        assert torch.equal(sb.t.view(bits), s_ref.view(bits)), \
            f"s is not x + r rounded once: max |s - ref| {max_abs_diff(sb.t, s_ref):.3e}"
        x, xb = s_ref, sb
    xd, wd = x.double(), None if w is None else w.double()
    y_ref, rs = rms_norm_forward_reference(xd, wd, eps, offset)
    xr = x.detach().requires_grad_()
    wr = w.detach().requires_grad_() if has_w else None
    y_pt = F.rms_norm(xr, (N,), None if wr is None else offset + wr, eps)
    y_pt.backward(dy)
    mags = rms_norm_magnitudes(x, w, dy, eps, offset)
    check("y", y.t, y_ref, y_pt.detach(), 2, magnitude=mags[0])
    check_fp32("rstd", rstd.t, rs)

    dyb = Buf(lib, (M, N), dtype, dy, misalign)
    drb = Buf(lib, (M, N), dtype, dres, misalign) if residual else None
    dx = Buf(lib, (M, N), dtype, misalign=misalign)
    dw = Buf(lib, (N,), dtype) if has_w else None
    nb = I(0)
    rc = lib.dll.emu_rms_backward_num_blocks(dyb.ptr(), xb.ptr(), ptr(wb), rstd.ptr(), ptr(drb), dx.ptr(), ptr(dw),
                                             M, N, offset, code, ctypes.byref(nb))
    assert rc == 0 and 1 <= nb.value <= M
    dwp = Buf(lib, (nb.value, N), torch.float32) if has_w else None  # NaN: written before it is read
    rc = lib.dll.emu_rms_backward(dyb.ptr(), xb.ptr(), ptr(wb), rstd.ptr(), ptr(drb), dx.ptr(), ptr(dw), ptr(dwp),
                                  M, N, nb.value, offset, code)
    assert rc == 0, f"backward launch returned cudaError {rc}"
    lib.finish(dx, dyb, rstd, *ins, *[t for t in (dw, dwp, drb) if t is not None])

    dx_ref, dw_ref = rms_norm_backward_reference(dy.double(), xd, wd, rs, offset)
    dx_pt, dx_mag = xr.grad, mags[1]
    if residual:
        dx_ref, dx_pt = dx_ref + dres.double(), xr.grad + dres
        dx_mag += dres.abs().max().item()
    check("dx", dx.t, dx_ref, dx_pt, 3, magnitude=dx_mag)
    if has_w:
        check("dw", dw.t, dw_ref, wr.grad, 3, magnitude=mags[2])
    return nb.value


# (M, N, dtype, weight, offset, misalign, residual). Vector path: N a multiple of 16 bytes and
# aligned pointers; scalar path: N = 1, 123, 8201 or pointers one element off. N = 8200 / 8201
# exceed the backward's register slots (the partial row is accumulated in memory) and 8201 the
# scalar forward's; 16400 (fp32) the vector forward's. M = 37 gives 4 backward blocks of 9-10 rows,
# M = 5 one block of two rows (its second row adds to the partial row in memory).
RMS_NORM_CASES = [
    (37, 768, FP32, True, 0.0, 0, False),
    (37, 768, FP16, True, 1.0, 0, False),
    (37, 768, BF16, False, 0.0, 0, False),
    (37, 768, FP16, True, 0.0, 1, True),
    (37, 123, FP32, True, 1.0, 0, True),
    (37, 123, FP16, False, 0.0, 0, False),
    (5, 1, FP32, True, 0.0, 0, False),
    (3, 1, BF16, False, 1.0, 0, True),
    (5, 8200, FP16, True, 0.0, 0, False),
    (5, 8201, FP32, True, 1.0, 0, True),
    (2, 16400, FP32, False, 0.0, 0, True),
]


def _rms_id(c):
    M, N, dtype, w, off, mis, res = c
    flags = f"{'w' if w else 'now'}-off{off:g}{'-misaligned' if mis else ''}{'-residual' if res else ''}"
    return f"M{M}N{N}-{str(dtype).split('.')[1]}-{flags}"


@pytest.mark.parametrize("case", RMS_NORM_CASES, ids=_rms_id)
def test_rms_norm_emulated(libs, case):
    *args, residual = case
    nb = run_rms_norm(libs["rms_norm"], *args, residual=residual)
    if case[0] == 37:
        assert nb == 4, "expected 4 backward blocks (9-10 rows each) on the emulated device"


def test_rms_norm_emulated_nan_propagates(libs):
    """A NaN in x: its row's y and rstd are NaN, every other row exact."""
    lib = libs["rms_norm"]
    _rms_signatures(lib.dll)
    lib.dll.emu_clear_registry()
    M, N = 4, 768
    x = torch.randn(M, N, dtype=FP16)
    x[2, 100] = float("nan")
    xb, y, rstd = Buf(lib, (M, N), FP16, x), Buf(lib, (M, N), FP16), Buf(lib, (M,), FP32)
    assert lib.dll.emu_rms_forward(xb.ptr(), None, None, y.ptr(), None, rstd.ptr(), M, N, 1e-6, 0.0, 1) == 0
    lib.finish(y, rstd, xb)
    assert torch.isnan(y.t[2]).all() and math.isnan(rstd.t[2])
    keep = torch.arange(M) != 2
    assert not torch.isnan(y.t[keep]).any() and not torch.isnan(rstd.t[keep]).any()


# --- linear_cross_entropy's logits epilogue -----------------------------------------------------

def _ce_signatures(dll):
    dll.emu_ce_logits.argtypes = [P, P, P, P, I64, I64, I64, F32, F32]


def run_ce_logits(lib, C, V, smoothing, softcap, scaled, misalign=0, seed=0):
    """One (C, V) fp32 chunk through the kernel against cross_entropy_logits_reference in float64
    (`pt`: the same reference in fp32). Rows: a dominant logit (exp must not overflow), equal
    large logits (loss log V), an ignored row (loss 0, gradient row 0), target V - 1."""
    _ce_signatures(lib.dll)
    lib.dll.emu_clear_registry()
    torch.manual_seed(seed)
    z = torch.randn(C, V) * 4
    z[1, 0] = 80.0
    z[2] = 50.0
    t = torch.randint(0, V, (C,))
    t[3] = -100
    t[4] = V - 1
    scale = torch.rand(C) + 0.5 if scaled else None
    zb = Buf(lib, (C, V), FP32, z, misalign)
    sb = Buf(lib, (C,), FP32, scale) if scaled else None
    losses = Buf(lib, (C,), FP32)
    lib.dll.emu_register(t.data_ptr(), t.numel() * 8)
    rc = lib.dll.emu_ce_logits(zb.ptr(), t.data_ptr(), sb.ptr() if scaled else None, losses.ptr(), C, V, -100,
                               smoothing, softcap)
    assert rc == 0, f"launch returned cudaError {rc}"
    lib.finish(zb, losses, *([sb] if scaled else []))

    z_ref, z_pt = z.double(), z.clone()
    ref = cross_entropy_logits_reference(z_ref, t, None if scale is None else scale.double(), -100, smoothing, softcap)
    pt = cross_entropy_logits_reference(z_pt, t, scale, -100, smoothing, softcap)
    # Magnitudes (gptfast.testing.linear_cross_entropy_magnitudes' reasoning, on the logits): the
    # loss is lse, z'_y and mean z' (each 1-Lipschitz in z'): 2 max|z'| per term, sqrt(V) terms;
    # dz = s (p + q) (1 + |z'|) (p's relative error is z''s absolute one).
    zc = softcap * torch.tanh(z.double() / softcap) if softcap else z.double()
    root_v = math.sqrt(V)
    check("loss", losses.t, ref, pt, 2, magnitude=root_v * 2 * zc.abs().max().item())
    assert losses.t[3] == 0, "an ignored row's loss must be 0"
    assert abs(losses.t[2].item() - math.log(V)) <= rounding_atol(root_v * 100, FP32), "equal logits: loss log(V)"
    if not scaled:
        return
    p = torch.softmax(zc, -1)
    q = torch.zeros_like(p).scatter_(1, torch.where(t != -100, t, 0)[:, None], 1.0) * (1 - smoothing) + smoothing / V
    mag = root_v * (scale.double()[:, None] * (p + q) * (1 + zc.abs())).max().item()
    check("dz", zb.t, z_ref, z_pt, 3, magnitude=mag)
    assert (zb.t[3] == 0).all(), "an ignored row's gradient must be 0"


# (C, V, label_smoothing, softcap, row_scale). V = 1000, 2052 (> 512 float4s: a thread with two)
# take the 16-byte path; V = 1 (loss 0, dz 0), 37, 1001 (not multiples of 4) and misaligned z the
# scalar one.
CE_CASES = [
    (9, 1000, 0.0, 0.0, True, 0),
    (9, 1000, 0.1, 30.0, True, 0),
    (9, 1001, 0.2, 5.0, True, 0),
    (9, 37, 0.0, 0.0, True, 0),
    (9, 2052, 0.0, 7.0, False, 0),
    (9, 1000, 0.3, 0.0, True, 1),
    (6, 1, 0.1, 2.0, True, 0),
]


def _ce_id(c):
    C, V, eps, cap, scaled, mis = c
    return f"C{C}V{V}-ls{eps:g}-cap{cap:g}{'-grad' if scaled else ''}{'-misaligned' if mis else ''}"


@pytest.mark.parametrize("case", CE_CASES, ids=_ce_id)
def test_cross_entropy_logits_emulated(libs, case):
    run_ce_logits(libs["linear_cross_entropy"], *case)


def test_cross_entropy_logits_emulated_nan_propagates(libs):
    """A NaN logit makes its row's loss and gradient NaN; the other rows stay finite."""
    lib = libs["linear_cross_entropy"]
    _ce_signatures(lib.dll)
    lib.dll.emu_clear_registry()
    C, V = 3, 1000
    z = torch.randn(C, V)
    z[1, 321] = float("nan")
    t = torch.tensor([5, 6, 7])
    zb, sb, losses = Buf(lib, (C, V), FP32, z), Buf(lib, (C,), FP32, torch.ones(C)), Buf(lib, (C,), FP32)
    lib.dll.emu_register(t.data_ptr(), t.numel() * 8)
    assert lib.dll.emu_ce_logits(zb.ptr(), t.data_ptr(), sb.ptr(), losses.ptr(), C, V, -100, 0.0, 0.0) == 0
    lib.finish(zb, losses, sb)
    assert math.isnan(losses.t[1]) and torch.isnan(zb.t[1]).all()
    assert torch.isfinite(losses.t[[0, 2]]).all() and torch.isfinite(zb.t[[0, 2]]).all()


# --- GELU feed-forward: gelu_ffn.cu's own kernels (not its cuBLASLt GEMMs) --------------------

L64 = ctypes.c_int64


def _gelu_signatures(dll):
    dll.emu_gelu_forward.argtypes = [P, P, L64, I, I]
    dll.emu_gelu_backward.argtypes = [P, P, P, P, P, L64, L64, I, I]
    dll.emu_column_sum.argtypes = [P, P, P, L64, L64, I]
    dll.emu_column_chunks.argtypes = [L64, ctypes.POINTER(L64), ctypes.POINTER(L64)]


def gelu_reference(h, tanh):
    """float64 GELU(h) and GELU'(h): gptfast.ops.gelu_ffn's gelu / gelu_grad on float64."""
    x, approx = h.double(), "tanh" if tanh else "none"
    return gelu(x, approx), gelu_grad(x, approx)


def _chunks(lib, rows):
    rpc, count = L64(0), L64(0)
    lib.dll.emu_column_chunks(rows, ctypes.byref(rpc), ctypes.byref(count))
    return rpc.value, count.value


def _gelu_atol(dtype):
    """Relative floor of the bounds: fp32 ~1 ulp of the largest |ref| (GELU and its sums are
    fp32-accurate: precise tanhf/erff/expf, fp32 accumulation), 16-bit as LayerNorm's."""
    return 1e-7 if dtype == torch.float32 else 1e-5


def run_gelu(lib, M, N, dtype, tanh, with_db1=True, misalign=0, nan_at=None, seed=0):
    """gelu_forward, then gelu_backward on the same h; returns the backward's chunk count.

    nan_at (r, c): h[r, c] = NaN, which must reach a[r, c], dh[r, c] and db1[c] and nothing else.
    """
    _gelu_signatures(lib.dll)
    lib.dll.emu_clear_registry()
    torch.manual_seed(seed)
    h = (torch.randn(M, N) * 2).to(dtype)
    if nan_at is not None:
        h[nan_at] = float("nan")
    dA = torch.randn(M, N).to(dtype)
    approx = "tanh" if tanh else "none"
    code = DTYPE_CODE[dtype]
    bad = torch.zeros(M, N, dtype=torch.bool)
    if nan_at is not None:
        bad[nan_at] = True
    keep, keep_col = ~bad, ~bad.any(0)
    a_ref, g_ref = gelu_reference(h, tanh)

    def expect_nan(name, out, mask):
        assert torch.equal(torch.isnan(out), mask), f"{name}: NaN where h has none, or a NaN in h lost"

    # Forward: vector path with a tail (M*N not a multiple of 8 or 4) unless misaligned.
    hb = Buf(lib, (M, N), dtype, h, misalign)
    a = Buf(lib, (M, N), dtype, misalign=misalign)
    rc = lib.dll.emu_gelu_forward(hb.ptr(), a.ptr(), M * N, code, int(tanh))
    assert rc == 0, f"gelu_forward launch returned cudaError {rc}"
    lib.finish(a, hb)
    a_pt = F.gelu(h, approximate=approx)
    expect_nan("a (forward)", a.t, bad)
    check("a (forward)", a.t[keep], a_ref[keep], a_pt[keep], 2, _gelu_atol(dtype))

    # Backward: dh = dA * GELU'(h) in place, a recomputed, db1 through the chunked column sums.
    dh = Buf(lib, (M, N), dtype, dA, misalign)
    a2 = Buf(lib, (M, N), dtype, misalign=misalign)
    rpc, nchunks = _chunks(lib, M)
    ws = Buf(lib, (nchunks, N), torch.float32) if with_db1 else None  # NaN: every partial must be written
    db1 = Buf(lib, (N,), dtype) if with_db1 else None
    rc = lib.dll.emu_gelu_backward(hb.ptr(), dh.ptr(), a2.ptr(), db1.ptr() if db1 else None,
                                   ws.ptr() if ws else None, M, N, code, int(tanh))
    assert rc == 0, f"gelu_backward launch returned cudaError {rc}"
    lib.finish(dh, a2, hb, *([ws, db1] if with_db1 else []))
    dh_ref = dA.double() * g_ref
    dh_pt = torch.ops.aten.gelu_backward(dA, h, approximate=approx)
    expect_nan("a (backward)", a2.t, bad)
    expect_nan("dh", dh.t, bad)
    check("a (backward)", a2.t[keep], a_ref[keep], a_pt[keep], 2, _gelu_atol(dtype))
    check("dh", dh.t[keep], dh_ref[keep], dh_pt[keep], 3, _gelu_atol(dtype))
    if with_db1:
        expect_nan("db1", db1.t, ~keep_col)
        check("db1", db1.t[keep_col], dh_ref.sum(0)[keep_col], dh_pt.sum(0)[keep_col], 3, _gelu_atol(dtype))
        # The contract: db1 sums the rounded dh in fp32; the kernel's own dh, summed in float64.
        own = dh.t.double().sum(0)[keep_col]
        slack = torch.finfo(dtype).eps * own.abs() + 1e-6 * dh.t.double().abs().sum(0)[keep_col]
        assert ((db1.t.double()[keep_col] - own).abs() <= slack).all(), "db1 is not the column sum of dh"
    return nchunks


def run_column_sum(lib, M, N, dtype, misalign=0, seed=0):
    """column_sum (db2 = column sums of dout); returns the chunk count."""
    _gelu_signatures(lib.dll)
    lib.dll.emu_clear_registry()
    torch.manual_seed(seed)
    x = (torch.randn(M, N) + 0.25).to(dtype)
    xb = Buf(lib, (M, N), dtype, x, misalign)
    _, nchunks = _chunks(lib, M)
    ws = Buf(lib, (nchunks, N), torch.float32)
    out = Buf(lib, (N,), dtype, misalign=misalign)
    rc = lib.dll.emu_column_sum(xb.ptr(), out.ptr(), ws.ptr(), M, N, DTYPE_CODE[dtype])
    assert rc == 0, f"column_sum launch returned cudaError {rc}"
    lib.finish(out, ws, xb)
    check("db2", out.t, x.double().sum(0), x.sum(0), 3, _gelu_atol(dtype))
    return nchunks


# (M, N, misalign) of the forward: 37 x 333 aligned runs the 16-byte path plus a one-element tail
# (12321 elements, 7 blocks of 256 threads); 16 x 256 one element off alignment runs scalar.
GELU_FORWARD_SIZES = [(37, 333, 0), (16, 256, 1)]
# (M, N, dtype, tanh, db1, misalign) of the backward (and the forward before it). Vector path: N a
# multiple of 8 (16-bit) or 4 (fp32) and aligned pointers; N = 264 and 132 leave most threads of
# the second column block idle. Scalar path: N = 333 (last thread: 5 valid columns) or misaligned.
# M = 70: 3 chunks of 24, 24, 22 rows; M = 100: 4 chunks of 25; M = 16: one chunk.
GELU_BACKWARD_CASES = [
    (70, 264, FP16, True, True, 0),
    (70, 264, BF16, False, True, 0),
    (100, 132, FP32, True, True, 0),
    (70, 333, BF16, True, True, 0),
    (70, 333, FP32, False, True, 0),
    (37, 333, FP16, False, False, 0),
    (16, 256, FP16, True, True, 1),
    (16, 256, BF16, False, False, 0),
]
# (M, N, dtype, misalign) of column_sum.
COLUMN_SUM_CASES = [
    (70, 333, FP16, 0),
    (100, 264, BF16, 0),
    (70, 132, FP32, 0),
    (33, 40, FP32, 1),
    (5, 7, BF16, 0),
]


def _dt(dtype):
    return str(dtype).split(".")[1]


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16], ids=_dt)
@pytest.mark.parametrize("tanh", [True, False], ids=["tanh", "exact"])
@pytest.mark.parametrize("size", GELU_FORWARD_SIZES, ids=lambda s: f"{s[0]}x{s[1]}{'-misaligned' if s[2] else ''}")
def test_gelu_forward_emulated(libs, size, tanh, dtype):
    M, N, misalign = size
    lib = libs["gelu_ffn"]
    _gelu_signatures(lib.dll)
    lib.dll.emu_clear_registry()
    torch.manual_seed(1)
    h = (torch.randn(M, N) * 3).to(dtype)
    hb = Buf(lib, (M, N), dtype, h, misalign)
    a = Buf(lib, (M, N), dtype, misalign=misalign)
    rc = lib.dll.emu_gelu_forward(hb.ptr(), a.ptr(), M * N, DTYPE_CODE[dtype], int(tanh))
    assert rc == 0, f"gelu_forward launch returned cudaError {rc}"
    lib.finish(a, hb)
    check("a", a.t, gelu_reference(h, tanh)[0], F.gelu(h, approximate="tanh" if tanh else "none"), 2,
          _gelu_atol(dtype))


def _gelu_id(c):
    M, N, dtype, tanh, db1, mis = c
    flags = f"{'db1' if db1 else 'nodb1'}{'-misaligned' if mis else ''}"
    return f"M{M}N{N}-{_dt(dtype)}-{'tanh' if tanh else 'exact'}-{flags}"


@pytest.mark.parametrize("case", GELU_BACKWARD_CASES, ids=_gelu_id)
def test_gelu_backward_emulated(libs, case):
    M = case[0]
    nchunks = run_gelu(libs["gelu_ffn"], *case)
    assert nchunks == {16: 1, 37: 2, 70: 3, 100: 4}[M]


@pytest.mark.parametrize("case", COLUMN_SUM_CASES,
                         ids=lambda c: f"M{c[0]}N{c[1]}-{_dt(c[2])}{'-misaligned' if c[3] else ''}")
def test_column_sum_emulated(libs, case):
    run_column_sum(libs["gelu_ffn"], *case)


@pytest.mark.parametrize("case", [(70, 264, FP16, True, (40, 100)), (37, 333, BF16, False, (36, 332))],
                         ids=["vector-fp16-tanh", "scalar-bf16-exact"])
def test_gelu_emulated_nan_propagates(libs, case):
    M, N, dtype, tanh, at = case
    run_gelu(libs["gelu_ffn"], M, N, dtype, tanh, nan_at=at)


def test_gelu_emulated_empty(libs):
    """rows = 0: the bias gradients are zero (cudaMemsetAsync), nothing else is touched."""
    lib = libs["gelu_ffn"]
    _gelu_signatures(lib.dll)
    lib.dll.emu_clear_registry()
    for dtype in (FP32, BF16):
        db, out, a = Buf(lib, (40,), dtype), Buf(lib, (40,), dtype), Buf(lib, (8,), dtype)
        assert lib.dll.emu_gelu_backward(None, None, None, db.ptr(), None, 0, 40, DTYPE_CODE[dtype], 1) == 0
        assert lib.dll.emu_column_sum(None, out.ptr(), None, 0, 40, DTYPE_CODE[dtype]) == 0
        assert lib.dll.emu_gelu_forward(None, a.ptr(), 0, DTYPE_CODE[dtype], 0) == 0
        lib.finish(db, out, a)
        assert (db.t == 0).all() and (out.t == 0).all() and torch.isnan(a.t).all()


# --- gated feed-forward: gated_ffn.cu's kernels and the host code's GEMM plan ------------------

GATED_ACTS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}


def _gated_signatures(dll):
    dll.emu_gated_forward.argtypes = [P, P, P, L64, I, I]
    dll.emu_gated_backward.argtypes = [P, P, P, P, P, P, L64, L64, I, I]
    dll.emu_gated_chunks.argtypes = [L64, ctypes.POINTER(L64), ctypes.POINTER(L64)]
    dll.emu_gated_ffn_forward.argtypes = [P, L64, L64, L64, L64, P, L64, L64, P, P, L64, L64, P, P, L64, L64, P,
                                          P, P, P, P, I, I]
    dll.emu_gated_ffn_backward.argtypes = [P, P, P, P, L64, L64, L64, L64, P, L64, L64, P, L64, L64, P, L64, L64,
                                           P, P, P, P, P, P, P, P, I, I, ctypes.POINTER(I)]


def gated_act(g, activation):
    """act(g) and act'(g) in g's dtype: the contract's SiLU, gelu_ffn.py's gelu / gelu_grad."""
    if activation == "silu":
        s = torch.sigmoid(g)
        return g * s, s * (1 + g * (1 - s))
    approx = "tanh" if activation == "gelu_tanh" else "none"
    return gelu(g, approx), gelu_grad(g, approx)


def gated_pytorch(x, wg, bg, wu, bu, wd, bd, dout, activation):
    """PyTorch in the inputs' dtype (F.linear, F.silu / F.gelu, autograd): the `pt` of the rule."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, wg, bg, wu, bu, wd, bd)]
    x_, wg_, bg_, wu_, bu_, wd_, bd_ = leaves
    g = F.linear(x_, wg_, bg_)
    act = F.silu(g) if activation == "silu" else F.gelu(g, approximate="tanh" if activation == "gelu_tanh" else "none")
    out = F.linear(act * F.linear(x_, wu_, bu_), wd_, bd_)
    out.backward(dout)
    return out.detach(), [None if t is None else t.grad for t in leaves]


def gated_reference(x, wg, bg, wu, bu, wd, bd, dout, activation):
    """float64 ground truth of the contract on the same (rounded) inputs, and the magnitudes of the
    terms each result sums (the atol of the rule: |terms| propagated as gelu_ffn_magnitudes does,
    |act''| <= 1), times sqrt of the longest reduction."""
    x, wg, bg, wu, bu, wd, bd, dy = [None if t is None else t.double() for t in (x, wg, bg, wu, bu, wd, bd, dout)]
    g, u = F.linear(x, wg, bg), F.linear(x, wu, bu)
    act, dact = gated_act(g, activation)
    a = act * u
    out = F.linear(a, wd, bd)
    da = dy @ wd
    dg, du = da * u * dact, da * act
    ref = {"out": out, "g": g, "u": u, "dx": dg @ wg + du @ wu, "dw_gate": dg.t() @ x, "dw_up": du.t() @ x,
           "dw_down": dy.t() @ a, "db_gate": dg.sum(0), "db_up": du.sum(0), "db_down": dy.sum(0)}
    ab = lambda t: 0.0 if t is None else t.abs()  # noqa: E731
    big_g, big_u = x.abs() @ wg.abs().t() + ab(bg), x.abs() @ wu.abs().t() + ab(bu)
    big_a = (act * u).abs() + dact.abs() * u.abs() * big_g + act.abs() * big_u
    s_da = dy.abs() @ wd.abs()
    big_dg = s_da * u.abs() * dact.abs() + da.abs() * (big_u * dact.abs() + u.abs() * big_g)
    big_du = s_da * act.abs() + da.abs() * dact.abs() * big_g
    M, K = x.shape
    H, N = wg.shape[0], wd.shape[0]
    fwd, bwd = math.sqrt(max(K, H)), math.sqrt(max(M, K, H, N))
    mx = lambda t: float(t.max()) if t.numel() else 0.0  # noqa: E731
    mag = {"g": fwd * mx(big_g), "u": fwd * mx(big_u), "out": fwd * mx(big_a @ wd.abs().t() + ab(bd)),
           "dx": bwd * mx(big_dg @ wg.abs() + big_du @ wu.abs()), "dw_gate": bwd * mx(big_dg.t() @ x.abs()),
           "dw_up": bwd * mx(big_du.t() @ x.abs()), "dw_down": bwd * mx(dy.abs().t() @ big_a),
           "db_gate": bwd * mx(big_dg.sum(0)), "db_up": bwd * mx(big_du.sum(0)), "db_down": bwd * mx(dy.abs().sum(0))}
    return ref, mag


@dataclass(frozen=True)
class GatedCase:
    M: int
    K: int
    H: int
    N: int
    dtype: torch.dtype
    activation: str
    biases: str = "gud"      # which of b_gate (g), b_up (u), b_down (d) are given
    weights: str = "fused"   # fused: row slices of one (2H, K); fused_t: of a transposed (K, 2H) view;
                             # separate: two tensors; separate_t: two transposed views
    misalign: int = 0        # elements off 16-byte alignment for x, g, u, dout and the outputs


def _gated_weights(lib, case, wg, wu):
    """Registered buffers holding w_gate and w_up in the case's layout; returns (views, buffers)."""
    H, K, dt = case.H, case.K, case.dtype
    if case.weights == "fused":
        buf = Buf(lib, (2 * H, K), dt, torch.cat([wg, wu]))
        return (buf.t[:H], buf.t[H:]), [buf]
    if case.weights == "fused_t":
        buf = Buf(lib, (K, 2 * H), dt, torch.cat([wg, wu]).t())
        w = buf.t.t()
        return (w[:H], w[H:]), [buf]
    bufs = []
    for w in (wg, wu):
        bufs.append(Buf(lib, (K, H), dt, w.t()) if case.weights == "separate_t" else Buf(lib, (H, K), dt, w))
    return tuple(b.t.t() if case.weights == "separate_t" else b.t for b in bufs), bufs


def run_gated(lib, case, seed=0):
    """The block through the plan (forward, then backward) against the float64 contract."""
    _gated_signatures(lib.dll)
    lib.dll.emu_clear_registry()
    M, K, H, N, dt, mis = case.M, case.K, case.H, case.N, case.dtype, case.misalign
    code, act = DTYPE_CODE[dt], GATED_ACTS[case.activation]
    torch.manual_seed(seed)
    x = torch.randn(M, K).to(dt)
    wg, wu = (torch.randn(H, K) / math.sqrt(K)).to(dt), (torch.randn(H, K) / math.sqrt(K)).to(dt)
    wd = (torch.randn(N, H) / math.sqrt(H)).to(dt)
    bg = (torch.randn(H) * 0.5).to(dt) if "g" in case.biases else None
    bu = (torch.randn(H) * 0.5).to(dt) if "u" in case.biases else None
    bd = (torch.randn(N) * 0.5).to(dt) if "d" in case.biases else None
    dout = torch.randn(M, N).to(dt)

    xb = Buf(lib, (M, K), dt, x, mis)
    (wgv, wuv), wbufs = _gated_weights(lib, case, wg, wu)
    wdb = Buf(lib, (N, H), dt, wd)
    bias_bufs = {n: (Buf(lib, t.shape, dt, t) if t is not None else None) for n, t in (("g", bg), ("u", bu), ("d", bd))}
    bp = {n: (b.ptr() if b is not None else None) for n, b in bias_bufs.items()}
    g, u, a = Buf(lib, (M, H), dt, misalign=mis), Buf(lib, (M, H), dt, misalign=mis), Buf(lib, (M, H), dt, misalign=mis)
    out = Buf(lib, (M, N), dt, misalign=mis)
    wd_v = wdb.t
    rc = lib.dll.emu_gated_ffn_forward(xb.ptr(), M, K, H, N, wgv.data_ptr(), *wgv.stride(), bp["g"], wuv.data_ptr(),
                                       *wuv.stride(), bp["u"], wd_v.data_ptr(), *wd_v.stride(), bp["d"], g.ptr(),
                                       u.ptr(), a.ptr(), out.ptr(), code, act)
    inputs = [xb, wdb, *wbufs, *[b for b in bias_bufs.values() if b is not None]]
    assert rc == 0, f"gated forward returned {rc}: {lib.report()}"
    lib.finish(g, u, a, out, *inputs)

    ref, mag = gated_reference(x, wg, bg, wu, bu, wd, bd, dout, case.activation)
    pt_out, pt_grads = gated_pytorch(x, wg, bg, wu, bu, wd, bd, dout, case.activation)
    g_pt, u_pt = F.linear(x, wg, bg), F.linear(x, wu, bu)
    check("g", g.t, ref["g"], g_pt, 2, magnitude=mag["g"])
    check("u", u.t, ref["u"], u_pt, 2, magnitude=mag["u"])
    check("out", out.t, ref["out"], pt_out, 2, magnitude=mag["out"])
    # The contract's a: act(g) * u from the kernel's own rounded g, u in fp32 math, rounded once.
    act_own = gated_act(g.t.double(), case.activation)[0] * u.t.double()
    a_err = (a.t.double() - act_own).abs()
    assert (a_err <= torch.finfo(dt).eps * act_own.abs() + 1e-6 * (1 + act_own.abs())).all(), \
        f"a is not act(g) * u rounded once: max error {a_err.max().item():.3g}"

    # Backward, on the forward's own g and u (as autograd saves them).
    doutb = Buf(lib, (M, N), dt, dout, mis)
    dgu = Buf(lib, (M, 2 * H), dt, misalign=mis)  # NaN: da must be written before the kernel reads it
    a2 = Buf(lib, (M, H), dt, misalign=mis)
    with_db = bg is not None or bu is not None
    rpc, nchunks = L64(0), L64(0)
    lib.dll.emu_gated_chunks(M, ctypes.byref(rpc), ctypes.byref(nchunks))
    ws = Buf(lib, (nchunks.value, 2 * H), torch.float32) if with_db else None
    dbgu = Buf(lib, (2 * H,), dt, misalign=mis) if with_db else None
    dwgu, dwd = Buf(lib, (2 * H, K), dt, misalign=mis), Buf(lib, (N, H), dt, misalign=mis)
    dbd = Buf(lib, (N,), dt, misalign=mis) if bd is not None else None
    dx = Buf(lib, (M, K), dt, misalign=mis)
    fused = I(-1)
    rc = lib.dll.emu_gated_ffn_backward(doutb.ptr(), xb.ptr(), g.ptr(), u.ptr(), M, K, H, N, wgv.data_ptr(),
                                        *wgv.stride(), wuv.data_ptr(), *wuv.stride(), wd_v.data_ptr(), *wd_v.stride(),
                                        dgu.ptr(), a2.ptr(), dwgu.ptr(), dbgu.ptr() if dbgu else None,
                                        ws.ptr() if ws else None, dwd.ptr(), dbd.ptr() if dbd else None, dx.ptr(),
                                        code, act, ctypes.byref(fused))
    assert rc == 0, f"gated backward returned {rc}: {lib.report()}"
    lib.finish(doutb, dgu, a2, dwgu, dwd, dx, g, u, *inputs, *[b for b in (ws, dbgu, dbd) if b is not None])
    assert fused.value == int(case.weights.startswith("fused")), "the plan's fused-dx choice"
    dx_pt, dwg_pt, dbg_pt, dwu_pt, dbu_pt, dwd_pt, dbd_pt = pt_grads
    check("dx", dx.t, ref["dx"], dx_pt, 3, magnitude=mag["dx"])
    check("dw_gate", dwgu.t[:H], ref["dw_gate"], dwg_pt, 3, magnitude=mag["dw_gate"])
    check("dw_up", dwgu.t[H:], ref["dw_up"], dwu_pt, 3, magnitude=mag["dw_up"])
    check("dw_down", dwd.t, ref["dw_down"], dwd_pt, 3, magnitude=mag["dw_down"])
    assert torch.equal(a2.t, a.t), "the backward's recomputed a differs from the forward's"
    if with_db:
        if bg is not None:
            check("db_gate", dbgu.t[:H], ref["db_gate"], dbg_pt, 3, magnitude=mag["db_gate"])
        if bu is not None:
            check("db_up", dbgu.t[H:], ref["db_up"], dbu_pt, 3, magnitude=mag["db_up"])
        # The header's contract: the column sums of the kernel's own rounded [dg du], in fp32.
        own = dgu.t.double().sum(0)
        slack = torch.finfo(dt).eps * own.abs() + 1e-6 * dgu.t.double().abs().sum(0)
        assert ((dbgu.t.double() - own).abs() <= slack).all(), "db_gate/db_up are not the column sums of [dg du]"
    if bd is not None:
        check("db_down", dbd.t, ref["db_down"], dbd_pt, 3, magnitude=mag["db_down"])
    return nchunks.value


# Vector path: H a multiple of 8 (16-bit) / 4 (fp32) with aligned buffers; scalar otherwise (odd H,
# or misaligned). M = 70: 3 column-sum chunks; M = 1: one row. The weights in every layout the plan
# distinguishes: fused row slices (one dx GEMM over 2H, w_up only element-aligned when H K is odd),
# fused slices of a transposed view, separate row-major and separate transposed (two dx GEMMs, the
# second accumulating).
GATED_CASES = [
    GatedCase(37, 40, 48, 24, FP16, "silu"),
    GatedCase(70, 33, 40, 17, BF16, "gelu_tanh", biases="", weights="separate"),
    GatedCase(37, 40, 48, 24, FP32, "gelu", weights="separate_t"),
    GatedCase(5, 7, 13, 9, FP16, "gelu", biases="gd"),
    GatedCase(70, 24, 64, 32, FP32, "silu", biases="ud", weights="fused_t"),
    GatedCase(40, 16, 21, 11, BF16, "silu", biases="u", weights="fused_t"),
    GatedCase(1, 16, 24, 8, FP16, "gelu_tanh", biases="gu", weights="separate"),
    GatedCase(33, 24, 32, 16, BF16, "gelu", misalign=1),
    GatedCase(20, 12, 36, 10, FP32, "gelu_tanh", biases="gud", weights="separate", misalign=1),
]


def _gated_id(c):
    return (f"M{c.M}K{c.K}H{c.H}N{c.N}-{_dt(c.dtype)}-{c.activation}-b{c.biases or 'none'}-{c.weights}"
            f"{'-misaligned' if c.misalign else ''}")


@pytest.mark.parametrize("case", GATED_CASES, ids=_gated_id)
def test_gated_ffn_emulated(libs, case):
    nchunks = run_gated(libs["gated_ffn"], case)
    assert nchunks == {1: 1, 5: 1, 20: 1, 33: 2, 37: 2, 40: 2, 70: 3}[case.M]


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_gated_ffn_emulated_nan_propagates(libs, activation):
    """A NaN in g reaches exactly that element of a, dg, du and its db_gate / db_up columns."""
    lib = libs["gated_ffn"]
    _gated_signatures(lib.dll)
    lib.dll.emu_clear_registry()
    M, H, dt = 40, 24, FP16
    torch.manual_seed(3)
    gt, ut, da = torch.randn(M, H).to(dt), torch.randn(M, H).to(dt), torch.randn(M, H).to(dt)
    gt[17, 5] = float("nan")
    bad = torch.zeros(M, H, dtype=torch.bool)
    bad[17, 5] = True
    g, u = Buf(lib, (M, H), dt, gt), Buf(lib, (M, H), dt, ut)
    a = Buf(lib, (M, H), dt)
    assert lib.dll.emu_gated_forward(g.ptr(), u.ptr(), a.ptr(), M * H, DTYPE_CODE[dt], GATED_ACTS[activation]) == 0
    dgu = Buf(lib, (M, 2 * H), dt, torch.cat([da, torch.zeros(M, H, dtype=dt)], 1))
    a2 = Buf(lib, (M, H), dt)
    rpc, nchunks = L64(0), L64(0)
    lib.dll.emu_gated_chunks(M, ctypes.byref(rpc), ctypes.byref(nchunks))
    ws, db = Buf(lib, (nchunks.value, 2 * H), torch.float32), Buf(lib, (2 * H,), dt)
    assert lib.dll.emu_gated_backward(g.ptr(), u.ptr(), dgu.ptr(), a2.ptr(), db.ptr(), ws.ptr(), M, H,
                                      DTYPE_CODE[dt], GATED_ACTS[activation]) == 0
    lib.finish(g, u, a, dgu, a2, ws, db)
    assert torch.equal(torch.isnan(a.t), bad) and torch.equal(torch.isnan(a2.t), bad)
    assert torch.equal(torch.isnan(dgu.t), torch.cat([bad, bad], 1)), "dg / du: NaN lost or spread"
    col = torch.zeros(2 * H, dtype=torch.bool)
    col[5] = col[H + 5] = True
    assert torch.equal(torch.isnan(db.t), col)
    # Elsewhere the kernels' values: act(g) * u, dg, du of the contract on the stored inputs.
    act, dact = gated_act(gt.double(), activation)
    keep = ~bad
    check("a", a.t[keep], (act * ut.double())[keep], (act.to(dt).float() * ut.float()).to(dt)[keep], 2, 1e-5)
    check("dg", dgu.t[:, :H][keep], (da.double() * ut.double() * dact)[keep],
          (da.float() * ut.float() * dact.float()).to(dt)[keep], 3, 1e-5)


def test_gated_ffn_emulated_empty(libs):
    """rows = 0: db_gate / db_up are zero (cudaMemsetAsync), nothing else is touched."""
    lib = libs["gated_ffn"]
    _gated_signatures(lib.dll)
    lib.dll.emu_clear_registry()
    for dtype in (FP32, BF16):
        db, a = Buf(lib, (2 * 40,), dtype), Buf(lib, (8,), dtype)
        assert lib.dll.emu_gated_backward(None, None, None, None, db.ptr(), None, 0, 40, DTYPE_CODE[dtype], 0) == 0
        assert lib.dll.emu_gated_forward(None, None, a.ptr(), 0, DTYPE_CODE[dtype], 1) == 0
        lib.finish(db, a)
        assert (db.t == 0).all() and torch.isnan(a.t).all()


def test_emulator_detects_gated_plan_error(libs, build_root):
    """A plan whose du GEMM reads dg's half of [dg du] (the du operand without its H offset) fails
    dx on separate weights by far more than the bound: the plan itself is what these tests check."""
    def drop_offset(src):
        old = "gemm_operand({dgu_bytes + H * esize, M, H, 2 * H, 1})"
        assert old in src, "the du operand not found: update this test"
        return src.replace(old, "gemm_operand({dgu_bytes, M, H, 2 * H, 1})", 1)

    mutant = Lib(_done(build_library("gated_ffn", build_root, mutate=drop_offset, mutate_file="gated_ffn.h")))
    with pytest.raises(AssertionError, match=r"dx: max \|out - ref\|"):
        run_gated(mutant, GatedCase(37, 40, 48, 24, FP32, "silu", weights="separate"))


# --- the emulator catches what it claims to -----------------------------------------------------

def test_emulator_detects_missing_syncthreads(libs, build_root):
    """common.cuh's block_sum (LayerNorm's statistics) without its leading barrier: back-to-back
    calls race on `red`."""
    def drop_leading_barrier(src):
        head = re.search(r"float block_sum\(float v, Red& red\) \{.*?\n\}", src, re.S)
        assert head, "block_sum not found: update this test"
        body = head.group(0).replace("v = warp_sum(v);\n  __syncthreads();\n", "v = warp_sum(v);\n", 1)
        assert body != head.group(0)
        return src.replace(head.group(0), body)

    mutant = Lib(_done(build_library("layer_norm", build_root, mutate=drop_leading_barrier, mutate_file="common.cuh")))
    with pytest.raises(AssertionError, match="RACE write-after-read"):
        run_layer_norm(mutant, 4, 2048, FP32, True, True)  # 4 warps share `red`


def test_emulator_detects_misaligned_vector_access(libs, build_root):
    """gelu_backward choosing the 16-byte path without `cols % kN == 0`: rows start misaligned."""
    def drop_cols_check(src):
        old = "const bool vectorized = p.cols % kN == 0 && aligned16(p.h)"
        assert old in src, "gelu_backward's vector-path condition not found: update this test"
        return src.replace(old, "const bool vectorized = aligned16(p.h)", 1)

    mutant = Lib(_done(build_library("gelu_ffn", build_root, mutate=drop_cols_check)))
    with pytest.raises(AssertionError, match="MISALIGNED global 16-byte load"):
        run_gelu(mutant, 9, 36, FP16, True)


def test_emulator_detects_window_off_by_one(libs, build_root):
    """attention.cu's window with its left edge one key short (`>` for `>=`): a sliding-window
    case fails `out` (the first visible key of every row is lost), caught far above the bound."""
    def shrink_left_edge(src):
        old = "j >= i_shifted - p.window_left"
        assert old in src, "visible()'s left edge not found: update this test"
        return src.replace(old, "j > i_shifted - p.window_left", 1)

    mutant = Lib(_done(build_library("attention", build_root, mutate=shrink_left_edge)))
    with pytest.raises(AssertionError, match=r"out: max \|out - ref\|"):
        run_attention(mutant, 1, 64, 2, 64, False, FP16, False, seed=4, opts=AttnOptions(window=(5, 9)))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
