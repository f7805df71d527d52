"""cuda-only GPU tests (csrc/cuda, backend="cuda"); the grid shared with the triton backend --
seqlens, head dims incl. padded ones, bf16, large logits, 20-run determinism, races, LayerNorm and
GELU-FFN sizes -- is in test_kernels_gpu.py. Here: the build itself, float32 refusal, NaN
propagation, agreement of the atomic and deterministic dQ paths, torch's deterministic flag, the
packed varlen layout, dropout under CUDA-graph capture, auto's choice, RMSNorm and
linear_cross_entropy's logits epilogue (sizes, bf16, the fused residual add, determinism), and the
gated_ffn launchers (every weight layout the host plan distinguishes, three activations,
fp16/bf16/fp32) against the float64 formula of their contract. Skipped without a GPU: on a CPU machine the cuda backend is compiled (CI), its
argument checks tested (tests/test_cuda_backend.py) and its kernels emulated
(tests/test_cuda_emulated.py).
"""
from __future__ import annotations

import pytest
import torch

import gptfast

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (none visible)"),
]


def test_cuda_backend_builds_here():
    from gptfast import _build

    assert _build.unavailable_reason("cuda") is None


def test_attention_rejects_fp32():
    from gptfast.ops import _cuda

    q = torch.randn(1, 8, 1, 64, device="cuda")
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        _cuda.attention_forward(q, q, q, True, 0.125)
    with pytest.raises(TypeError, match="supports dtypes"):
        gptfast.attention(q, q, q, backend="cuda")


def test_attention_nan_propagates():
    q, k, v = (torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    q[0, 5, 1, 3] = float("nan")
    out = gptfast.attention(q, k, v, causal=True, backend="cuda")
    assert torch.isnan(out[0, 5, 1]).all()
    assert not torch.isnan(out[0, :, 0]).any()


def _grads(q, k, v, g, deterministic):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    gptfast.attention(*leaves, causal=True, backend="cuda", deterministic=deterministic).backward(g)
    return [t.grad for t in leaves]


def test_attention_atomic_and_deterministic_dq_agree():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 700, 4, 128, device="cuda", dtype=torch.float16) for _ in range(3))
    g = torch.randn_like(q)
    atomic, fixed = _grads(q, k, v, g, False), _grads(q, k, v, g, True)
    # dK and dV do not depend on the mode; dQ differs only by fp32 summation order.
    assert torch.equal(atomic[1], fixed[1]) and torch.equal(atomic[2], fixed[2])
    torch.testing.assert_close(atomic[0], fixed[0], atol=2e-3, rtol=1e-3)


