"""Training data for ``gptfast train``: token sources, tokenizers and batch sampling.

Three input kinds, all exposed as a :class:`Dataset` of two 1-D token sequences (train, val):

- a text file, or a directory of text files (read recursively in sorted path order, hidden
  entries and binary files skipped): byte-level tokens (vocab 256), the last 10% is validation;
- a directory holding nanoGPT's ``train.bin``/``val.bin`` (uint16 tokens; the vocab comes from
  ``meta.pkl`` when present — its ``itos`` gives a char-level decoder — else GPT-2's, padded
  to 50304, decoded with ``tiktoken`` if it is installed);
- nothing: a built-in corpus that needs no download, the Python standard library's own source.

Documents: the built-in corpus and a directory of text files hold one document per file; nanoGPT's
``.bin`` tokens with GPT-2's tokenizer separate documents by the end-of-text token 50256 (it ends a
document: the next token starts a new one, as nanoGPT's prepare.py writes them); a single text
file is one document. With ``pack=True`` batches carry each token's document index within its
window, and a target in another document than its input is -1 (ignored): the model then attends
within documents only (gptfast.model.GPT's ``doc_ids``).

Nothing larger than the built-in corpus is read into memory: single files are ``np.memmap``-ed
and a directory of files is read on demand, a window at a time. Batches are a pure function of
``(seed, step)`` so that a resumed run draws exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import bisect
import codecs
import math
import os
import pickle
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

VAL_FRACTION = 0.1
GPT2_VOCAB = 50304  # GPT-2's 50257 padded to a multiple of 64, as nanoGPT does
GPT2_EOT = 50256

# The built-in corpus stops after this many bytes: 4 MB (232 stdlib files) loads in ~2 s including
# the imports, and its 3.6 MB training split is ~2.2x the 1.6M bytes the tiny preset trains on,
# so the default run sees each byte about half a time (measured val 1.85 vs train 1.70 nats).
BUILTIN_CORPUS_BYTES = 4_000_000
# Skipped: test suites (repetitive boilerplate), site-packages (not the standard library, and
# different on every machine), and generated data dressed as code (codec tables in encodings/,
# the 750 KB help-text string in pydoc_data/), which is not the Python a sample should imitate.
_BUILTIN_SKIP_DIRS = {
    "site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
    "encodings", "pydoc_data",
}

# How much of each file is inspected to decide whether it is text.
_SNIFF_BYTES = 8192
# The unigram baseline is estimated from at most this many validation tokens (one linear pass).
_UNIGRAM_MAX_TOKENS = 1 << 24


class UserError(ValueError):
    """A problem with what the user gave gptfast -- options, data, a checkpoint, the out-dir, the
    disk -- as opposed to a bug in gptfast. The message names the problem and the way out; the
    CLI prints it as one line ``gptfast <cmd>: error: <message>`` and exits with ``exit_status``,
    never with a traceback (tracebacks are kept for bugs). The base of every gptfast user error:
    it lives here because data.py is the lowest module the commands share.
    """

    exit_status = 2


class DataError(UserError):
    """The data given to ``gptfast train`` cannot be used; the message says why."""


# --------------------------------------------------------------------------------- tokenizers


@dataclass(frozen=True)
class Tokenizer:
    """Turns text into token ids and back.

    ``kind`` is ``"bytes"`` (UTF-8 bytes, vocab 256), ``"chars"`` (nanoGPT ``meta.pkl``
    ``stoi``/``itos`` tables) or ``"gpt2"`` (``tiktoken``'s GPT-2 BPE, imported on first use).
    It is stored in checkpoints via :meth:`state_dict` so that ``gptfast sample`` decodes with
    the tokenizer the model was trained with.
    """

    kind: str
    itos: tuple = ()  # only for "chars": itos[i] is token i's string

    def encode(self, text: str) -> list[int]:
        if self.kind == "bytes":
            try:
                return list(text.encode("utf-8"))
            except UnicodeEncodeError as e:
                # Lone surrogates: what Python makes of undecodable bytes in argv or a file name.
                bad = sorted(set(text[e.start:e.end]))
                raise DataError(f"characters {bad!r} cannot be encoded as UTF-8 (position {e.start}); "
                                f"the model reads UTF-8 bytes") from None
        if self.kind == "chars":
            stoi = {s: i for i, s in enumerate(self.itos)}
            missing = sorted({c for c in text if c not in stoi})
            if missing:
                raise DataError(f"characters {missing!r} are not in this model's vocabulary")
            return [stoi[c] for c in text]
        return self._tiktoken().encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids: Sequence[int]) -> str:
        if self.kind == "bytes":
            # A sample can stop (or the model can emit bytes) mid-way through a multi-byte
            # character; show a replacement character rather than fail.
            return bytes(ids).decode("utf-8", errors="replace")
        if self.kind == "chars":
            return "".join(self.itos[i] if i < len(self.itos) else "\ufffd" for i in ids)
        try:
            enc = self._tiktoken()
        except DataError as e:
            return f"{e}; token ids: {list(ids)}"
        # Ids in the padding range 50257..50303 are not GPT-2 tokens; drop them.
        return enc.decode([i for i in ids if i < enc.n_vocab])

    def start_tokens(self) -> list[int]:
        """A neutral prompt for unconditional samples: end-of-text for GPT-2, else a newline."""
        if self.kind == "gpt2":
            return [GPT2_EOT]
        if self.kind == "chars" and "\n" not in self.itos:
            return [0]
        return self.encode("\n")

    def state_dict(self) -> dict:
        return {"kind": self.kind, "itos": list(self.itos)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Tokenizer":
        return cls(kind=state["kind"], itos=tuple(state.get("itos", ())))

    @staticmethod
    def _tiktoken():
        try:
            import tiktoken
        except ImportError:
            raise DataError(
                "decoding GPT-2 tokens needs the optional package tiktoken (pip install tiktoken)"
            ) from None
        return tiktoken.get_encoding("gpt2")


# ----------------------------------------------------------------------------- token sources


class FileConcat:
    """Several files seen as one read-only uint8 sequence, read on demand.

    A memmap per file would keep one file descriptor per file open (a large corpus directory
    exceeds the default limit of 1024), so windows are read with ``np.fromfile`` instead.
    Slicing with a step-less slice returns the bytes as an ``np.ndarray``.
    """

    def __init__(self, paths: Sequence[Path], sizes: Sequence[int]):
        self.paths = list(paths)
        self.starts = [0]
        for size in sizes:
            self.starts.append(self.starts[-1] + size)

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise IndexError("FileConcat supports contiguous slices only")
        pieces = []
        while start < stop:
            i = bisect.bisect_right(self.starts, start) - 1
            n = min(stop, self.starts[i + 1]) - start
            offset = start - self.starts[i]
            pieces.append(np.fromfile(self.paths[i], dtype=np.uint8, count=n, offset=offset))
            start += n
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=np.uint8)


class TokenView:
    """The half-open range ``[start, stop)`` of a token source (array, memmap or FileConcat).

    Splitting a FileConcat must stay lazy, so train/val are views rather than copies.
    """

    def __init__(self, source: Union[np.ndarray, FileConcat], start: int = 0, stop: int | None = None):
        self.source = source
        self.start = start
        self.stop = len(source) if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def window(self, i: int, n: int) -> np.ndarray:
        """Tokens ``i .. i+n-1`` of this view as an int64 array."""
        return np.asarray(self.source[self.start + i : self.start + i + n], dtype=np.int64)


# -------------------------------------------------------------------------------- the dataset


@dataclass
class Dataset:
    """Train and validation token sequences plus the tokenizer that produced them."""

    train: TokenView
    val: TokenView
    vocab_size: int
    tokenizer: Tokenizer
    description: str
    # Document boundaries: sorted offsets into the token source where a document starts (one per
    # file), or the token id that ends a document; neither: one document (nothing to pack).
    doc_starts: np.ndarray | None = None
    doc_end_token: int | None = None

    @property
    def has_documents(self) -> bool:
        return self.doc_starts is not None or self.doc_end_token is not None

    def get_batch(
        self, split: str, batch_size: int, block_size: int, rng: np.random.Generator, pack: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """Random windows of ``block_size + 1`` tokens: inputs x and next-token targets y.

        Returns two (batch_size, block_size) int64 CPU tensors, and with ``pack`` (on data with
        documents) a third, ``doc``: each input token's document index within its window (0, 1, ...
        from the left), with the targets that cross into another document set to -1. All
        randomness comes from ``rng``, so the caller decides what the batch is a function of.
        """
        data = self.train if split == "train" else self.val
        self.check_block_size(block_size, (split,))
        starts = rng.integers(0, len(data) - block_size, size=batch_size)
        windows = np.stack([data.window(int(s), block_size + 1) for s in starts])
        if windows.max() >= self.vocab_size:
            raise DataError(
                f"token id {int(windows.max())} in the {split} data is outside the vocabulary "
                f"of size {self.vocab_size} (set vocab_size in meta.pkl)"
            )
        batch = torch.from_numpy(windows)
        x, y = batch[:, :-1], batch[:, 1:]
        if not (pack and self.has_documents):
            return x, y
        doc = torch.from_numpy(self._window_documents(data, starts, windows))  # (B, T + 1)
        y = y.masked_fill(doc[:, 1:] != doc[:, :-1], -1)  # the next document's first token: ignored
        return x, y, doc[:, :-1].contiguous()

    def _window_documents(self, data: "TokenView", starts: np.ndarray, windows: np.ndarray) -> np.ndarray:
        """(B, n) document index of every token of each window, counted from 0 at its start."""
        n = windows.shape[1]
        if self.doc_end_token is not None:  # a new document after each end-of-text token
            ends = windows == self.doc_end_token
            return np.concatenate([np.zeros((len(windows), 1), np.int64),
                                   np.cumsum(ends[:, :-1], axis=1, dtype=np.int64)], axis=1)
        pos = data.start + starts[:, None] + np.arange(n)[None, :]  # absolute positions in the source
        docs = np.searchsorted(self.doc_starts, pos, side="right")
        return docs - docs[:, :1]

    def check_block_size(self, block_size: int, splits: Sequence[str] = ("train", "val")) -> None:
        """Raise DataError unless each split holds a window of ``block_size + 1`` tokens.

        ``gptfast train`` calls this before the first step: the validation split is first read
        at the first evaluation, hundreds of steps in, too late to learn that it is too short.
        """
        for split in splits:
            n = len(self.train if split == "train" else self.val)
            if n <= block_size:
                raise DataError(
                    f"the {split} split has {n} tokens, fewer than block_size + 1 = "
                    f"{block_size + 1}; use more data or a smaller --block-size"
                )

    def unigram_entropy(self) -> float:
        """Entropy in nats of the validation split's token distribution.

        That is the loss of the best model that ignores context; a trained model must beat it.
        Estimated from the first 16M tokens when the split is larger.
        """
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        total = min(len(self.val), _UNIGRAM_MAX_TOKENS)
        chunk = 1 << 20
        for i in range(0, total, chunk):
            tokens = self.val.window(i, min(chunk, total - i))
            chunk_counts = np.bincount(tokens, minlength=self.vocab_size)
            if len(chunk_counts) > self.vocab_size:
                # Found here, before training, rather than by a batch at the first evaluation.
                raise DataError(
                    f"token id {len(chunk_counts) - 1} in the val data is outside the vocabulary "
                    f"of size {self.vocab_size} (set vocab_size in meta.pkl)"
                )
            counts += chunk_counts
        p = counts[counts > 0] / max(total, 1)
        return float(-(p * np.log(p)).sum())


def _split(source, description: str, vocab_size: int, tokenizer: Tokenizer,
           doc_starts: Sequence[int] | None = None) -> Dataset:
    n = len(source)
    n_val = math.ceil(n * VAL_FRACTION)
    return Dataset(
        train=TokenView(source, 0, n - n_val),
        val=TokenView(source, n - n_val, n),
        vocab_size=vocab_size,
        tokenizer=tokenizer,
        description=description,
        doc_starts=None if doc_starts is None else np.asarray(doc_starts, dtype=np.int64),
    )


def is_text_file(path: Path) -> bool:
    """True if the file's first 8 KiB are NUL-free UTF-8 (a character cut at the end is fine)."""
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if b"\0" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _text_files(root: Path) -> list[Path]:
    """Text files under ``root``, recursively, in sorted path order; hidden entries skipped."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Hidden directories (.git, .venv) hold tool state, not corpus text.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath) / name
            if not name.startswith(".") and path.is_file() and is_text_file(path):
                files.append(path)
    return sorted(files)


def load_text_file(path: Path) -> Dataset:
    if path.stat().st_size == 0:
        raise DataError(f"--data {path}: the file is empty")
    if not is_text_file(path):
        raise DataError(f"--data {path}: not a UTF-8 text file (for token files pass their directory)")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return _split(data, f"text file {path} ({len(data):,} bytes)", 256, Tokenizer("bytes"))


def load_text_dir(path: Path) -> Dataset:
    files = _text_files(path)
    sizes = [f.stat().st_size for f in files]
    if sum(sizes) == 0:
        raise DataError(
            f"--data {path}: no text files found (expected text files, or train.bin and val.bin)"
        )
    source = FileConcat(files, sizes)
    description = f"{len(files)} text files under {path} ({len(source):,} bytes)"
    return _split(source, description, 256, Tokenizer("bytes"), doc_starts=source.starts[:-1])


def load_token_dir(path: Path) -> Dataset:
    """nanoGPT's prepared data: ``train.bin``/``val.bin`` uint16 tokens, optional ``meta.pkl``."""
    vocab_size, tokenizer = GPT2_VOCAB, Tokenizer("gpt2")
    meta_path = path / "meta.pkl"
    if meta_path.exists():
        vocab_size, tokenizer = _read_meta(meta_path)
    splits = {}
    for split in ("train", "val"):
        file = path / f"{split}.bin"
        if file.stat().st_size < 4 or file.stat().st_size % 2:
            raise DataError(f"--data {file}: expected uint16 tokens, got {file.stat().st_size} bytes")
        splits[split] = TokenView(np.memmap(file, dtype=np.uint16, mode="r"))
    n_train, n_val = len(splits["train"]), len(splits["val"])
    description = f"token files in {path} ({n_train:,} train / {n_val:,} val tokens, vocab {vocab_size})"
    end = GPT2_EOT if tokenizer.kind == "gpt2" and vocab_size > GPT2_EOT else None
    return Dataset(splits["train"], splits["val"], vocab_size, tokenizer, description, doc_end_token=end)


