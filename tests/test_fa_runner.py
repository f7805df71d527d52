"""bench/fa_tests.py's own pieces, without FlashAttention's test file: the flash_attn shim (its
names resolve to gptfast's dense, varlen, kvcache and padding functions; its own rotary), the source
rewrite, the deterministic sampling and the generated package."""
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("fa_tests_runner", ROOT / "bench" / "fa_tests.py")
fa = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fa)


def _import_shim(workdir: Path):
    """Import the generated flash_attn package from ``workdir``; returns (modules, cleanup)."""
    sys.path.insert(0, str(workdir))
    names = ("flash_attn", "flash_attn.bert_padding", "flash_attn.flash_attn_interface", "flash_attn.layers.rotary")
    mods = [importlib.import_module(n) for n in names]

    def cleanup():
        sys.path.remove(str(workdir))
        for n in [n for n in sys.modules if n == "_fa_runner" or n.split(".")[0] == "flash_attn"]:
            del sys.modules[n]
    return mods, cleanup


def test_s_dmask_in_fas_layout_renormalises_to_gptfasts_probabilities():
    # FA's tests scale S_dmask's column block j by exp(m_j - lse) (m_j: the max score of blocks
    # j..); with the shim's one block that is exp(m - lse), which must give back the probabilities
    import gptfast
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 5, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    torch.manual_seed(1)
    out, lse, probs = gptfast.flash_attn_func(q, k, v, 0.3, causal=True, return_attn_probs=True)
    torch.manual_seed(1)
    out2, lse2, fa_s = fa._fa_probs(gptfast.flash_attn_func)(q, k, v, 0.3, causal=True, return_attn_probs=True)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    assert torch.equal(fa_s < 0, probs < 0)  # the dropout signs kept
    scores = torch.einsum("bthd,bshd->bhts", q / 8 ** 0.5, k)
    scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    assert fa.get_block_size_n("cpu", 8, True, True) >= 5
    m = scores.amax(dim=-1, keepdim=True)
    torch.testing.assert_close(fa_s.abs() * torch.exp(m - lse[..., None]), probs.abs(), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(probs.abs() * torch.exp(m - lse[..., None]), probs.abs())  # unconverted fails


def test_shim_maps_varlen_kvcache_and_padding_to_gptfast(tmp_path):
    import gptfast
    from gptfast.ops import kvcache, varlen
    (tmp_path / "fa.py").write_text("")
    fa.build(tmp_path / "work", tmp_path / "fa.py")
    (flash_attn, bert_padding, interface, rotary), cleanup = _import_shim(tmp_path / "work")
    try:
        # wrapped only to give S_dmask FA's layout (test_s_dmask_in_fas_layout...)
        assert flash_attn.flash_attn_varlen_func.__wrapped__ is varlen.flash_attn_varlen_func
        assert flash_attn.flash_attn_varlen_kvpacked_func.__wrapped__ is varlen.flash_attn_varlen_kvpacked_func
        assert flash_attn.flash_attn_varlen_qkvpacked_func.__wrapped__ is varlen.flash_attn_varlen_qkvpacked_func
        assert flash_attn.flash_attn_func.__wrapped__ is gptfast.flash_attn_func
        assert flash_attn.flash_attn_with_kvcache is kvcache.flash_attn_with_kvcache
        assert interface.flash_attn_varlen_func is flash_attn.flash_attn_varlen_func
        assert bert_padding.unpad_input is varlen.unpad_input and bert_padding.pad_input is varlen.pad_input
        assert rotary.apply_rotary_emb.__module__ == "_fa_runner"  # own, independent of gptfast's
        torch.manual_seed(0)
        with gptfast.use_backend("reference"):
            # padding helpers: FA 2.7+'s five-tuple, pad_input its inverse
            x = torch.randn(2, 4, 3, 8, dtype=torch.float64)
            mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
            q, indices, cu, max_len, used = bert_padding.unpad_input(x, mask)
            assert q.shape == (5, 3, 8) and cu.tolist() == [0, 2, 5] and max_len == 3 and used.tolist() == [2, 3]
            assert torch.equal(bert_padding.pad_input(q, indices, 2, 4), x * mask[..., None, None])
            # varlen: each packed sequence is the dense call on its own rows
            out = flash_attn.flash_attn_varlen_qkvpacked_func(torch.stack([q, q, q], 1), cu, max_len, causal=True)
            for b in range(2):
                rows = slice(cu[b], cu[b + 1])
                dense = gptfast.flash_attn_func(q[None, rows], q[None, rows], q[None, rows], causal=True)[0]
                torch.testing.assert_close(out[rows], dense)
            # kvcache, contiguous and paged: the new keys land in the cache, attention sees cache_seqlens + 1
            k_cache, v_cache = torch.randn(2, 2, 8, 3, 8, dtype=torch.float64).unbind(0)
            new_k, new_v = torch.randn(2, 2, 1, 3, 8, dtype=torch.float64).unbind(0)
            lens = torch.tensor([2, 6], dtype=torch.int32)
            paged_k, paged_v = k_cache.reshape(4, 4, 3, 8).clone(), v_cache.reshape(4, 4, 3, 8).clone()
            table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
            got = flash_attn.flash_attn_with_kvcache(q[None, :1].expand(2, 1, 3, 8), k_cache, v_cache, new_k, new_v,
                                                     cache_seqlens=lens)
            paged = flash_attn.flash_attn_with_kvcache(q[None, :1].expand(2, 1, 3, 8), paged_k, paged_v, new_k,
                                                       new_v, cache_seqlens=lens, block_table=table)
            torch.testing.assert_close(paged, got)
            assert torch.equal(paged_k.reshape(2, 8, 3, 8), k_cache)
            for b, n in enumerate(lens.tolist()):
                assert torch.equal(k_cache[b, n], new_k[b, 0])
                dense = gptfast.flash_attn_func(q[None, :1], k_cache[b:b + 1, :n + 1], v_cache[b:b + 1, :n + 1])[0]
                torch.testing.assert_close(got[b], dense)
    finally:
        cleanup()


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_is_a_rotation_by_position(interleaved):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64)
    angle = torch.rand(16, 2, dtype=torch.float64) * 6.28
    out = fa.apply_rotary_emb(x, angle.cos(), angle.sin(), interleaved=interleaved,
                              seqlen_offsets=torch.tensor([0, 3]))
    assert torch.equal(out[..., 4:], x[..., 4:])  # channels past rotary_dim untouched
    i, j = (0, 1) if interleaved else (0, 2)  # the first rotated pair
    t, b = 2, 1  # batch 1 is offset by 3: position 5
    c, s = angle[5, 0].cos(), angle[5, 0].sin()
    a_, b_ = x[b, t, :, i], x[b, t, :, j]
    assert torch.allclose(out[b, t, :, i], a_ * c - b_ * s)
    assert torch.allclose(out[b, t, :, j], a_ * s + b_ * c)
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1))


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_packed_sequences_match_the_padded_call(interleaved):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64)
    angle = torch.rand(16, 3, dtype=torch.float64) * 6.28
    offsets = torch.tensor([1, 4], dtype=torch.int32)
    dense = fa.apply_rotary_emb(x, angle.cos(), angle.sin(), interleaved=interleaved, seqlen_offsets=offsets)
    cu = torch.tensor([0, 5, 8], dtype=torch.int32)  # sequence 1 keeps its first 3 tokens
    packed = torch.cat([x[0], x[1, :3]])
    out = fa.apply_rotary_emb(packed.clone(), angle.cos(), angle.sin(), interleaved=interleaved,
                              seqlen_offsets=offsets, cu_seqlens=cu, max_seqlen=5, inplace=True)
    assert torch.equal(out, torch.cat([dense[0], dense[1, :3]]))