def test_attention_use_deterministic_algorithms():
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 300, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    g = torch.randn_like(q)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a, b = _grads(q, k, v, g, False), _grads(q, k, v, g, False)
    finally:
        torch.use_deterministic_algorithms(before)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def check_varlen_launchers(launchers, device, dtype, deterministic):
    """A backend's packed-varlen launchers (``varlen=`` keyword) on a ragged batch -- empty
    sequences, queries without keys and keys without queries, 64-row tile edges, GQA, causal with a
    window, softcap, ALiBi (B, H) and dropout -- against gptfast.ops.varlen's reference launchers in
    float64 (within 2x / 3x the reference's own error in the dtype), then equal lengths against the
    dense launchers: bit for bit (sequence b draws batch entry b's dropout mask)."""
    from gptfast.ops import varlen as V
    from gptfast.testing import attention_magnitudes
    from test_kernels_gpu import assert_options_results

    lens_q, lens_k, H, Hk, D, p = [65, 0, 1, 300, 64, 7], [65, 9, 0, 257, 128, 7], 6, 2, 128, 0.17
    g = torch.Generator(device=device).manual_seed(5)
    rnd = lambda *shape: torch.randn(*shape, device=device, dtype=torch.float64, generator=g)  # noqa: E731
    cu = [torch.tensor([0, *torch.tensor(x).cumsum(0).tolist()], dtype=torch.int32, device=device)
          for x in (lens_q, lens_k)]
    q, dout, k, v = rnd(sum(lens_q), H, D), rnd(sum(lens_q), H, D), rnd(sum(lens_k), Hk, D), rnd(sum(lens_k), Hk, D)
    slopes = torch.rand(len(lens_q), H, device=device, generator=g, dtype=torch.float32) * 0.5
    rng = torch.tensor([0x243F6A8885A308D3, 4 * 12345], dtype=torch.int64)
    lengths = (*cu, max(lens_q), max(lens_k))
    kw = dict(window=(96, 0), softcap=30.0, alibi_slopes=slopes, dropout_p=p, rng_state=rng)

    def run(fwd, bwd, q, k, v, dout):
        out, lse = fwd(q, k, v, True, D ** -0.5, varlen=lengths, **kw)
        grads = bwd(dout, q, k, v, out, lse, True, D ** -0.5, deterministic, varlen=lengths, **kw)
        return out, lse, grads

    def ref_fwd(q, k, v, causal, scale, *, varlen, **kw):
        return V.attention_varlen_forward_reference(q, k, v, *varlen, causal, scale, **kw)

    def ref_bwd(dout, q, k, v, out, lse, causal, scale, deterministic, *, varlen, **kw):
        return V.attention_varlen_backward_reference(dout, q, k, v, out, lse, *varlen, causal, scale, **kw)

    truth = run(ref_fwd, ref_bwd, q, k, v, dout)
    low = [t.to(dtype) for t in (q, k, v, dout)]
    pt = run(ref_fwd, ref_bwd, *low)
    got = run(launchers.attention_forward, launchers.attention_backward, *low)
    mags = [0.0] * 4
    for b in range(len(lens_q)):
        rq, rk = slice(int(cu[0][b]), int(cu[0][b + 1])), slice(int(cu[1][b]), int(cu[1][b + 1]))
        if lens_q[b] and lens_k[b]:
            m = attention_magnitudes(*(t[r].unsqueeze(0) for t, r in zip(low, (rq, rk, rk, rq))), True, D ** -0.5,
                                     window_size=(96, 0), softcap=30.0, alibi_slopes=slopes[b:b + 1])
            mags = [max(a, x / (1.0 - p)) for a, x in zip(mags, m)]
    assert_options_results(got, truth, pt, mags, dtype)

    B, Tq, Tk = 3, 70, 90  # equal lengths: the dense batch, bit for bit
    q, dout, k, v = (rnd(B, t, h, D).to(dtype) for t, h in ((Tq, H), (Tq, H), (Tk, Hk), (Tk, Hk)))
    slopes = slopes[:B]
    kw["alibi_slopes"] = slopes
    dense_out, dense_lse = launchers.attention_forward(q, k, v, True, D ** -0.5, **kw)
    dense_grads = launchers.attention_backward(dout, q, k, v, dense_out, dense_lse, True, D ** -0.5, True, **kw)
    lengths = tuple(torch.arange(0, (B + 1) * t, t, dtype=torch.int32, device=device) for t in (Tq, Tk)) + (Tq, Tk)
    pack = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
    out, lse, grads = run(launchers.attention_forward, launchers.attention_backward, *map(pack, (q, k, v, dout)))
    assert torch.equal(out, pack(dense_out)) and torch.equal(lse, dense_lse.transpose(0, 1).reshape(H, B * Tq))
    for name, a, b in zip(("dq", "dk", "dv"), grads, dense_grads):
        if name != "dq" or deterministic:  # atomic dQ: fp32 sums in scheduling order
            assert torch.equal(a, pack(b)), f"{name}: packed != dense batch"


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_attention_varlen(dtype, deterministic):
    """csrc/cuda's packed varlen branch (prefix sums read on the device) at GPU sizes."""
    from gptfast.ops import _cuda

    check_varlen_launchers(_cuda, "cuda", dtype, deterministic)


def _attention_step(q, k, v, g):
    """Forward and backward of a dropout call on the cuda backend; the gradients land in .grad."""
    for t in (q, k, v):
        t.grad = None
    out = gptfast.attention(q, k, v, causal=True, dropout_p=0.1, backend="cuda", deterministic=True)
    out.backward(g)
    return out


