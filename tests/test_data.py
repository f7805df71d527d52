"""Data loading for ``gptfast train``: every input kind, the split, batches and the baseline."""
import math
import pickle

import numpy as np
import pytest
import torch

from gptfast.data import (BUILTIN_CORPUS_BYTES, DataError, Tokenizer, builtin_corpus_files,
                          load_builtin_corpus, load_dataset)


def _all_tokens(view) -> np.ndarray:
    return view.window(0, len(view))


def test_text_file_is_bytes_with_last_tenth_as_validation(tmp_path):
    text = "".join(f"x = {i}  # é\n" for i in range(200))
    path = tmp_path / "corpus.py"
    path.write_text(text, encoding="utf-8")
    data = load_dataset(path)
    raw = np.frombuffer(text.encode(), dtype=np.uint8)
    assert data.vocab_size == 256 and data.tokenizer.kind == "bytes"
    assert len(data.val) == math.ceil(len(raw) * 0.1)
    np.testing.assert_array_equal(np.concatenate([_all_tokens(data.train), _all_tokens(data.val)]), raw)


def test_batches_are_shifted_windows_and_a_function_of_the_rng(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("abcdefghijklmnopqrstuvwxyz" * 20)
    data = load_dataset(path)
    x, y = data.get_batch("train", 5, 16, np.random.default_rng([7, 3]))
    assert x.shape == y.shape == (5, 16) and x.dtype == y.dtype == torch.int64
    assert (x[:, 1:] == y[:, :-1]).all()
    x2, _ = data.get_batch("train", 5, 16, np.random.default_rng([7, 3]))
    assert (x == x2).all()
    x3, _ = data.get_batch("train", 5, 16, np.random.default_rng([7, 4]))
    assert not (x == x3).all()


def test_directory_reads_text_files_recursively_in_order_and_skips_binary_and_hidden(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("first file\n" * 30)
    (tmp_path / "b" / "c.md").write_text("second file\n" * 30)
    (tmp_path / "b" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)  # not UTF-8
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    data = load_dataset(tmp_path)
    expected = ("first file\n" * 30 + "second file\n" * 30).encode()
    assert "2 text files" in data.description
    tokens = np.concatenate([_all_tokens(data.train), _all_tokens(data.val)])
    assert bytes(tokens.astype(np.uint8)) == expected
    # A window that straddles the boundary between the two files reads across it.
    boundary = len("first file\n" * 30)
    assert bytes(data.train.window(boundary - 5, 10).astype(np.uint8)) == b"file\nsecon"


def test_token_directory_with_char_meta(tmp_path):
    itos = {i: c for i, c in enumerate("\nabc ")}
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 5, "itos": itos, "stoi": {c: i for i, c in itos.items()}}, f)
    rng = np.random.default_rng(0)
    rng.integers(0, 5, 1000).astype(np.uint16).tofile(tmp_path / "train.bin")
    rng.integers(0, 5, 200).astype(np.uint16).tofile(tmp_path / "val.bin")
    data = load_dataset(tmp_path)
    assert (data.vocab_size, data.tokenizer.kind) == (5, "chars")
    assert (len(data.train), len(data.val)) == (1000, 200)
    assert data.tokenizer.decode(data.tokenizer.encode("ab c\n")) == "ab c\n"
    x, y = data.get_batch("val", 4, 8, np.random.default_rng(1))
    assert x.shape == (4, 8) and int(x.max()) < 5


def test_token_directory_without_meta_is_gpt2(tmp_path):
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(50, dtype=np.uint16).tofile(tmp_path / "val.bin")
    data = load_dataset(tmp_path)
    assert (data.vocab_size, data.tokenizer.kind) == (50304, "gpt2")
    np.testing.assert_array_equal(data.val.window(10, 5), [10, 11, 12, 13, 14])
    try:
        import tiktoken  # noqa: F401
    except ImportError:  # decoding still works, printing ids and the reason
        text = data.tokenizer.decode([1, 2, 3])
        assert "tiktoken" in text and "[1, 2, 3]" in text


def test_builtin_corpus_is_python_stdlib_source_and_capped():
    files = builtin_corpus_files()
    assert files and all(f.suffix == ".py" for f in files)
    assert not any(part in {"test", "tests", "site-packages"} for f in files for part in f.parts)
    data = load_builtin_corpus()
    assert BUILTIN_CORPUS_BYTES <= len(data.train) + len(data.val) <= BUILTIN_CORPUS_BYTES + max(
        f.stat().st_size for f in files)
    text = data.tokenizer.decode(data.val.window(0, 20_000).tolist())
    assert "def " in text and "import" in text
    # Byte-level Python: the unigram entropy sits well between 0 and log(256) = 5.55 nats.
    assert 2.5 < data.unigram_entropy() < 4.5


def test_unigram_entropy_is_exact_on_a_known_distribution(tmp_path):
    path = tmp_path / "ab.txt"
    path.write_text("ab" * 500 + "aabb" * 50)  # val = last 10% = 110 bytes of "aabb", 50/50
    assert load_dataset(path).unigram_entropy() == pytest.approx(math.log(2))


def test_byte_tokenizer_round_trips_and_replaces_broken_utf8():
    tok = Tokenizer("bytes")
    assert tok.decode(tok.encode("def café():\n")) == "def café():\n"
    assert tok.decode([0x63, 0xC3]) == "c\ufffd"  # cut inside a two-byte character
    assert Tokenizer.from_state_dict(tok.state_dict()) == tok


def _bad_path(tmp_path, kind):
    """A data path of the given bad kind, created under tmp_path."""
    if kind == "missing":
        return tmp_path / "missing.txt"
    if kind == "empty":
        (tmp_path / "empty.txt").write_text("")
        return tmp_path / "empty.txt"
    if kind == "binary":
        (tmp_path / "blob.dat").write_bytes(b"\0\1\2" * 100)
        return tmp_path / "blob.dat"
    if kind == "half_tokens":
        (tmp_path / "train.bin").write_bytes(b"\0\0" * 10)
        return tmp_path
    return tmp_path  # an empty directory


@pytest.mark.parametrize("kind, message", [
    ("missing", "missing.txt: no such file or directory"),
    ("empty", "the file is empty"),
    ("binary", "not a UTF-8 text file"),
    ("half_tokens", "only one of train.bin and val.bin"),
    ("empty_dir", "no text files found"),
])
def test_bad_data_paths_raise_a_clear_error(tmp_path, kind, message):
    with pytest.raises(DataError, match=message):
        load_dataset(_bad_path(tmp_path, kind))


def test_block_larger_than_the_split_is_a_clear_error(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 100)
    data = load_dataset(path)
    with pytest.raises(DataError, match="fewer than block_size"):
        data.get_batch("val", 2, 64, np.random.default_rng(0))
