"""The ``cuda`` backend on a machine without a GPU: registry wiring, the build of the CUDA
extension (nvcc for sm_80 and sm_90), its kernels' resource usage, and its argument checks.

Numerics: on a GPU, tests/gpu/test_kernels_gpu.py and tests/gpu/test_cuda_gpu.py; on the CPU,
tests/test_cuda_emulated.py. Here the extension is built (or found in the cache: CI builds it
first with ``gptfast build --cuda``) whenever this machine has a CUDA build of torch, nvcc and
cuBLASLt; without them the build tests are skipped with the reason.
"""
from __future__ import annotations

import pytest
import torch

import gptfast
from gptfast import _build
from gptfast.ops import _backend

OPS = ("attention", "layer_norm", "gelu_ffn", "rms_norm", "linear_cross_entropy", "gated_ffn")


# --- registry: no build needed ----------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
def test_cuda_backend_registered_for_cuda_tensors(op):
    impl = _backend._REGISTRY[(op, "cuda")]
    assert impl.devices == ("cuda",) and impl.module == "gptfast.ops._cuda"
    assert _backend.AUTO_ORDER["cuda"][0] == "cuda"  # auto on a CUDA tensor tries it first
    expected = (torch.float16, torch.bfloat16) + (() if op == "attention" else (torch.float32,))
    assert set(impl.dtypes) == set(expected)


def test_native_launchers_name_gated_ffn_when_the_extension_lacks_it():
    import types

    from gptfast.ops._native import NativeLaunchers

    launchers = NativeLaunchers.__new__(NativeLaunchers)  # no build: an extension without the symbols
    launchers.backend, launchers.ext = "cuda", types.SimpleNamespace()
    x = torch.randn(2, 4)
    with pytest.raises(NotImplementedError, match="gptfast.gated_ffn: the 'cuda' backend has no gated_ffn kernel"):
        launchers.gated_ffn_forward(x, x, None, x, None, x, None, "silu")
    with pytest.raises(NotImplementedError, match="gptfast.gated_ffn"):
        launchers.gated_ffn_backward(x, x, x, x, x, x, x, False, False, False, "silu")


def test_cuda_declares_every_attention_option():
    """csrc/cuda/attention.cu implements FlashAttention 2.8's dense options and the packed varlen
    layout (numerics: tests/test_cuda_emulated.py, tests/gpu); auto may route any such call to it."""
    assert _backend.KERNEL_ATTENTION_FEATURES["cuda"] == frozenset(_backend.ATTENTION_FEATURES
                                                                  + _backend.LAYOUT_FEATURES)
    assert not _backend._REGISTRY[("attention", "cuda")].missing(frozenset(_backend.ATTENTION_FEATURES))