def _captured(q, k, v, g):
    """A torch.cuda.CUDAGraph of _attention_step (after the warm-up on a side stream that graph
    capture needs) and its static outputs out, dq, dk, dv."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _attention_step(q, k, v, g)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for t in (q, k, v):
        t.grad = None
    with torch.cuda.graph(graph):  # raises if anything copies to the host (a sync is illegal here)
        out = _attention_step(q, k, v, g)
    return graph, [out, q.grad, k.grad, v.grad]


def test_attention_dropout_cuda_graph(monkeypatch):
    """Dropout on the cuda backend captures in a CUDA graph: the kernels read (seed, offset) from
    the rng tensor on the device, so nothing is copied to the host during capture and each replay
    draws with what the tensor holds then. With the key tensor held static (attention's _rng_state
    patched to return it), two replays with two keys must equal eager calls with those keys bit for
    bit (deterministic backward); unpatched, the key is drawn inside the graph and each replay
    draws a fresh one, as F.dropout does."""
    from gptfast.ops import attention as attention_module

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 200, 4, 64, device="cuda", dtype=torch.float16, requires_grad=True)
               for _ in range(3))
    g = torch.randn(2, 200, 4, 64, device="cuda", dtype=torch.float16)
    key = torch.zeros(2, dtype=torch.int64, device="cuda")
    with monkeypatch.context() as m:
        m.setattr(attention_module, "_rng_state", lambda device, p: key if p > 0 else None)
        graph, static = _captured(q, k, v, g)
        keys = [(0x0123456789ABCDEF, 0), (-0x0EDCBA9876543211, 4 * 0x12345678901)]
        replays = []
        for seed_offset in keys:
            key.copy_(torch.tensor(seed_offset))
            graph.replay()
            replays.append([t.clone() for t in static])
        for seed_offset, got in zip(keys, replays):
            key.copy_(torch.tensor(seed_offset))
            out = _attention_step(q, k, v, g)
            for name, a, b in zip(("out", "dq", "dk", "dv"), got, [out, q.grad, k.grad, v.grad]):
                assert torch.equal(a, b), f"{name}: replay with key {seed_offset} != eager with it"
        assert not torch.equal(replays[0][0], replays[1][0]), "two keys gave the same output"

    graph, static = _captured(q, k, v, g)  # the key drawn inside the graph
    graph.replay()
    first = static[0].clone()
    graph.replay()
    assert torch.isfinite(static[0]).all() and not torch.equal(first, static[0]), "a replay redrew no key"


def test_auto_prefers_cuda_on_gpu():
    from gptfast.ops import _backend

    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    assert _backend.resolve("layer_norm", x.device, x.dtype).backend == "cuda"
    assert _backend.resolve("attention", x.device, torch.float16).backend == "cuda"
    assert _backend.resolve("attention", x.device, torch.float32).backend == "triton"


# --- RMSNorm (csrc/cuda/rms_norm.cu) and linear_cross_entropy's logits epilogue
# (csrc/cuda/linear_cross_entropy.cu); on the CPU: tests/test_cuda_emulated.py -------------------

LOW_AND_FP32 = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("dtype", LOW_AND_FP32, ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("N", [1, 123, 768, 1000, 4096, 8201, 65536])
def test_rms_norm_sizes(N, dtype):
    """The public op (non-contiguous x and dy) against float64 and F.rms_norm in the dtype; odd N
    with Gemma's offset. 8201: the scalar path beyond the register slots; 65536: the longest row."""
    from test_triton_rms_norm import check_rms_norm
    check_rms_norm(4 if N == 65536 else 257, N, dtype, offset=1.0 if N % 2 else 0.0, backend="cuda")
    check_rms_norm(97, N, dtype, has_weight=False, backend="cuda")


@pytest.mark.parametrize("M,N,dtype,has_weight,offset,residual", [
    (257, 768, torch.bfloat16, True, 0.0, True), (257, 1000, torch.float16, True, 1.0, True),
    (97, 123, torch.bfloat16, False, 0.0, True), (33, 8200, torch.float32, True, 1.0, True),
    (20000, 768, torch.bfloat16, True, 0.0, False)])
def test_rms_norm_launchers(M, N, dtype, has_weight, offset, residual):
    """The cuda launchers against the reference launchers: the fused residual add (s bitwise
    x + r rounded once), dx + dresidual, dweight over many backward blocks (20000 rows)."""
    from test_triton_rms_norm import check_rms_norm_launchers

    from gptfast.ops import _cuda
    check_rms_norm_launchers(M, N, dtype, has_weight, offset, residual, launchers=_cuda)


