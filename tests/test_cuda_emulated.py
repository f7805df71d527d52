"""Numerics of the CUDA kernels (csrc/cuda/attention.cu, csrc/cuda/layer_norm.cu) on a CPU.

tests/cuda_emu/ emulates the CUDA features these kernels use (see its README.md): rewrite.py copies
the current csrc/cuda sources, replacing inline PTX, launches and shared-memory declarations with
calls into include/emu_shim.h, and g++ (-O2, strict aliasing on) builds one library per kernel
file, cached by a hash of its inputs. The tests call the kernels' own launch functions through
ctypes on NaN-guarded buffers and compare every output with a float64 reference.

What this proves: the kernels' index math, tiling, masking (causal, partial blocks, padded head
dims), online softmax, the fragment bookkeeping between ldmatrix and mma.sync calls, cp.async
group counting, the barrier placement (a shared-memory race detector is on for every launch: any race, out-of-
bounds or misaligned access, deadlock or divergent warp collective fails the test), the host-side
launch logic (grid sizes, instantiation switches, vector/scalar path choice, rows per backward
block) and the numerics of the chosen algorithms, in fp16 and bf16 (and fp32 for LayerNorm).

What it does NOT prove:
- tensor-core arithmetic: an emulated mma.sync sums the 16 products exactly and rounds once to
  fp32; the hardware's accumulation order and internal rounding differ slightly. ex2.approx is
  an exact exp2 here (the hardware is within ~2 ulp).
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
atol = 1e-4 * max(1, max|ref|) for attention and 1e-5 * max(1, max|ref|) for LayerNorm (the floor
for outputs that PyTorch happens to get exactly right, e.g. dQ = 0 at T = 1). fp32 statistics
(attention's logsumexp, LayerNorm's mean and rstd) must match float64 to 1e-5 (relative to
max(1, |ref|)).

Checked by hand with mutated builds of attention.cu (tests/cuda_emu/README.md): removing the
forward's `__syncthreads()` after the QK^T loop is reported as a race, `cp_async_wait<2>` for
`<1>` as a read of an in-flight copy, a dK/dV store without its `col < D` check as an
out-of-bounds store, and a causal mask of `>=` for `>` (forward or backward) fails out or dq/dk
with errors ~100x over the bound. test_emulator_detects_missing_syncthreads keeps one such check
(a barrier removed from layer_norm.cu) as a test.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc" / "cuda"
EMU = Path(__file__).resolve().parent / "cuda_emu"
CXXFLAGS = ["-std=c++20", "-O2", "-pthread", "-fPIC", "-shared", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas"]
API = {"attention": "attention_api.cpp", "layer_norm": "layer_norm_api.cpp"}


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


def build_library(lib, out_dir, mutate=None):
    """Rewrites csrc/cuda for `lib` and starts compiling it into out_dir; _done(result) is the .so.

    Cached: a library built from the same inputs (their hash is in its name) is returned as is.
    mutate: optional function (source text of the .cu) -> mutated text, applied before rewriting.
    Skips the test when g++ is unusable; fails it when the build fails.
    """
    cxx, version = _compiler()
    if cxx is None:
        pytest.skip(f"CUDA emulation cannot be built: {version}")
    h = hashlib.sha256(f"{version} {CXXFLAGS}".encode())
    for f in _inputs(lib):
        h.update(f.name.encode() + f.read_bytes())
    if mutate is not None:
        cu = rewrite.SOURCES[lib][0]
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


class Buf:
    """A tensor inside a NaN-filled allocation: writes outside it are detected, reads of it give NaN.

    The view starts 16-byte aligned plus `misalign` elements, and is registered with the emulator
    as valid global memory.
    """

    def __init__(self, lib, shape, dtype, init=None, misalign=0):
        n = math.prod(shape)
        self.flat = torch.full((n + 2 * GUARD + 16,), float("nan"), dtype=dtype)
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
        return bool(torch.isnan(g.float()).all())


def maxerr(x, ref):
    return (x.double() - ref).abs().max().item() if ref.numel() else 0.0


def check(name, out, ref, pt, factor, atol_rel):
    """DESIGN.md's rule: max|out - ref| <= factor * max|pt - ref| + atol."""
    assert not torch.isnan(out).any(), f"{name}: NaN in the kernel's output"
    err, pt_err = maxerr(out, ref), maxerr(pt, ref)
    atol = atol_rel * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    bound = factor * pt_err + atol
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} ({factor} x PyTorch's {pt_err:.3g} + {atol:.2g})"
    return err


def check_fp32(name, out, ref, rtol=1e-5):
    assert not torch.isnan(out).any(), f"{name}: NaN"
    err = ((out.double() - ref).abs() / ref.abs().clamp_min(1.0)).max().item()
    assert err <= rtol, f"{name}: error {err:.3g} > {rtol:g} (relative to max(1, |ref|))"


# --- attention ----------------------------------------------------------------------------------

P, I, F32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float


def _attn_signatures(dll):
    dll.emu_attention_forward.argtypes = [P, P, P, P, I, I, I, I, F32, I, I, P, P]
    dll.emu_attention_backward.argtypes = [P, P, P, P, I, I, I, I, F32, I, I, P, P, P, P, P, P, P, P]


def attention_reference(q, k, v, do, causal, scale):
    """float64 out, lse (B, H, T), dq, dk, dv; inputs (B, T, H, D)."""
    qh, kh, vh, doh = (x.double().transpose(1, 2) for x in (q, k, v, do))
    s = qh @ kh.transpose(-1, -2) * scale
    T = q.shape[1]
    if causal:
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None])
    o = p @ vh
    dv = p.transpose(-1, -2) @ doh
    dp = doh @ vh.transpose(-1, -2)
    ds = p * (dp - (doh * o).sum(-1, keepdim=True))
    dq, dk = ds @ kh * scale, ds.transpose(-1, -2) @ qh * scale
    return o.transpose(1, 2), lse, dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def attention_pytorch(q, k, v, do, causal, scale):
    """PyTorch in the inputs' dtype (the FlashAttention tests' `pt`): out, dq, dk, dv."""
    q, k, v = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    s = q @ k.transpose(-1, -2) * scale
    if causal:
        T = s.shape[-1]
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.softmax(s, -1) @ v
    o.backward(do.transpose(1, 2))
    return o.detach().transpose(1, 2), q.grad.transpose(1, 2), k.grad.transpose(1, 2), v.grad.transpose(1, 2)


