"""The kvcache kernels (split-K decoding over a KV cache read in place) against the reference
launcher: every kernel backend that runs here (cpu; triton under TRITON_INTERPRET=1) over decode
(Tq = 1) and chunked (Tq > 1) steps, ragged key ranges (one sequence without keys: out 0, lse
-inf), GQA/MQA, contiguous and paged caches, cache_batch_idx, leftpad, causal, windows, softcap,
ALiBi and num_splits 0/1/3, in fp32 and fp16; results independent of num_splits; the backend
selection (cuda has no kvcache kernel); torch.compile(fullgraph=True) through
flash_attn_with_kvcache."""
from __future__ import annotations

import pytest
import torch

import gptfast
from gptfast import flash_attn_with_kvcache
from gptfast.ops import _backend
from gptfast.ops.kvcache import kvcache_fwd_op

KERNELS = [b for b in gptfast.available_backends("kvcache", "cpu") if b != "reference"]

# (B, Tq, H, Hk, D, key ranges [(start, end)], causal, window, softcap, alibi ("h", "bh", None),
#  page size (paged) or None, cache_batch_idx)
CASES = [
    # a decode step: ragged, one sequence without keys (end == start), GQA, rows permuted
    (3, 1, 4, 2, 16, [(0, 37), (5, 5), (2, 150)], True, (-1, -1), 0.0, None, None, True),
    # a chunk of 3 queries, MQA, paged (blocks of 16: chunks cross pages), leftpad
    (2, 3, 4, 1, 32, [(3, 70), (0, 9)], True, (-1, -1), 0.0, None, 16, False),
    # decode with a sliding window, softcap and per-sequence ALiBi; pages of 4; a start past the end
    (3, 1, 2, 2, 8, [(1, 40), (7, 3), (0, 130)], True, (8, 0), 4.0, "bh", 4, False),
    # non-causal two-sided window, ALiBi per head, awkward head dim, no batch_idx
    (2, 4, 3, 3, 40, [(0, 21), (4, 60)], False, (3, 1), 0.0, "h", None, False),
    # more queries than keys (causal rows without keys), GQA 3:1
    (2, 5, 6, 2, 16, [(0, 2), (1, 140)], True, (-1, -1), 0.0, None, None, True),
    # non-causal full attention, a long range over several key blocks
    (1, 2, 2, 1, 64, [(0, 300)], False, (-1, -1), 0.0, None, 32, False),
]
T_CACHE = 320


def _ids(c):
    b, tq, h, hk, d, ranges, causal, window, softcap, alibi, page, bidx = c
    return (f"B{b}-q{tq}-h{h}:{hk}-d{d}-{'causal' if causal else 'full'}-w{window[0]},{window[1]}"
            f"{'-sc' if softcap else ''}{'-alibi' + alibi if alibi else ''}{'-paged' + str(page) if page else ''}"
            f"{'-bidx' if bidx else ''}")


def _inputs(case, dtype, seed=0):
    """The kvcache_fwd_op arguments of a case (options raw; backend and num_splits left off)."""
    b, tq, h, hk, d, ranges, causal, window, softcap, alibi, page, bidx = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, tq, h, d, generator=g).to(dtype)
    block_table = rows = None
    if page:
        nblk = T_CACHE // page
        block_table = torch.randperm(b * nblk + 3, generator=g)[:b * nblk].view(b, nblk).to(torch.int32)
        shape = (b * nblk + 3, page, hk, d)
    else:
        shape = (b + 2, T_CACHE, hk, d)
        rows = torch.randperm(b + 2, generator=g)[:b].to(torch.int32) if bidx else None
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    ks = torch.tensor([r[0] for r in ranges], dtype=torch.int32)
    ke = torch.tensor([r[1] for r in ranges], dtype=torch.int32)
    slopes = {"h": torch.rand(h, generator=g), "bh": torch.rand(b, h, generator=g), None: None}[alibi]
    return (q, k_cache, v_cache, block_table, rows, ks, ke, causal, d ** -0.5, window[0], window[1], softcap, slopes)


def _run(args, num_splits, backend):
    return kvcache_fwd_op(*args, num_splits, backend)


def _assert_close(out, lse, ref_out, ref_lse, rel):
    """|out - ref| <= rel * max|ref| (the relative tolerance of the whole tensor); lse alike, with
    -inf exactly where the reference has it."""
    scale = ref_out.abs().max().item() or 1.0
    err = (out.float() - ref_out.float()).abs().max().item()
    assert err <= rel * scale, f"out: max error {err:.3g} > {rel:g} * {scale:.3g}"
    assert torch.equal(lse == float("-inf"), ref_lse == float("-inf"))
    fin = ref_lse.isfinite()
    lerr = (lse[fin] - ref_lse[fin]).abs().max().item() if fin.any() else 0.0
    assert lerr <= rel * max(1.0, ref_lse[fin].abs().max().item()), f"lse: max error {lerr:.3g}"
    assert out.is_contiguous() and out.dtype == ref_out.dtype and lse.dtype == torch.float32


