"""Packed-document training: gptfast.data's document indices and masked boundary targets, the
GPT's ``doc_ids`` (nothing attends across a boundary; positions restart per document), and
``gptfast train`` packing by default with ``--no-pack`` to turn it off."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gptfast import GPT, GPTConfig
from gptfast.data import GPT2_EOT, Dataset, Tokenizer, TokenView, load_dataset
from gptfast.model import document_segments

TINY = GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32)


def test_document_segments():
    doc = torch.tensor([[0, 0, 1, 1, 1], [3, 3, 3, 3, 3], [0, 1, 2, 2, 0]])
    seg = document_segments(doc)
    assert seg.cu_seqlens.tolist() == [0, 2, 5, 10, 11, 12, 14, 15] and seg.cu_seqlens.dtype == torch.int32
    assert seg.max_seqlen == 5
    assert seg.positions.tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 1, 0]]
    with pytest.raises(ValueError, match="doc_ids must be"):
        document_segments(doc.float())


def test_perturbing_one_document_leaves_the_others_unchanged():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    idx = torch.randint(0, 64, (2, 24))
    doc = torch.tensor([[0] * 7 + [1] * 10 + [2] * 7, [0] * 24])
    base, _ = model(idx, doc_ids=doc)
    changed = idx.clone()
    changed[0, 7:17] = torch.randint(0, 64, (10,))  # document 1 of row 0
    after, _ = model(changed, doc_ids=doc)
    torch.testing.assert_close(after[0, :7], base[0, :7], rtol=0, atol=1e-6)    # before it
    torch.testing.assert_close(after[0, 17:], base[0, 17:], rtol=0, atol=1e-6)  # after it
    torch.testing.assert_close(after[1], base[1], rtol=0, atol=0)
    assert (after[0, 7:17] - base[0, 7:17]).abs().max() > 1e-3
    # a document sees what it would see alone, at positions from 0
    alone, _ = model(idx[:1, 17:])
    torch.testing.assert_close(base[0, 17:], alone[0], rtol=0, atol=1e-5)
    # without packing, the last document does see the earlier ones
    unpacked, _ = model(idx)
    assert (unpacked[0, 17:] - base[0, 17:]).abs().max() > 1e-3


def test_packed_gradients_match_separate_documents():
    torch.manual_seed(1)
    model = GPT(TINY)
    idx = torch.randint(0, 64, (1, 20))
    doc = torch.tensor([[0] * 12 + [1] * 8])
    targets = torch.randint(0, 64, (1, 20))
    targets[0, 11] = -1  # the boundary target, as gptfast.data masks it
    _, loss = model(idx, targets, doc_ids=doc)
    packed = torch.autograd.grad(loss, list(model.parameters()))
    _, l0 = model(idx[:, :12], targets[:, :12])
    _, l1 = model(idx[:, 12:], targets[:, 12:])
    separate = torch.autograd.grad((l0 * 11 + l1 * 8) / 19, list(model.parameters()))
    for a, b in zip(packed, separate):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _dataset(tokens, **docs):
    arr = np.asarray(tokens, dtype=np.int64)
    return Dataset(TokenView(arr), TokenView(arr), 64, Tokenizer("bytes"), "test", **docs)


def test_batches_carry_document_indices_and_mask_boundary_targets():
    data = _dataset(np.arange(40) % 60, doc_starts=np.array([0, 10, 13, 30]))
    rng = np.random.default_rng(0)
    x, y, doc = data.get_batch("train", 64, 8, rng, pack=True)
    x2, y2 = data.get_batch("train", 64, 8, np.random.default_rng(0))  # the same windows, unpacked
    assert torch.equal(x, x2)
    starts = x[:, 0].numpy()  # token value = position here
    for row in range(64):
        pos = starts[row] + np.arange(9)
        d = np.searchsorted([0, 10, 13, 30], pos, side="right")
        d -= d[0]
        assert doc[row].tolist() == d[:8].tolist()
        crosses = d[1:] != d[:-1]
        assert (y[row][torch.from_numpy(crosses)] == -1).all()
        assert torch.equal(y[row][torch.from_numpy(~crosses)], y2[row][torch.from_numpy(~crosses)])
    assert (y == -1).any() and doc.max() >= 1


def test_end_of_text_token_ends_a_document():
    tokens = [5, 6, GPT2_EOT, 7, 8, 9, GPT2_EOT, 1, 2, 3, 4, 5]
    arr = np.asarray(tokens, dtype=np.int64)
    data = Dataset(TokenView(arr), TokenView(arr), 50304, Tokenizer("gpt2"), "test", doc_end_token=GPT2_EOT)
    rng = np.random.default_rng(0)
    while True:
        x, y, doc = data.get_batch("train", 1, 10, rng, pack=True)
        if x[0, 0] == 5:
            break
    assert doc[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert y[0].tolist() == [6, GPT2_EOT, -1, 8, 9, GPT2_EOT, -1, 2, 3, 4]  # eot is predicted; the next doc is not


def test_what_has_documents(tmp_path):
    assert load_dataset().has_documents  # built-in corpus: one document per file
    (tmp_path / "a.txt").write_text("hello world " * 50)
    (tmp_path / "b.txt").write_text("other text " * 50)
    d = load_dataset(tmp_path)
    assert d.has_documents and d.doc_starts.tolist() == [0, 600]
    assert not load_dataset(tmp_path / "a.txt").has_documents  # a single text file: one document
    x, y = load_dataset(tmp_path / "a.txt").get_batch("train", 2, 8, np.random.default_rng(0), pack=True)
    assert x.shape == (2, 8)  # nothing to pack: two tensors, as before