def run_attention(lib, B, T, H, D, causal, dtype, deterministic, layout="contiguous", seed=0, qscale=1.0):
    _attn_signatures(lib.dll)
    lib.dll.emu_clear_registry()  # the buffers of earlier runs are gone
    torch.manual_seed(seed)
    scale = 1.0 / math.sqrt(D)
    q, k, v, do = (torch.randn(B, T, H, D) for _ in range(4))
    q, k, v, do = ((q * qscale).to(dtype), k.to(dtype), v.to(dtype), do.to(dtype))
    bufs = []

    def place(x):
        """x (B, T, H, D) in the requested memory layout; returns the (B, T, H, D) view."""
        if layout == "bhtd":  # (B, H, T, D) storage: head stride T*D, row stride D
            b = Buf(lib, (B, H, T, D), dtype, x.transpose(1, 2))
            view = b.t.transpose(1, 2)
        elif layout == "packed_qkv":  # one of the three slices of a (B, T, 3, H, D) tensor
            b = Buf(lib, (B, T, 3, H, D), dtype)
            b.t[:, :, 1] = x
            view = b.t[:, :, 1]
        else:
            b = Buf(lib, (B, T, H, D), dtype, x)
            view = b.t
        bufs.append(b)
        return view

    def strides(*views):
        st = [s for t in views for s in t.stride()[:3]]
        return (ctypes.c_int64 * 15)(*(st + [0] * (15 - len(st))))

    qv, kv, vv = place(q), place(k), place(v)
    out = Buf(lib, (B, T, H, D), dtype)
    lse = Buf(lib, (B, H, T), torch.float32)
    rc = lib.dll.emu_attention_forward(qv.data_ptr(), kv.data_ptr(), vv.data_ptr(), strides(qv, kv, vv), B, T, H, D,
                                       scale, int(causal), int(dtype == torch.bfloat16), out.ptr(), lse.ptr())
    assert rc == 0, f"forward launch returned cudaError {rc}"
    lib.finish(out, lse, *bufs)

    # The backward gets the kernel's own out and lse (as in training); out/dout in the same layout.
    ov, dov = place(out.t.clone()), place(do)
    delta = Buf(lib, (B, H, T), torch.float32)
    dq, dk, dv = (Buf(lib, (B, T, H, D), dtype) for _ in range(3))
    acc = None if deterministic else Buf(lib, (B, T, H, D), torch.float32, torch.zeros(B, T, H, D))
    rc = lib.dll.emu_attention_backward(
        qv.data_ptr(), kv.data_ptr(), vv.data_ptr(), strides(qv, kv, vv, ov, dov), B, T, H, D, scale, int(causal),
        int(dtype == torch.bfloat16), ov.data_ptr(), dov.data_ptr(), lse.ptr(), delta.ptr(), dq.ptr(), dk.ptr(),
        dv.ptr(), acc.ptr() if acc else None)
    assert rc == 0, f"backward launch returned cudaError {rc}"
    lib.finish(dq, dk, dv, delta, *bufs, *([acc] if acc else []))

    o_ref, lse_ref, dq_ref, dk_ref, dv_ref = attention_reference(q, k, v, do, causal, scale)
    o_pt, dq_pt, dk_pt, dv_pt = attention_pytorch(q, k, v, do, causal, scale)
    errs = {"out": check("out", out.t, o_ref, o_pt, 2, 1e-4)}
    check_fp32("lse", lse.t, lse_ref)
    for name, x, ref, pt in (("dq", dq.t, dq_ref, dq_pt), ("dk", dk.t, dk_ref, dk_pt), ("dv", dv.t, dv_ref, dv_pt)):
        errs[name] = check(name, x, ref, pt, 3, 1e-4)
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


