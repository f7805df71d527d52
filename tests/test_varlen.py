"""Variable-length (packed) attention, gptfast.ops.varlen: each packed sequence equals a dense call
on that sequence alone (forward, lse, every gradient), a packed batch of equal lengths equals the
dense batched call bit for bit (dropout and (batch, nheads) ALiBi slopes included: sequence b is
batch entry b), the padding helpers, FlashAttention's varlen signatures and returns, bad input,
backend routing and torch.compile."""
from __future__ import annotations

import inspect

import pytest
import torch

import gptfast
from gptfast.ops import varlen as V

F64 = torch.float64


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _packed(lens_q, lens_k, h, hk, d, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), h, d, generator=g, dtype=dtype)
    k = torch.randn(sum(lens_k), hk, d, generator=g, dtype=dtype)
    v = torch.randn(sum(lens_k), hk, d, generator=g, dtype=dtype)
    return q, k, v, _cu(lens_q), _cu(lens_k)


# (lens_q, lens_k, H, Hk, causal, window, softcap, alibi) -- lengths 0 and 1, Tq > Tk and Tq < Tk
CASES = [
    ([5, 3, 7], [5, 3, 7], 2, 2, True, (-1, -1), 0.0, None),
    ([3, 0, 5, 1], [4, 2, 5, 7], 4, 2, True, (2, -1), 3.0, "bh"),
    ([1, 6, 2], [9, 1, 0], 6, 2, False, (-1, -1), 0.0, "h"),
    ([8, 4], [3, 11], 3, 1, False, (2, 1), 0.0, None),
    ([0, 0], [0, 3], 2, 2, True, (-1, -1), 0.0, None),
]


def _id(c):
    return f"q{c[0]}-k{c[1]}-h{c[2]}:{c[3]}-{'causal' if c[4] else 'full'}-w{c[5]}-sc{c[6]}-{c[7]}"


def _slopes(kind, batch, h):
    g = torch.Generator().manual_seed(9)
    return None if kind is None else torch.rand((h,) if kind == "h" else (batch, h), generator=g)


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_each_sequence_equals_dense_attention_on_it(case):
    lens_q, lens_k, h, hk, causal, window, softcap, alibi = case
    q, k, v, cq, ck = _packed(lens_q, lens_k, h, hk, 16)
    slopes = _slopes(alibi, len(lens_q), h)
    kw = dict(causal=causal, window_size=window, softcap=softcap)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = V.attention_varlen(*leaves, cq, ck, max(lens_q), max(lens_k), alibi_slopes=slopes,
                                  return_lse=True, **kw)
    assert out.shape == q.shape and lse.shape == (h, q.shape[0]) and lse.dtype == F64
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    for b in range(len(lens_q)):
        rq, rk = slice(int(cq[b]), int(cq[b + 1])), slice(int(ck[b]), int(ck[b + 1]))
        if rq.stop == rq.start:
            continue
        if rk.stop == rk.start:  # no keys: zeros, -inf, no gradient
            assert torch.all(out[rq] == 0) and torch.all(lse[:, rq] == float("-inf"))
            assert torch.all(grads[0][rq] == 0)
            continue
        dense = [t[r].unsqueeze(0).clone().requires_grad_() for t, r in ((q, rq), (k, rk), (v, rk))]
        s_b = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[b:b + 1])
        # the varlen call normalises windows with max_seqlen_k: pass the dense call the same
        o_b, l_b = gptfast.attention(*dense, backend="reference", alibi_slopes=s_b, return_lse=True,
                                     **(kw | {"window_size": tuple(w if w < max(lens_k) else -1 for w in window)}))
        g_b = torch.autograd.grad(o_b, dense, dout[rq].unsqueeze(0))
        torch.testing.assert_close(out[rq], o_b[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse[:, rq], l_b[0], rtol=1e-12, atol=1e-12)
        for full, part, r in zip(grads, g_b, (rq, rk, rk)):
            torch.testing.assert_close(full[r], part[0], rtol=1e-12, atol=1e-12)


CPU_BACKENDS = ["cpu"] if "cpu" in gptfast.available_backends("attention", "cpu") else []
# triton runs on CPU tensors in its interpreter (conftest.py); its full varlen grid: tests/test_triton_varlen.py
TRITON = ["triton"] if "triton" in gptfast.available_backends("attention", "cpu") else []


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_kernel_backend_matches_the_reference(case, dtype, backend):
    """The cpu kernels' packed path against the float64 reference: fp64 to 1e-10 (the index math),
    fp32 and bf16 within the rounding of their accumulation (fp32) and of the bf16 output."""
    lens_q, lens_k, h, hk, causal, window, softcap, alibi = case
    q, k, v, cq, ck = _packed(lens_q, lens_k, h, hk, 40)
    slopes = _slopes(alibi, len(lens_q), h)
    kw = dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes, dropout_p=0.17)
    dout = torch.randn_like(q)
    results = []
    for name, dt in (("reference", F64), (backend, dtype)):
        leaves = [t.to(dt).requires_grad_() for t in (q, k, v)]
        torch.manual_seed(11)
        out, lse = V.attention_varlen(*leaves, cq, ck, max(lens_q), max(lens_k), backend=name, return_lse=True, **kw)
        results.append((out, lse, *torch.autograd.grad(out, leaves, dout.to(dt))))
    tol = {F64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]
    for name, a, r in zip(("out", "lse", "dq", "dk", "dv"), results[1], results[0]):
        assert a.dtype == (r.dtype if name == "lse" and dtype == F64 else torch.float32 if name == "lse" else dtype)
        finite = r != float("-inf")
        assert torch.equal(a == float("-inf"), ~finite), name  # the same rows see no key
        err = (a.double()[finite] - r[finite]).abs().max().item() if finite.any() else 0.0
        assert err <= tol * max(1.0, r[finite].abs().max().item() if finite.any() else 0.0), (name, err)


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS + TRITON)
def test_equal_lengths_equal_the_dense_batch_with_dropout_bit_for_bit(backend):
    b, t, h, hk, d = 3, 9, 4, 2, 8
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, t, n, d, generator=g) for n in (h, hk, hk))
    slopes = torch.rand(b, h, generator=g)
    kw = dict(causal=True, dropout_p=0.3, alibi_slopes=slopes, softcap=4.0, backend=backend)
    torch.manual_seed(5)
    dense = gptfast.attention(q, k, v, **kw)
    cu = _cu([t] * b)
    torch.manual_seed(5)
    packed = V.attention_varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, t, t, **kw)
    assert torch.equal(packed, dense.flatten(0, 1))
    torch.manual_seed(6)
    other = V.attention_varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, t, t, **kw)
    assert not torch.equal(other, packed)