@pytest.mark.skipif(not KERNELS, reason="no kvcache kernel backend runs here")
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_kernel_matches_reference(case, dtype, backend):
    args = _inputs(case, dtype)
    ref_out, ref_lse = _run(args, 0, "reference")
    for num_splits in (0, 1, 3):
        out, lse = _run(args, num_splits, backend)
        # fp32: accumulation order only; fp16: the output's rounding (2^-11) dominates
        _assert_close(out, lse, ref_out, ref_lse, 2e-5 if dtype == torch.float32 else 2e-3)
    # a sequence without keys gives exactly 0 and -inf
    empty = [s for s, r in enumerate(case[5]) if r[1] <= r[0]]
    for s in empty:
        assert torch.equal(out[s], torch.zeros_like(out[s])) and bool((lse[s] == float("-inf")).all())


@pytest.mark.skipif(not KERNELS, reason="no kvcache kernel backend runs here")
@pytest.mark.parametrize("backend", KERNELS)
def test_result_does_not_depend_on_num_splits(backend):
    case = (1, 2, 2, 1, 32, [(3, 700)], True, (-1, -1), 0.0, None, None, False)
    args = _inputs(case, torch.float32, seed=1)
    args = (args[0], torch.randn(1, 704, 1, 32), torch.randn(1, 704, 1, 32)) + args[3:]
    base_out, base_lse = _run(args, 1, backend)
    for num_splits in (0, 2, 3, 7, 64):
        out, lse = _run(args, num_splits, backend)
        _assert_close(out, lse, base_out, base_lse, 1e-5)


def test_backend_selection_routes_around_cuda():
    # cuda has no kvcache kernel: an explicit request names the op, auto picks another backend
    with pytest.raises(NotImplementedError, match="'cuda' backend has no kvcache implementation"):
        _backend.resolve("kvcache", torch.device("cuda"), torch.float16, "cuda")
    assert _backend.resolve("kvcache", torch.device("cuda"), torch.float16).backend != "cuda"
    assert _backend.resolve("kvcache", torch.device("cpu"), torch.float32).backend == (
        "cpu" if "cpu" in KERNELS else "reference")


@pytest.mark.skipif("cpu" not in KERNELS, reason="needs the cpu backend's dense attention")
def test_a_backend_without_a_kvcache_kernel_runs_one_key_range_on_its_dense_kernels(monkeypatch):
    # as cuda does: GPT.generate's calls (one key range, contiguous cache) run its attention
    # kernels on views of the cache; ragged or paged calls raise, naming the op
    import gptfast
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 1, 4, 16, generator=g)
    kc, vc = torch.randn(2, 12, 2, 16, generator=g), torch.randn(2, 12, 2, 16, generator=g)
    k, v = torch.randn(2, 1, 2, 16, generator=g), torch.randn(2, 1, 2, 16, generator=g)
    kw = dict(cache_seqlens=torch.tensor([7, 7], dtype=torch.int32), causal=True, return_softmax_lse=True)
    with gptfast.use_backend("reference"):
        want = gptfast.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, **kw)
    monkeypatch.delitem(_backend._REGISTRY, ("kvcache", "cpu"))
    calls = []
    real = _backend.resolve
    monkeypatch.setattr(_backend, "resolve", lambda op, *a, **k2: calls.append(op) or real(op, *a, **k2))
    with gptfast.use_backend("cpu"):
        got = gptfast.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, **kw)
        assert calls == ["attention"]
        torch.testing.assert_close(got[0], want[0], atol=2e-6, rtol=0)
        torch.testing.assert_close(got[1], want[1], atol=2e-6, rtol=0)
        with pytest.raises(NotImplementedError, match="kvcache"):  # ragged: no dense equivalent
            gptfast.flash_attn_with_kvcache(q, kc, vc, k, v, **(kw | {"cache_seqlens": torch.tensor([7, 5],
                                                                                                dtype=torch.int32)}))


@pytest.mark.parametrize("backend", ["reference"] + [b for b in KERNELS if b == "cpu"])
def test_opcheck(backend):
    args = _inputs(CASES[1], torch.float32)
    torch.library.opcheck(kvcache_fwd_op, (*args, 2, backend))


def test_flash_attn_with_kvcache_compiles_fullgraph():
    """A decoding step (update the cache in place, attend over ragged ranges) compiled with
    fullgraph=True: no graph break, the eager step's output and cache."""
    torch.manual_seed(0)
    b, h, hk, d, t = 2, 4, 2, 16, 24

    def step(q, k_cache, v_cache, k, v, seqlens):
        return flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=True,
                                       num_splits=2, return_softmax_lse=True)

    q, k, v = torch.randn(b, 1, h, d), torch.randn(b, 1, hk, d), torch.randn(b, 1, hk, d)
    caches = torch.randn(2, b, t, hk, d)
    seqlens = torch.tensor([5, 17], dtype=torch.int32)
    eager_k, eager_v = caches[0].clone(), caches[1].clone()
    out_e, lse_e = step(q, eager_k, eager_v, k, v, seqlens)
    comp_k, comp_v = caches[0].clone(), caches[1].clone()
    out_c, lse_c = torch.compile(step, fullgraph=True, backend="aot_eager")(q, comp_k, comp_v, k, v, seqlens)
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(lse_c, lse_e)
    assert torch.equal(comp_k, eager_k) and torch.equal(comp_v, eager_v)