def test_rms_norm_dweight_is_deterministic():
    from gptfast.ops import _cuda
    torch.manual_seed(5)
    x, dy = (torch.randn(20000, 1024, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    _, rstd = _cuda.rms_norm_forward(x, w, 1e-6, 0.0)
    first = _cuda.rms_norm_backward(dy, x, w, rstd, 0.0)
    for _ in range(5):
        again = _cuda.rms_norm_backward(dy, x, w, rstd, 0.0)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("dtype", LOW_AND_FP32, ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("smoothing, softcap", [(0.0, None), (0.1, 30.0)])
@pytest.mark.parametrize("v", [1000, 50257])
def test_linear_cross_entropy(dtype, reduction, smoothing, softcap, v):
    """The op on backend="cuda" (torch's GEMMs around the cuda epilogue) against float64 and
    PyTorch in the dtype (tests/test_linear_cross_entropy.py's check); V = 1000: the 16-byte path,
    50257 (GPT-2's, odd): the scalar path over many tiles per thread."""
    from test_linear_cross_entropy import check_low_precision
    check_low_precision("cuda", dtype, reduction, smoothing, softcap, m=300, k=128, v=v, device="cuda")


def test_cross_entropy_logits_matches_the_reference_epilogue():
    """The epilogue alone against the reference epilogue in float64 (fp32 inputs): a dominant
    logit, a row of equal logits (loss log V), an ignored row (loss 0, zero gradient row)."""
    from gptfast.ops import _cuda
    from gptfast.ops.linear_cross_entropy import cross_entropy_logits_reference
    from gptfast.testing import assert_close
    torch.manual_seed(6)
    for v, smoothing, softcap in ((50304, 0.0, 0.0), (50257, 0.1, 30.0), (17, 0.3, 2.0)):
        z = torch.randn(9, v, device="cuda") * 4
        z[1, 0], z[2] = 80.0, 50.0
        t = torch.randint(0, v, (9,), device="cuda")
        t[3] = -100
        scale = torch.rand(9, device="cuda") + 0.5
        want_z = z.double()
        want = cross_entropy_logits_reference(want_z, t, scale.double(), -100, smoothing, softcap)
        got_z = z.clone()
        got = _cuda._ext.cross_entropy_logits_(got_z, t, scale, -100, smoothing, softcap)
        # fp32 sums of V terms of size <= 2 * 80: within a few eps_fp32 * sqrt(V) of that
        assert_close(got, want, atol=160 * v ** 0.5 * 4 * 2**-23, name=f"loss V={v}")
        assert_close(got_z, want_z, atol=2 * v ** 0.5 * 4 * 2**-23, name=f"dz V={v}")
        assert got[3] == 0 and (got_z[3] == 0).all()


# --- gated_ffn (csrc/cuda/gated_ffn.*): the launchers against the float64 contract -------------------

def _gated_inputs(M, K, H, N, dtype, layout, biases, device="cuda"):
    g = torch.Generator(device="cpu").manual_seed(M * 7 + H)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)  # noqa: E731
    x = rnd(M, K)
    if layout == "fused":  # row slices of one (2H, K) gate_up weight: one dx GEMM over 2H
        w = rnd(2 * H, K, scale=K ** -0.5)
        wg, wu = w[:H], w[H:]
    elif layout == "fused_t":  # slices of a transposed (K, 2H) storage (Conv1D style)
        w = rnd(K, 2 * H, scale=K ** -0.5).t()
        wg, wu = w[:H], w[H:]
    else:  # separate (H, K) tensors, the second one a transposed view
        wg, wu = rnd(H, K, scale=K ** -0.5), rnd(K, H, scale=K ** -0.5).t()
    wd = rnd(N, H, scale=H ** -0.5)
    bg = rnd(H, scale=0.5) if "g" in biases else None
    bu = rnd(H, scale=0.5) if "u" in biases else None
    bd = rnd(N, scale=0.5) if "d" in biases else None
    return x, wg, bg, wu, bu, wd, bd, rnd(M, N)


@pytest.mark.parametrize("layout", ["fused", "fused_t", "separate"])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("size", [(300, 256, 688, 256, "gud"), (37, 100, 333, 77, "u"), (1, 64, 128, 64, "gd")],
                         ids=["vector", "odd", "one-row"])
def test_gated_ffn_launchers(size, dtype, activation, layout):
    """cuda's gated_ffn_forward / _backward (cuBLASLt GEMMs, our kernels) within the tolerance rule of
    the float64 formula of the contract on the same inputs; PyTorch's error in the dtype the yardstick."""
    from test_cuda_emulated import gated_pytorch, gated_reference

    from gptfast.ops import _cuda
    from gptfast.testing import assert_within_pytorch_error, rounding_atol

    M, K, H, N, biases = size
    x, wg, bg, wu, bu, wd, bd, dout = _gated_inputs(M, K, H, N, dtype, layout, biases)
    out, g, u = _cuda.gated_ffn_forward(x, wg, bg, wu, bu, wd, bd, activation)
    for t, shape in ((out, (M, N)), (g, (M, H)), (u, (M, H))):
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
    grads = _cuda.gated_ffn_backward(dout, x, g, u, wg, wu, wd, bg is not None, bu is not None, bd is not None,
                                     activation)
    ref, mag = gated_reference(x, wg, bg, wu, bu, wd, bd, dout, activation)
    pt_out, pt_grads = gated_pytorch(x, wg, bg, wu, bu, wd, bd, dout, activation)

    def check(name, got, pt, factor):
        assert not torch.isnan(got).any(), f"{name}: NaN"
        assert_within_pytorch_error(got, ref[name], pt, factor=factor, atol=rounding_atol(mag[name], dtype),
                                    name=name)

    check("g", g, torch.nn.functional.linear(x, wg, bg), 2)
    check("u", u, torch.nn.functional.linear(x, wu, bu), 2)
    check("out", out, pt_out, 2)
    names = ("dx", "dw_gate", "db_gate", "dw_up", "db_up", "dw_down", "db_down")
    pt_by_name = dict(zip(names, pt_grads))  # the leaves' order: x, w_gate, b_gate, w_up, b_up, w_down, b_down
    for name, got in zip(names, grads):
        if name.startswith("db") and pt_by_name[name] is None:
            assert got is None, f"{name}: given for an absent bias"
            continue
        check(name, got, pt_by_name[name], 3)


def test_gated_ffn_cuda_refuses_float64_and_empty_batch():
    from gptfast.ops import _cuda

    x, wg, bg, wu, bu, wd, bd, _ = _gated_inputs(4, 32, 48, 16, torch.float32, "fused", "gud")
    with pytest.raises(TypeError, match="float64"):
        _cuda.gated_ffn_forward(x.double(), wg.double(), None, wu.double(), None, wd.double(), None, "silu")
    with pytest.raises(ValueError, match="activation"):
        _cuda.gated_ffn_forward(x, wg, bg, wu, bu, wd, bd, "relu")
    with pytest.raises(ValueError, match="gptfast.gated_ffn: w_up must have w_gate's shape"):
        _cuda.gated_ffn_forward(x, wg, bg, wu[:5], bu, wd, bd, "silu")
    with pytest.raises(ValueError, match=r"gptfast.gated_ffn: b_up must be a contiguous \(48,\) vector"):
        _cuda.gated_ffn_forward(x, wg, bg, wu, bu[:7], wd, bd, "silu")
    with pytest.raises(ValueError, match=r"gptfast.gated_ffn: g must have shape"):
        _cuda.gated_ffn_backward(torch.zeros_like(x[:, :16]), x, x, x, wg, wu, wd, True, True, True, "silu")
    x0 = x[:0]
    out, g, u = _cuda.gated_ffn_forward(x0, wg, bg, wu, bu, wd, bd, "silu")
    assert out.shape == (0, 16) and g.shape == u.shape == (0, 48)
    dx, dwg, dbg, dwu, dbu, dwd, dbd = _cuda.gated_ffn_backward(out, x0, g, u, wg, wu, wd, True, True, True, "silu")
    assert dx.shape == (0, 32) and all(bool((t == 0).all()) for t in (dwg, dbg, dwu, dbu, dwd, dbd))