def test_gradcheck_float64_with_options():
    q, k, v, cq, ck = _packed([3, 1, 4], [4, 2, 4], 4, 2, 6)
    slopes = _slopes("bh", 3, 4)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    fn = lambda q, k, v: V.attention_varlen(q, k, v, cq, ck, 4, 4, causal=True, window_size=(1, -1),  # noqa: E731
                                            softcap=2.0, alibi_slopes=slopes)
    assert torch.autograd.gradcheck(fn, leaves)


def test_deterministic_backward_and_fp32():
    q, k, v, cq, ck = _packed([7, 2], [5, 9], 4, 2, 16, dtype=torch.float32)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    runs = []
    for _ in range(2):
        out = V.attention_varlen(*leaves, cq, ck, 7, 9, causal=False, deterministic=True)
        runs.append(torch.autograd.grad(out.sum(), leaves))
    for a, b in zip(*runs):
        assert torch.equal(a, b) and a.dtype == torch.float32


def test_unpad_and_pad_round_trip_any_mask():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 2, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0],   # right padding
                         [0, 0, 1, 1, 1],   # left padding
                         [1, 0, 1, 0, 0]])  # holes
    packed, idx, cu, max_len, used = V.unpad_input(x, mask)
    assert packed.shape == (8, 2, 4) and cu.tolist() == [0, 3, 6, 8] and max_len == 3
    assert used.tolist() == [3, 3, 2] and cu.dtype == torch.int32 and idx.dtype == torch.int64
    assert torch.equal(packed[3:6], x[1, 2:5])
    assert torch.equal(V.pad_input(packed, idx, 3, 5), x * mask[..., None, None])
    extra = torch.zeros_like(mask)
    extra[0, 3] = 1  # packed too, but not counted as used
    _, _, cu2, _, used2 = V.unpad_input(x, mask, extra)
    assert cu2.tolist() == [0, 4, 7, 9] and used2.tolist() == [3, 3, 2]
    with pytest.raises(ValueError, match="attention_mask must be a \\(batch, seqlen\\)"):
        V.unpad_input(x, mask[:, :4])