def test_rewrite_moves_devices_to_cpu_and_drops_bare_skips():
    src = ('@pytest.mark.skip()\ndef test_a():\n    device = "cuda"\n    x = f(device="cuda")\n'
           "    y = g(device='cuda')\n    z = torch.cuda.is_available()\n"
           '@pytest.mark.skip(reason="kept")\ndef test_b():\n    for i in range(250):\n        pass\n')
    text, steps = fa.rewrite(src)
    assert '"cuda"' not in text and "'cuda'" not in text
    assert 'device = "cpu"' in text and 'device="cpu"' in text and "device='cpu'" in text
    assert "torch.cuda.is_available()" in text  # only device strings change
    assert "@pytest.mark.skip()\n" not in text and '@pytest.mark.skip(reason="kept")' in text
    assert dict(steps) == {'device="cuda" -> "cpu"': 3, "bare @pytest.mark.skip() removed": 1}
    kept, _ = fa.rewrite(src, keep_skips=True, race_iters=3)
    assert "@pytest.mark.skip()\n" in kept and "range(3)" in kept and "range(250)" not in kept


def test_rewrite_widen_restores_upstream_grid():
    src = ('@pytest.mark.parametrize("dtype", ([torch.float16]))\n'
           '@pytest.mark.parametrize("local", [False])\n'
           '@pytest.mark.parametrize("softcap", [0.0])\n'
           '# @pytest.mark.parametrize("local", [False])\n')
    assert fa.rewrite(src)[0] == src  # off by default
    text, _ = fa.rewrite(src, widen=True)
    assert '("dtype", [torch.float16, torch.bfloat16])' in text
    assert '("local", [False, True])' in text and '("softcap", [0.0, 50.0])' in text
    assert text.endswith('# @pytest.mark.parametrize("local", [False])\n')  # comments untouched