def _read_meta(path: Path) -> tuple[int, Tokenizer]:
    """(vocab size, tokenizer) from a nanoGPT ``meta.pkl``: ``vocab_size`` and optionally ``itos``."""
    # meta.pkl is a pickle written by nanoGPT's prepare.py; only load data you trust.
    try:
        with open(path, "rb") as f:
            meta = pickle.load(f)
    except OSError as e:
        raise DataError(f"--data {path}: cannot read it ({e.strerror})") from None
    except Exception as e:
        # Unpickling damaged or foreign bytes raises almost any type (UnpicklingError, EOFError,
        # ValueError, ImportError, AttributeError, ...); each means the same: not a meta.pkl.
        raise DataError(f"--data {path}: not a readable meta.pkl ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:120]}); fix or delete it") from None
    if not isinstance(meta, dict):
        raise DataError(f"--data {path}: expected a dict with vocab_size (and itos), "
                        f"got {type(meta).__name__}")
    try:
        vocab_size = int(meta.get("vocab_size", GPT2_VOCAB))
    except (TypeError, ValueError):
        raise DataError(f"--data {path}: vocab_size {meta['vocab_size']!r} is not an integer") from None
    if vocab_size < 1:
        raise DataError(f"--data {path}: vocab_size must be >= 1, got {vocab_size}")
    if "itos" not in meta:
        return vocab_size, Tokenizer("gpt2")
    try:
        itos = tuple(meta["itos"][i] for i in range(len(meta["itos"])))
    except (TypeError, KeyError, IndexError):
        raise DataError(f"--data {path}: itos must map every id 0..n-1 to its string") from None
    if not all(isinstance(s, str) for s in itos):
        raise DataError(f"--data {path}: itos must map ids to strings")
    return vocab_size, Tokenizer("chars", itos)