def test_explicit_cuda_backend_on_cpu_tensors_raises():
    x = torch.randn(2, 8, 2, 16, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu: runs on cuda, not cpu"):
        gptfast.attention(x, x, x, backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu"):
        gptfast.layer_norm(torch.randn(4, 8), None, None, backend="cuda")
    w = torch.randn(8, 8)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu"):
        gptfast.gelu_ffn(torch.randn(4, 8), w, None, w, None, backend="cuda")
    with gptfast.use_backend("cuda"), pytest.raises(RuntimeError, match="cannot run on cpu"):
        gptfast.layer_norm(torch.randn(4, 8), None, None)


def test_gpus_older_than_sm80_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    reason = _backend._REGISTRY[("attention", "cuda")].unavailable_reason(torch.device("cuda"))
    assert reason == "needs compute capability 8.0 or newer (mma.sync bf16, cp.async); this GPU is 7.5"


def test_auto_on_cpu_never_considers_cuda():
    assert "cuda" not in _backend.AUTO_ORDER["cpu"]
    assert _backend.resolve("layer_norm", torch.device("cpu"), torch.float32).backend != "cuda"


def test_gencode_flags_from_the_arch_list():
    assert _build.gencode_flags("8.0;9.0+PTX") == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90"]
    assert _build.gencode_flags(" 9.0a ") == ["-gencode=arch=compute_90a,code=sm_90a"]
    with pytest.raises(ValueError, match="cannot read 'sm_90'"):
        _build.gencode_flags("sm_90")


def test_spill_check_flags_attention_kernels_only():
    rows = [dict(kernel="attention_fwd_kernel<__half, 64>", arch="sm_80", stack=0, local=0),
            dict(kernel="attention_bwd_dkdv_kernel<__half, 256>", arch="sm_90", stack=24, local=0),
            dict(kernel="modified_attention_fwd_kernel<__half, 128>", arch="sm_80", stack=8, local=0),
            dict(kernel="layer_norm_fwd_kernel<float>", arch="sm_80", stack=16, local=0)]
    # the kHasModifiers instantiations ("modified_" + the plain name) are checked as well
    assert [r["kernel"] for r in _build.spills(rows)] == ["attention_bwd_dkdv_kernel<__half, 256>",
                                                          "modified_attention_fwd_kernel<__half, 128>"]
    # without c++filt the names stay mangled: still checked
    mangled = [dict(kernel="_ZN7gptfast4cuda12_GLOBAL__N_120attention_fwd_kernelI6__halfLi64EEEvNS0_15AttentionParamsE",
                    arch="sm_80", stack=8, local=0)]
    assert _build.spills(mangled) == mangled


# --- the CUDA extension: built with nvcc, no GPU needed ----------------------------------------

_reason = _build._precheck("cuda")
needs_build = pytest.mark.skipif(_reason is not None, reason=f"cuda extension cannot be built here: {_reason}")


@pytest.fixture(scope="module")
def ext():
    # A compile or link error fails here (not a skip): CI must not pass with broken CUDA code.
    return _build.load("cuda")


@needs_build
def test_extension_builds_for_both_archs(ext):
    assert ext.backend == "cuda"
    rows = _build.resource_usage()
    archs = {r["arch"] for r in rows}
    if "TORCH_CUDA_ARCH_LIST" not in __import__("os").environ:
        assert archs == {"sm_80", "sm_90"}
    for op, prefix in (("attention", "attention_fwd_kernel"), ("attention", "attention_bwd_dkdv_kernel"),
                       ("attention", "attention_bwd_dq_kernel"), ("layer_norm", "layer_norm"),
                       ("gelu_ffn", "gelu"), ("rms_norm", "rms_norm_fwd_kernel"), ("rms_norm", "rms_norm_bwd_kernel"),
                       ("rms_norm", "reduce_partials_kernel"),
                       ("linear_cross_entropy", "cross_entropy_logits_kernel"), ("gated_ffn", "gated_forward_kernel"),
                       ("gated_ffn", "gated_backward_kernel")):
        found = {r["arch"] for r in rows if prefix in r["kernel"]}
        assert found == archs, f"{op}: no {prefix}* kernel for {archs - found}"
    # three head-dim instantiations x two dtypes, per arch, plain and with score modifiers
    for prefix in ("attention_fwd_kernel", "modified_attention_fwd_kernel"):
        assert len({r["kernel"] for r in rows if r["kernel"].startswith(prefix)}) == 6, prefix
    # the backward's (dK/dV and dQ): double-buffered up to head dim 128, single-buffered for all
    for prefix in ("attention_bwd_dkdv_kernel", "modified_attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel",
                   "modified_attention_bwd_dq_kernel"):
        assert len({r["kernel"] for r in rows if r["kernel"].startswith(prefix)}) == 10, prefix


@needs_build
def test_attention_kernels_do_not_spill(ext):
    rows = _build.resource_usage()
    assert _build.spills(rows) == []
    for r in rows:
        if r["shared_dynamic"] is not None:  # fits the opt-in limit of sm_80 (163 KiB)
            assert r["shared_dynamic"] + r["shared_static"] <= 163 * 1024, r


@needs_build
def test_norm_and_cross_entropy_kernels_do_not_spill(ext):
    """rms_norm.cu, norm.cuh's reduction and linear_cross_entropy.cu: no stack or local memory on
    any arch (the build's gate checks the attention kernels; these are checked here)."""
    names = ("rms_norm_fwd_kernel", "rms_norm_bwd_kernel", "reduce_partials_kernel", "cross_entropy_logits_kernel")
    rows = [r for r in _build.resource_usage() if any(n in r["kernel"] for n in names)]
    assert len({r["kernel"] for r in rows}) == 12 + 12 + 3 + 4
    assert [r for r in rows if r["stack"] or r["local"]] == []


@needs_build
def test_extension_rejects_cpu_tensors(ext):
    q = torch.randn(1, 4, 2, 16, dtype=torch.float16)
    lse = torch.zeros(1, 2, 4)
    msg = "must be a CUDA tensor for the cuda backend, got cpu"
    with pytest.raises(ValueError, match="gptfast.attention: q " + msg):
        ext.attention_forward(q, q, q, True, 0.25)
    with pytest.raises(ValueError, match="gptfast.attention: q " + msg):
        ext.attention_backward(q, q, q, q, q, lse, True, 0.25, False)
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="gptfast.layer_norm: x " + msg):
        ext.layer_norm_forward(x, None, None, 1e-5)
    with pytest.raises(ValueError, match="gptfast.layer_norm: x " + msg):
        ext.layer_norm_backward(x, x, None, torch.zeros(4), torch.ones(4), False)
    w = torch.randn(8, 8)
    with pytest.raises(ValueError, match="gptfast.gelu_ffn: x " + msg):
        ext.gelu_ffn_forward(x, w, None, w, None, "tanh")
    with pytest.raises(ValueError, match="gptfast.gelu_ffn: x " + msg):
        ext.gelu_ffn_backward(x, x, x, w, w, False, False, "none")
    with pytest.raises(ValueError, match="gptfast.rms_norm: x " + msg):
        ext.rms_norm_forward(x, None, 1e-6, 0.0)
    with pytest.raises(ValueError, match="gptfast.rms_norm: x " + msg):
        ext.rms_norm_backward(x, x, None, torch.ones(4), 0.0)
    with pytest.raises(ValueError, match="gptfast.linear_cross_entropy: z " + msg):
        ext.cross_entropy_logits_(x, torch.zeros(4, dtype=torch.int64), None, -100, 0.0, 0.0)
    with pytest.raises(ValueError, match="gptfast.gated_ffn: x " + msg):
        ext.gated_ffn_forward(x, w, None, w, None, w, None, "silu")
    with pytest.raises(ValueError, match="gptfast.gated_ffn: x " + msg):
        ext.gated_ffn_backward(x, x, x, x, w, w, w, False, False, False, "gelu")


@needs_build
def test_extension_checks_shapes_and_options_before_launching(ext):
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        ext.attention_forward(torch.randn(4, 2, 16), torch.randn(4, 2, 16), torch.randn(4, 2, 16), True, 1.0)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., N\) with N > 0"):
        ext.layer_norm_forward(torch.randn(()), None, None, 1e-5)
    w = torch.randn(8, 8)
    with pytest.raises(ValueError, match="approximate must be 'tanh' or 'none', got 'erf'"):
        ext.gelu_ffn_forward(torch.randn(4, 8), w, None, w, None, "erf")
    with pytest.raises(ValueError, match="activation must be 'silu', 'gelu_tanh' or 'gelu', got 'relu'"):
        ext.gated_ffn_forward(torch.randn(4, 8), w, None, w, None, w, None, "relu")
