"""KV-cache decoding (gptfast.flash_attn_with_kvcache) on a real NVIDIA GPU: the triton split-K
decode kernels (kernels/kvcache.py) and cuda's dense path (one key range of a contiguous cache)
at decoding sizes the CPU tests cannot reach (caches of 1k..8k positions, paged and contiguous,
GQA, num_splits 0/1/8), fp16 and bf16, against the float64 reference launcher.

Rule (FlashAttention's): out within 2x the reference launcher's own error in the tested dtype,
+ 1e-3. Skipped without a GPU; run by bench/gpu_suite.sh.
"""
from __future__ import annotations

import pytest
import torch

import gptfast
from gptfast.testing import assert_within_pytorch_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (none visible)"),
]

# (B, Tq, H, Hk, D, cache_seqlens, page size or None, causal)
CASES = [
    (1, 1, 32, 8, 128, [8191], None, True),             # one long sequence: the split-K case
    (4, 1, 12, 12, 64, [1023, 17, 4000, 0], 256, True),  # ragged, paged
    (8, 4, 16, 2, 128, [2048] * 8, None, True),          # a 4-token chunk, one key range
    (2, 1, 8, 1, 64, [5000, 3000], 16, False),           # MQA, small pages
]


def _run(backend, case, dtype, num_splits, g_seed):
    b, tq, h, hk, d, lens, page, causal = case
    g = torch.Generator(device="cuda").manual_seed(g_seed)
    t_cache = 8192 + tq
    q = torch.randn(b, tq, h, d, device="cuda", generator=g, dtype=torch.float64)
    k_new = torch.randn(b, tq, hk, d, device="cuda", generator=g, dtype=torch.float64)
    v_new = torch.randn(b, tq, hk, d, device="cuda", generator=g, dtype=torch.float64)
    if page:
        nblk = -(-t_cache // page)
        shape = (b * nblk, page, hk, d)
        perm = torch.randperm(b * nblk, device="cuda", generator=g)
        block_table = perm.view(b, nblk).to(torch.int32)
    else:
        shape, block_table = (b, t_cache, hk, d), None
    kc = torch.randn(shape, device="cuda", generator=g, dtype=torch.float64)
    vc = torch.randn(shape, device="cuda", generator=g, dtype=torch.float64)
    args = [t.to(dtype) for t in (q, kc, vc, k_new, v_new)]
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    with gptfast.use_backend(backend):
        return gptfast.flash_attn_with_kvcache(*args, cache_seqlens=seqlens, block_table=block_table,
                                               causal=causal, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [0, 1, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kvcache_against_the_float64_reference(backend, case, dtype, num_splits):
    c = CASES[case]
    one_range = c[6] is None and len(set(c[5])) == 1
    if backend == "cuda" and not one_range:
        pytest.skip("cuda has no kvcache kernel: only one key range of a contiguous cache runs on it")
    ref = _run("reference", c, torch.float64, num_splits, case)
    pt = _run("reference", c, dtype, num_splits, case)
    got = _run(backend, c, dtype, num_splits, case)
    assert got.dtype == dtype
    assert_within_pytorch_error(got, ref, pt, factor=2, atol=1e-3, name=f"{backend} kvcache out")