def builtin_corpus_files(max_bytes: int = BUILTIN_CORPUS_BYTES) -> list[Path]:
    """The standard library's ``*.py`` files in sorted order, up to ``max_bytes`` in total."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _BUILTIN_SKIP_DIRS]
        paths += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    files, total = [], 0
    for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):
        if total >= max_bytes:
            break
        files.append(path)
        total += path.stat().st_size
    return files


def load_builtin_corpus(max_bytes: int = BUILTIN_CORPUS_BYTES) -> Dataset:
    files = builtin_corpus_files(max_bytes)
    if not files:
        raise DataError("the built-in corpus (the Python standard library's source) was not found; "
                        "pass --data")
    texts = [f.read_bytes() for f in files]
    data = np.frombuffer(b"".join(texts), dtype=np.uint8)
    description = f"built-in corpus: {len(files)} Python stdlib files ({len(data):,} bytes)"
    doc_starts = np.cumsum([0] + [len(t) for t in texts[:-1]])
    return _split(data, description, 256, Tokenizer("bytes"), doc_starts=doc_starts)


def load_dataset(path: str | os.PathLike | None = None) -> Dataset:
    """Load ``--data PATH`` (see the module docstring); ``None`` gives the built-in corpus."""
    if path is None:
        return load_builtin_corpus()
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"--data {path}: no such file or directory")
    try:
        if path.is_file():
            return load_text_file(path)
        if not path.is_dir():
            raise DataError(f"--data {path}: not a regular file or directory")
        has_bins = [(path / f"{s}.bin").exists() for s in ("train", "val")]
        if all(has_bins):
            return load_token_dir(path)
        if any(has_bins):
            raise DataError(f"--data {path}: has only one of train.bin and val.bin; need both")
        return load_text_dir(path)
    except OSError as e:  # unreadable files (permissions, I/O errors): the user's data, not a bug
        raise DataError(f"--data {path}: cannot read {e.filename or path} ({e.strerror or e})") from None