def test_attention_emulated_large_scores(libs):
    """Scores x8 (inputs x sqrt(8)): the running max changes between key blocks; stays accurate."""
    run_attention(libs["attention"], 1, 130, 2, 64, False, FP16, False, qscale=8.0, seed=3)


# --- layer norm ---------------------------------------------------------------------------------

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _ln_signatures(dll):
    L = ctypes.c_int64
    dll.emu_ln_forward.argtypes = [P, P, P, P, P, P, L, I, F32, I]
    dll.emu_ln_backward_num_blocks.argtypes = [P, P, P, P, P, P, P, P, L, I, I, ctypes.POINTER(I)]
    dll.emu_ln_backward.argtypes = [P, P, P, P, P, P, P, P, P, P, L, I, I, I]


def run_layer_norm(lib, M, N, dtype, has_w, has_b, misalign=0, nan_row=None, seed=0):
    """Forward and backward of one (M, N) problem; returns the backward's number of blocks."""
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
    ptr = lambda buf: buf.ptr() if buf is not None else None  # noqa: E731

    xb = Buf(lib, (M, N), dtype, x, misalign)
    wb = Buf(lib, (N,), dtype, w, misalign) if has_w else None
    bb = Buf(lib, (N,), dtype, b, misalign) if has_b else None
    y = Buf(lib, (M, N), dtype, misalign=misalign)
    mean, rstd = Buf(lib, (M,), torch.float32), Buf(lib, (M,), torch.float32)
    ins = [xb] + [t for t in (wb, bb) if t is not None]
    rc = lib.dll.emu_ln_forward(xb.ptr(), ptr(wb), ptr(bb), y.ptr(), mean.ptr(), rstd.ptr(), M, N, eps,
                                DTYPE_CODE[dtype])
    assert rc == 0, f"forward launch returned cudaError {rc}"
    lib.finish(y, mean, rstd, *ins)

    xd = x.double()
    mu = xd.mean(-1)
    rs = 1 / torch.sqrt(xd.var(-1, unbiased=False) + eps)
    xhat = (xd - mu[:, None]) * rs[:, None]
    y_ref = xhat * (w.double() if has_w else 1) + (b.double() if has_b else 0)
    if nan_row is not None:  # NaN propagates into its row only, the other rows stay exact
        assert torch.isnan(y.t[nan_row]).all() and math.isnan(mean.t[nan_row]) and math.isnan(rstd.t[nan_row])
        keep = torch.arange(M) != nan_row
        y_pt = F.layer_norm(x[keep], (N,), w, b, eps)
        check("y", y.t[keep], y_ref[keep], y_pt, 2, 1e-5)
        check_fp32("mean", mean.t[keep], mu[keep])
        check_fp32("rstd", rstd.t[keep], rs[keep])
        return None

    xr = x.detach().requires_grad_()
    wr = w.detach().requires_grad_() if has_w else None
    br = b.detach().requires_grad_() if has_b else None
    y_pt = F.layer_norm(xr, (N,), wr, br, eps)
    y_pt.backward(dy)
    check("y", y.t, y_ref, y_pt.detach(), 2, 1e-5)
    check_fp32("mean", mean.t, mu)
    check_fp32("rstd", rstd.t, rs)

    dyb = Buf(lib, (M, N), dtype, dy, misalign)
    dx = Buf(lib, (M, N), dtype, misalign=misalign)
    dw = Buf(lib, (N,), dtype) if has_w else None
    db = Buf(lib, (N,), dtype) if has_b else None
    nb = I(0)
    rc = lib.dll.emu_ln_backward_num_blocks(dyb.ptr(), xb.ptr(), ptr(wb), mean.ptr(), rstd.ptr(), dx.ptr(), ptr(dw),
                                            ptr(db), M, N, DTYPE_CODE[dtype], ctypes.byref(nb))
    assert rc == 0 and 1 <= nb.value <= M
    # Partial workspaces start as NaN: the kernel must write every element before reading it.
    dwp = Buf(lib, (nb.value, N), torch.float32) if has_w else None
    dbp = Buf(lib, (nb.value, N), torch.float32) if has_b else None
    rc = lib.dll.emu_ln_backward(dyb.ptr(), xb.ptr(), ptr(wb), mean.ptr(), rstd.ptr(), dx.ptr(), ptr(dw), ptr(db),
                                 ptr(dwp), ptr(dbp), M, N, nb.value, DTYPE_CODE[dtype])
    assert rc == 0, f"backward launch returned cudaError {rc}"
    lib.finish(dx, dyb, mean, rstd, *ins, *[t for t in (dw, db, dwp, dbp) if t is not None])

    dyd = dy.double()
    g = dyd * (w.double() if has_w else 1)
    dx_ref = rs[:, None] * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    check("dx", dx.t, dx_ref, xr.grad, 3, 1e-5)
    if has_w:
        check("dw", dw.t, (dyd * xhat).sum(0), wr.grad, 3, 1e-5)
    if has_b:
        check("db", db.t, dyd.sum(0), br.grad, 3, 1e-5)
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


# --- the emulator catches what it claims to -----------------------------------------------------

def test_emulator_detects_missing_syncthreads(libs, build_root):
    """layer_norm.cu's block_sum without its leading barrier: back-to-back calls race on `red`."""
    def drop_leading_barrier(src):
        head = re.search(r"float block_sum\(float v, float\* red\) \{.*?\n\}", src, re.S)
        assert head, "block_sum not found: update this test"
        body = head.group(0).replace("v = warp_sum(v);\n  __syncthreads();\n", "v = warp_sum(v);\n", 1)
        assert body != head.group(0)
        return src.replace(head.group(0), body)

    mutant = Lib(_done(build_library("layer_norm", build_root, mutate=drop_leading_barrier)))
    with pytest.raises(AssertionError, match="RACE write-after-read"):
        run_layer_norm(mutant, 4, 2048, FP32, True, True)  # 4 warps share `red`


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