def test_pad_input_is_differentiable():
    packed = torch.randn(4, 3, requires_grad=True)
    idx = torch.tensor([0, 2, 3, 5])
    out = V.pad_input(packed, idx, 2, 3)
    (out * torch.arange(6.0).view(2, 3, 1)).sum().backward()
    assert packed.grad[:, 0].tolist() == [0.0, 2.0, 3.0, 5.0]


def test_flash_attn_varlen_signatures_match_flashattention():
    params = lambda f: [(p.name, p.default) for p in inspect.signature(f).parameters.values()]  # noqa: E731
    assert params(V.flash_attn_varlen_func) == [
        ("q", inspect._empty), ("k", inspect._empty), ("v", inspect._empty), ("cu_seqlens_q", inspect._empty),
        ("cu_seqlens_k", inspect._empty), ("max_seqlen_q", inspect._empty), ("max_seqlen_k", inspect._empty),
        ("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
        ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False),
        ("block_table", None)]
    assert [n for n, _ in params(V.flash_attn_varlen_qkvpacked_func)][:3] == ["qkv", "cu_seqlens", "max_seqlen"]
    assert [n for n, _ in params(V.flash_attn_varlen_kvpacked_func)][:2] == ["q", "kv"]
    for name in ("flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func",
                 "attention_varlen", "unpad_input", "pad_input"):
        assert getattr(gptfast, name) is getattr(V, name)


def test_packed_variants_and_attn_probs():
    q, k, v, cq, ck = _packed([4, 6], [4, 6], 2, 2, 8)
    qkv = torch.stack([q, k, v], dim=1)
    torch.manual_seed(3)
    a = V.flash_attn_varlen_qkvpacked_func(qkv, cq, 6, dropout_p=0.25, causal=True)
    torch.manual_seed(3)
    b = V.flash_attn_varlen_kvpacked_func(q, torch.stack([k, v], dim=1), cq, ck, 6, 6, dropout_p=0.25, causal=True)
    torch.manual_seed(3)
    c, lse, probs = V.flash_attn_varlen_func(q, k, v, cq, ck, 6, 6, dropout_p=0.25, causal=True,
                                             return_attn_probs=True)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert probs.shape == (2, 2, 6, 6) and torch.all(probs[0, :, 4:] == 0) and torch.all(probs[0, :, :, 4:] == 0)
    # out = (kept probabilities / (1 - p)) @ v, sequence by sequence
    for s, (r0, r1) in enumerate(((0, 4), (4, 10))):
        n = r1 - r0
        p = probs[s, :, :n, :n].clamp(min=0).double() / 0.75
        expect = torch.einsum("hij,jhd->ihd", p, v[r0:r1])
        torch.testing.assert_close(c[r0:r1], expect, rtol=1e-5, atol=1e-6)
    assert (probs < 0).any(), "some entries are dropped at p = 0.25"


