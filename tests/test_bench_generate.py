"""``gptfast bench generate``: every path runs, is timed and checked (tokens vs the no-cache run)."""
from __future__ import annotations

import json

import pytest
import torch

from gptfast.bench import BenchError
from gptfast.bench_generate import hf_gpt2_from, parse_generate_size
from gptfast.cli import main


def test_generate_rows_for_cache_no_cache_and_hf(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "res"
    main(["bench", "generate", "--device", "cpu", "--sizes", "tiny,2,16,4", "--backends", "reference,hf",
          "--repeats", "1", "--out", str(out)])
    text = capsys.readouterr().out
    assert "decode tok/s" in text and "x no-cache" in text
    rows = json.loads((out / "generate.json").read_text())["rows"]
    assert [r["path"] for r in rows] == ["reference+cache", "reference", "hf"]
    assert all(r["status"] == "ok" and r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in rows), rows
    by = {r["path"]: r for r in rows}
    assert by["reference+cache"]["match"] == "yes"  # the cache does not change greedy tokens
    assert by["hf"]["match"] == "yes"               # nor does another code base with the same weights
    assert by["reference"]["x_nocache"] == 1.0
    ratio = by["reference+cache"]["decode_tok_s"] / by["reference"]["decode_tok_s"]
    assert by["reference+cache"]["x_nocache"] == pytest.approx(ratio)
    assert (out / "generate.txt").read_text().startswith("gptfast bench generate:")


def test_hf_copy_has_the_same_logits():
    pytest.importorskip("transformers")
    from gptfast.model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny")).eval()
    idx = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(hf_gpt2_from(model)(idx).logits, model(idx)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", ["tiny,2", "nope,1,16", "tiny,1,16,1", "tiny,0,16"])
def test_bad_sizes_are_refused(spec):
    with pytest.raises(BenchError, match="--sizes"):
        parse_generate_size(spec)


def test_sample_decodes_through_the_kv_cache(tmp_path, monkeypatch, capsys):
    from gptfast.model import GPT
    main(["train", "--preset", "tiny", "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1",
          "--batch-size", "2", "--block-size", "32", "--out-dir", str(tmp_path), "--device", "cpu",
          "--sample-tokens", "0", "--quiet"])
    calls = []
    real = GPT.forward_cached
    monkeypatch.setattr(GPT, "forward_cached", lambda self, idx, *a: calls.append(idx.shape[1]) or real(self, idx, *a))
    main(["sample", "--ckpt", str(tmp_path), "--prompt", "ab", "--max-new-tokens", "5", "--num-samples", "1"])
    assert calls == [2, 1, 1, 1, 1], calls  # prefill of the 2 prompt bytes, then 1 token per step
