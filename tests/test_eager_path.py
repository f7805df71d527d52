"""The eager path (a plain torch.autograd.Function around each op's implementation) against the
custom-op path torch.compile traces: identical outputs and gradients, bit for bit, on every CPU
backend; and the eager path really skips torch.library's dispatch."""
from __future__ import annotations

import importlib

import pytest
import torch

import gptfast
from gptfast.ops import _common

BACKENDS = [b for b in ("reference", "cpu") if b in gptfast.available_backends(device="cpu")]


def _t(*shape, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=g).requires_grad_(grad)


def _cases(backend):
    x, w, b, r = _t(3, 5, 16), _t(16, seed=1), _t(16, seed=2), _t(3, 5, 16, seed=13)
    w1, b1, w2, b2 = _t(24, 16, seed=3), _t(24, seed=4), _t(16, 24, seed=5), _t(16, seed=6)
    q, k, v = _t(2, 9, 4, 8, seed=7), _t(2, 11, 2, 8, seed=8), _t(2, 11, 2, 8, seed=9)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    qp, kp, vp = _t(9, 4, 8, seed=10), _t(9, 2, 8, seed=11), _t(9, 2, 8, seed=12)
    return {
        "layer_norm": lambda: gptfast.layer_norm(x, w, b, backend=backend),
        "layer_norm-noaffine": lambda: gptfast.layer_norm(x, None, None, backend=backend),
        # both outputs of the fused residual add feed the loss: the stream's gradient is used
        "layer_norm-residual": lambda: (lambda y, s: y * 2 + s)(*gptfast.layer_norm(
            x, w, b, residual=r, prenorm=True, backend=backend)),
        "gelu_ffn": lambda: gptfast.gelu_ffn(x, w1, b1, w2, b2, approximate="none", backend=backend),
        "attention": lambda: gptfast.attention(q, k, v, causal=True, backend=backend),
        "attention-options": lambda: gptfast.attention(q, k, v, causal=True, window_size=(3, -1), softcap=5.0,
                                                       dropout_p=0.2, backend=backend),
        "varlen": lambda: gptfast.attention_varlen(qp, kp, vp, cu, cu, 5, 5, causal=True, dropout_p=0.1,
                                                   backend=backend),
    }, [x, w, b, r, w1, b1, w2, b2, q, k, v, qp, kp, vp]


def _run(fn, leaves):
    for t in leaves:
        t.grad = None
    torch.manual_seed(0)  # the dropout key
    out = fn()
    g = torch.Generator().manual_seed(1)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    return out.detach(), [None if t.grad is None else t.grad.clone() for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_functions_and_custom_ops_give_identical_results(backend, monkeypatch):
    cases, leaves = _cases(backend)
    for name, fn in cases.items():
        eager = _run(fn, leaves)
        monkeypatch.setattr(_common, "EAGER_FUNCTIONS", False)
        custom = _run(fn, leaves)
        monkeypatch.setattr(_common, "EAGER_FUNCTIONS", True)
        assert torch.equal(eager[0], custom[0]), name
        for i, (a, b) in enumerate(zip(eager[1], custom[1])):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), f"{name}: grad of leaf {i}"
        with torch.no_grad():  # no graph: the implementation is called directly
            torch.manual_seed(0)
            assert torch.equal(fn(), eager[0]), name


_MODULES = {"layer_norm": ("layer_norm", ["layer_norm_fwd_op", "layer_norm_residual_fwd_op", "layer_norm_bwd_op"]),
            "gelu_ffn": ("gelu_ffn", ["gelu_ffn_fwd_op", "gelu_ffn_bwd_op"]),
            "attention": ("attention", ["attention_fwd_op", "attention_bwd_op"]),
            "varlen": ("varlen", ["attention_varlen_fwd_op", "attention_varlen_bwd_op"])}


@pytest.mark.parametrize("eager", [True, False], ids=["eager-functions", "custom-ops"])
def test_eager_mode_skips_torch_library_and_the_switch_restores_it(eager, monkeypatch):
    monkeypatch.setattr(_common, "EAGER_FUNCTIONS", eager)
    calls = []
    for module_name, ops in _MODULES.values():
        module = importlib.import_module(f"gptfast.ops.{module_name}")
        for op in ops:
            real = getattr(module, op)
            monkeypatch.setattr(module, op, lambda *a, _r=real, _n=op: calls.append(_n) or _r(*a))
    cases, leaves = _cases("reference")
    for name in ("layer_norm", "layer_norm-residual", "gelu_ffn", "attention", "varlen"):
        _run(cases[name], leaves)
    if eager:
        assert calls == []
    else:
        assert sorted(set(calls)) == sorted(op for _, ops in _MODULES.values() for op in ops)


def test_traced_and_subclass_tensors_take_the_custom_op(monkeypatch):
    """FX/AOT tracing (make_fx, as torch.library.opcheck and AOT autograd do) and tensor subclasses
    must see the custom op: the implementation would run a kernel on fake tensors."""
    from torch.fx.experimental.proxy_tensor import make_fx
    x, w, b = _t(4, 8, grad=False), _t(8, grad=False), _t(8, grad=False)
    graph = make_fx(lambda x, w, b: gptfast.layer_norm(x, w, b, backend="reference"), tracing_mode="fake")(x, w, b)
    assert "gptfast.layer_norm_fwd" in str(graph.code)

    class Sub(torch.Tensor):
        pass

    assert not _common._plain_eager((x.as_subclass(Sub),))
    assert _common._plain_eager((x, torch.nn.Parameter(w)))


def test_bench_overhead_reports_host_time_per_call_against_pytorch(tmp_path, capsys):
    import json

    from gptfast.cli import main
    main(["bench", "overhead", "--device", "cpu", "--sizes", "layer_norm", "attention", "train_step", "--backends",
          "reference", "--repeats", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "overhead.json").read_text())["rows"]
    assert [(r["op"], r["phase"]) for r in rows] == [(op, ph) for op in ("layer_norm", "attention", "train_step")
                                                     for ph in ("fwd", "fwd+bwd")]
    for r in rows:
        target = 1.2 if r["op"] == "train_step" else 2.0  # a whole step: 1.2x a nanoGPT-style model's
        assert r["gptfast_us"] > 0 and r["pytorch_us"] > 0 and r["target"] == target
        assert r["ratio"] == r["gptfast_us"] / r["pytorch_us"] and r["meets_target"] == (r["ratio"] <= target)
    assert "ratio" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "overhead", "--sizes", "softmax"])