def test_sample_is_deterministic_partitions_and_does_not_alias_with_the_grid():
    ids = [f"test_flash_attn.py::test_x[{d}-{local}-dtype{t}]" for d in range(400) for local in (False, True)
           for t in (0, 1)]
    shuffled = ids[7:] + ids[:7][::-1]
    picks = [fa.sample(shuffled, 40, k) for k in range(40)]
    assert picks[0] == fa.sample(ids, 40, 0) and picks[0] == sorted(picks[0])
    assert sorted(sum(picks, [])) == sorted(ids)  # the residues cover every case once
    assert 20 <= len(picks[0]) <= 60
    assert {n[-12:] for n in picks[0]} == {n[-12:] for n in ids}  # all four (local, dtype) pairs
    assert fa.sample(ids, 1) == sorted(ids)
    with pytest.raises(ValueError, match="offset"):
        fa.sample(ids, 4, 4)


def test_runner_builds_the_shim_runs_pytest_and_counts(tmp_path, capsys):
    # a toy stand-in for FA's file: the same imports, two of the eight function names
    fa_test = tmp_path / "fa.py"
    fa_test.write_text(
        "import torch\n"
        "from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache\n"
        "from flash_attn.bert_padding import pad_input, unpad_input\n"
        "from flash_attn.flash_attn_interface import _get_block_size_n\n"
        "from flash_attn.layers.rotary import apply_rotary_emb\n"
        "from flash_attn.flash_attn_triton_amd.utils import USE_TRITON_ROCM, is_rdna\n"
        "import pytest\n"
        "@pytest.mark.parametrize('n', [1, 2, 3])\n"
        "def test_flash_attn_causal(n):\n"
        "    assert torch.cuda.get_device_capability('cuda') == (8, 0) and not USE_TRITON_ROCM\n"
        "    q = torch.randn(1, n, 2, 8, device='cuda')\n"
        "    out, lse, p = flash_attn_func(q, q, q, causal=True, return_attn_probs=True)\n"
        "    assert out.device.type == 'cpu' and lse.shape == (1, 2, n) and p.shape == (1, 2, n, n)\n"
        "    assert _get_block_size_n(q.device, 8, False, True) > 0 and not is_rdna()\n"
        "@pytest.mark.skip()\n"
        "def test_flash_attn_bwd_overflow():\n"
        "    flash_attn_varlen_func()\n"
        "def test_flash_attn_splitkv():\n"
        "    assert False, 'not selected'\n"
    )
    log = tmp_path / "log.json"
    rc = fa.main([str(fa_test), "--backend", "reference", "--workdir", str(tmp_path / "work"),
                  "--functions", "test_flash_attn_causal,test_flash_attn_bwd_overflow,test_flash_attn_kvcache",
                  "--sample", "2", "--offset", "1", "--json", str(log)])
    out = capsys.readouterr().out
    assert 'rewrite: device="cuda" -> "cpu": 1' in out and "bare @pytest.mark.skip() removed: 1" in out
    assert rc == 1, out  # the varlen function, called without arguments, raised
    assert f"not in {fa_test}: test_flash_attn_kvcache" in out  # requested, absent: reported, not run
    rows = {r["function"]: r for r in fa.summarise(json.loads(log.read_text()))}
    assert set(rows) == {"test_flash_attn_causal", "test_flash_attn_bwd_overflow"}
    causal, overflow = rows["test_flash_attn_causal"], rows["test_flash_attn_bwd_overflow"]
    assert (causal["collected"], causal["run"], causal["passed"]) == (3, 1, 1)  # crc32 odd: [2] of [1], [2], [3]
    assert (overflow["run"], overflow["failed"], overflow["error"]) == (1, 0, 1)  # raised, not asserted
    assert "ERROR test_flash_attn.py::test_flash_attn_bwd_overflow: TypeError" in out