def test_paged_keys_equal_the_packed_keys_forward_and_backward():
    lens_q, lens_k, page = [3, 1, 5], [9, 0, 20], 4
    q, k, v, cq, ck = _packed(lens_q, lens_k, 4, 2, 8)
    g = torch.Generator().manual_seed(6)
    n_blocks = 12
    perm = torch.randperm(n_blocks, generator=g)
    block_table = torch.full((3, 6), n_blocks - 1, dtype=torch.int32)  # unused slots: any block
    kp, vp = (torch.randn(n_blocks, page, 2, 8, generator=g, dtype=F64) for _ in range(2))
    used = 0
    for b, n in enumerate(lens_k):  # write each sequence's keys into its (shuffled) pages
        for i in range(-(-n // page)):
            blk = int(perm[used])
            used += 1
            block_table[b, i] = blk
            rows = slice(int(ck[b]) + i * page, int(ck[b]) + min(n, (i + 1) * page))
            kp[blk, :rows.stop - rows.start] = k[rows]
            vp[blk, :rows.stop - rows.start] = v[rows]
    kp.requires_grad_(), vp.requires_grad_()
    kw = dict(causal=True, dropout_p=0.0)
    want = V.flash_attn_varlen_func(q, k, v, cq, ck, 5, 20, **kw)
    got = V.flash_attn_varlen_func(q, kp, vp, cq, ck, 5, 20, block_table=block_table, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    dout = torch.randn(got.shape, generator=g, dtype=F64)
    gk, gv = torch.autograd.grad(got, (kp, vp), dout)
    k2, v2 = k.clone().requires_grad_(), v.clone().requires_grad_()
    wk, wv = torch.autograd.grad(V.flash_attn_varlen_func(q, k2, v2, cq, ck, 5, 20, **kw), (k2, v2), dout)
    assert float(gk[block_table[0, 0].long(), 0].abs().sum()) > 0
    torch.testing.assert_close(gk[block_table[0, 0].long()], wk[0:4].reshape(page, 2, 8))
    torch.testing.assert_close(gv[block_table[2, 4].long(), :4], wv[9 + 16:9 + 20])
    with pytest.raises(ValueError, match="block_table must be int32"):
        V.flash_attn_varlen_func(q, kp, vp, cq, ck, 5, 20, block_table=block_table.long())
    with pytest.raises(ValueError, match="needs more than block_table"):
        V.flash_attn_varlen_func(q, kp, vp, cq, ck, 5, 20, block_table=block_table[:, :2].contiguous())


@pytest.mark.parametrize("change, exc, msg", [
    (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].long()), ValueError, "cu_seqlens_q must be a 1-D int32"),
    (lambda a: a.update(cu_seqlens_k=_cu([4, 4, 1])), ValueError, "the same length"),
    (lambda a: a.update(cu_seqlens_q=_cu([3, 4])), ValueError, "end at the number of rows"),
    (lambda a: a.update(cu_seqlens_k=torch.tensor([0, 6, 5], dtype=torch.int32)), ValueError, "never decrease"),
    (lambda a: a.update(max_seqlen_q=3), ValueError, "max_seqlen_q = 3 is shorter"),
    (lambda a: a.update(max_seqlen_k=-1), ValueError, "max_seqlen_k must be an int >= 0"),
    (lambda a: a.update(k=a["k"][:, :1].expand(-1, 3, -1)), ValueError, "multiple of nheads_k"),
    (lambda a: a.update(q=a["q"][None]), ValueError, "q"),
    (lambda a: a.update(alibi_slopes=torch.rand(3, 2)), ValueError, "alibi_slopes must have shape"),
    (lambda a: a.update(dropout_p=1.0), ValueError, "dropout_p must be in"),
    (lambda a: a.update(window_size=(-2, 0)), ValueError, "window_size"),
])
def test_bad_input_names_the_argument(change, exc, msg):
    q, k, v, cq, ck = _packed([4, 4], [5, 5], 2, 2, 8)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=4, max_seqlen_k=5)
    change(args)
    with pytest.raises(exc, match=msg):
        V.attention_varlen(**args)


def test_routing_every_kernel_backend_has_varlen():
    from gptfast.ops import _backend
    q, k, v, cq, ck = _packed([3, 2], [3, 2], 2, 2, 8, dtype=torch.float32)
    out = V.attention_varlen(q, k, v, cq, ck, 3, 3)  # auto: cpu where built, else the reference
    assert out.shape == q.shape
    assert "varlen" in _backend._REGISTRY[("attention", "cpu")].features
    assert "varlen" in _backend._REGISTRY[("attention", "triton")].features
    assert "varlen" in _backend._REGISTRY[("attention", "cuda")].features  # tests/test_cuda_emulated.py
    if TRITON:
        packed = V.attention_varlen(q, k, v, cq, ck, 3, 3, backend="triton")
        torch.testing.assert_close(packed, V.attention_varlen(q, k, v, cq, ck, 3, 3, backend="reference"),
                                   rtol=0, atol=2e-5)


def test_compiles_fullgraph_and_opcheck():
    q, k, v, cq, ck = _packed([3, 5], [4, 5], 4, 2, 8, dtype=torch.float32)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    fn = lambda q, k, v: V.attention_varlen(q, k, v, cq, ck, 5, 5, causal=True, dropout_p=0.2)  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    eager = fn(*leaves)
    torch.manual_seed(1)
    assert torch.equal(compiled(*leaves), eager)
    rng = torch.tensor([7, 0], dtype=torch.int64)
    args = (*leaves, cq, ck, 5, 5, True, 0.3, 1, 0, 2.0, torch.rand(2, 4), 0.2, rng, False, "reference")
    torch.library.opcheck(torch.ops.gptfast.attention_varlen_fwd, args)
