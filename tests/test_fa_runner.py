"""bench/fa_tests.py's own pieces, without FlashAttention's test file: the flash_attn shim
(pad/unpad, rotary), the source rewrite, the deterministic sampling and the generated package."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("fa_tests_runner", ROOT / "bench" / "fa_tests.py")
fa = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fa)


def test_unpad_pad_roundtrip_and_gradient():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 2, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.arange(7).expand(3, 7) < torch.tensor([[7], [2], [5]])
    rows, indices, cu, max_len, used = fa.unpad_input(x, mask)
    assert rows.shape == (14, 2, 5)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 7, 9, 14]
    assert max_len == 7 and used.tolist() == [7, 2, 5]
    assert torch.equal(rows[7], x[1, 0]) and torch.equal(rows[-1], x[2, 4])
    back = fa.pad_input(rows, indices, 3, 7)
    assert torch.equal(back, x * mask[..., None, None])  # padded positions are zero
    back.sum().backward()
    assert torch.equal(x.grad, mask[..., None, None].expand_as(x).double())


def test_unpad_unused_mask_counts_as_kept_but_not_used():
    x = torch.arange(8.0).view(2, 4, 1)
    mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    extra = torch.tensor([[False, False, True, False], [False, False, False, False]])
    rows, _, cu, max_len, used = fa.unpad_input(x, mask, extra)
    assert rows.flatten().tolist() == [0.0, 1.0, 2.0, 4.0]
    assert cu.tolist() == [0, 3, 4] and max_len == 3 and used.tolist() == [2, 1]


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


def test_sample_is_deterministic_and_partitions():
    ids = [f"test_flash_attn.py::test_x[{i}]" for i in range(23)]
    shuffled = ids[7:] + ids[:7][::-1]
    picks = [fa.sample(shuffled, 5, k) for k in range(5)]
    assert picks[0] == fa.sample(ids, 5, 0) == sorted(ids)[::5]
    assert sorted(sum(picks, [])) == sorted(ids)  # the residues cover every case once
    assert fa.sample(ids, 1) == sorted(ids)
    with pytest.raises(ValueError, match="offset"):
        fa.sample(ids, 4, 4)


def test_runner_builds_the_shim_runs_pytest_and_counts(tmp_path, capsys):
    # a toy stand-in for FA's file: the same imports, two of the eight function names
    fa_test = tmp_path / "fa.py"
    fa_test.write_text(
        "import torch\n"
        "from flash_attn import flash_attn_func, flash_attn_varlen_func\n"
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
                  "--functions", "test_flash_attn_causal,test_flash_attn_bwd_overflow",
                  "--sample", "2", "--json", str(log)])
    out = capsys.readouterr().out
    assert 'rewrite: device="cuda" -> "cpu": 1' in out and "bare @pytest.mark.skip() removed: 1" in out
    assert rc == 1, out  # the unmapped varlen function raised
    rows = {r["function"]: r for r in fa.summarise(json.loads(log.read_text()))}
    assert set(rows) == {"test_flash_attn_causal", "test_flash_attn_bwd_overflow"}
    causal, overflow = rows["test_flash_attn_causal"], rows["test_flash_attn_bwd_overflow"]
    assert (causal["collected"], causal["run"], causal["passed"]) == (3, 2, 2)  # every 2nd of 3
    assert (overflow["run"], overflow["failed"], overflow["error"]) == (1, 0, 1)  # raised, not asserted
    assert "ERROR test_flash_attn.py::test_flash_attn_bwd_overflow: NotImplementedError" in out
