"""Backend selection: argument > use_backend() > GPTFAST_BACKEND > auto; explicit failures are loud,
auto falls back in a fixed order with one warning."""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

import gptfast
from gptfast.ops import _backend
from gptfast.ops._backend import Impl


@pytest.fixture
def spy(monkeypatch):
    """Register a 'cpu' backend for layer_norm that records calls and delegates to the reference."""
    from gptfast.ops.layer_norm import layer_norm_backward_reference, layer_norm_forward_reference

    calls = []

    def fwd(*a):
        calls.append("fwd")
        return layer_norm_forward_reference(*a)

    def bwd(*a):
        calls.append("bwd")
        return layer_norm_backward_reference(*a)

    monkeypatch.setattr(sys.modules[__name__], "_spy_fwd", fwd, raising=False)
    monkeypatch.setattr(sys.modules[__name__], "_spy_bwd", bwd, raising=False)
    registry = dict(_backend._REGISTRY)
    monkeypatch.setattr(_backend, "_REGISTRY", registry)
    monkeypatch.setattr(_backend, "_LOADED", {})
    monkeypatch.setattr(_backend, "_WARNED", set())
    _backend.register(Impl(op="layer_norm", backend="cpu", devices=("cpu",), module=__name__,
                           fwd_name="_spy_fwd", bwd_name="_spy_bwd"))
    return calls


def _ln(backend=None):
    x = torch.randn(3, 8, requires_grad=True)
    y = gptfast.layer_norm(x, None, None, backend=backend)
    y.sum().backward()
    return y


def test_auto_prefers_registered_fast_backend(spy):
    _ln()
    assert spy == ["fwd", "bwd"]


def test_explicit_argument_beats_context_and_env(spy, monkeypatch):
    monkeypatch.setenv("GPTFAST_BACKEND", "cpu")
    with gptfast.use_backend("cpu"):
        _ln(backend="reference")
    assert spy == []


def test_context_manager_nests_and_restores(spy, monkeypatch):
    monkeypatch.setenv("GPTFAST_BACKEND", "cpu")
    with gptfast.use_backend("reference"):
        _ln()
        assert spy == []
        with gptfast.use_backend("cpu"):
            _ln()
        assert spy == ["fwd", "bwd"]
        _ln()
        assert spy == ["fwd", "bwd"]
    _ln()  # back to the environment variable: cpu
    assert spy == ["fwd", "bwd"] * 2


def test_env_var_selects(spy, monkeypatch):
    monkeypatch.setenv("GPTFAST_BACKEND", "reference")
    _ln()
    assert spy == []
    monkeypatch.setenv("GPTFAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="GPTFAST_BACKEND: unknown gptfast backend 'bogus'"):
        _ln()


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown gptfast backend 'fast'"):
        gptfast.layer_norm(torch.randn(2, 3), None, None, backend="fast")
    with pytest.raises(ValueError, match="unknown gptfast backend"):
        with gptfast.use_backend("nope"):
            pass


def test_explicit_unavailable_backend_raises():
    x = torch.randn(2, 4)
    # 'cuda' on a CPU tensor: either not implemented yet or not runnable on cpu -- never silent
    with pytest.raises((NotImplementedError, RuntimeError), match="cuda"):
        gptfast.layer_norm(x, None, None, backend="cuda")


def test_explicit_backend_that_fails_to_load_raises(monkeypatch):
    registry = dict(_backend._REGISTRY)
    monkeypatch.setattr(_backend, "_REGISTRY", registry)
    monkeypatch.setattr(_backend, "_LOADED", {})
    _backend.register(Impl(op="gelu_ffn", backend="cpu", devices=("cpu",), module="gptfast._no_such_module",
                           fwd_name="f", bwd_name="b"))
    args = (torch.randn(2, 4), torch.randn(5, 4), None, torch.randn(3, 5), None)
    with pytest.raises(RuntimeError, match="backend 'cpu' failed to load"):
        gptfast.gelu_ffn(*args, backend="cpu")


def test_auto_falls_back_with_one_warning(monkeypatch):
    registry = dict(_backend._REGISTRY)
    monkeypatch.setattr(_backend, "_REGISTRY", registry)
    monkeypatch.setattr(_backend, "_LOADED", {})
    monkeypatch.setattr(_backend, "_WARNED", set())
    _backend.register(Impl(op="gelu_ffn", backend="cpu", devices=("cpu",), module="gptfast._no_such_module",
                           fwd_name="f", bwd_name="b"))
    args = (torch.randn(2, 4), torch.randn(5, 4), None, torch.randn(3, 5), None)
    with pytest.warns(RuntimeWarning, match="backend 'cpu' is unavailable on cpu"):
        out = gptfast.gelu_ffn(*args)
    torch.testing.assert_close(out, gptfast.gelu_ffn_ref(*args))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call must not warn again
        gptfast.gelu_ffn(*args)


def test_available_backends_and_table():
    names = gptfast.available_backends(device="cpu")
    assert "reference" in names and "cuda" not in names
    assert gptfast.available_backends("attention", "cpu")[-1] in names
    with pytest.raises(ValueError, match="unknown op"):
        gptfast.available_backends("conv2d")
    rows = gptfast.backend_table(devices=("cpu",))
    assert {(r["op"], r["backend"]) for r in rows} == {(o, b) for o in _backend.ALL_OPS
                                                    for b in _backend.BACKENDS}
    ref_rows = [r for r in rows if r["backend"] == "reference"]
    assert all(r["available"] for r in ref_rows)
    assert all(r["reason"] for r in rows if not r["available"]), "every unavailable backend says why"


def test_import_is_lazy():
    """`import gptfast` must not import triton nor build/load the native extension."""
    code = ("import sys, gptfast; bad = [m for m in sys.modules if m == 'triton' or m.startswith('gptfast_C') "
            "or m.startswith('gptfast_cuda') or m.startswith('gptfast.kernels.') "
            "or m in ('gptfast.ops._cpu', 'gptfast.ops._cuda', 'gptfast.ops._native', 'gptfast._build')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
