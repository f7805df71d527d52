"""Faults the CLI must answer with one line and an exit status, never a traceback (issue 11,
items 7-9): problems found before the first step (data, out-dir, free space), nonsensical options,
a diverging run, damaged checkpoints and data, unknown backends and devices, a full disk, Ctrl-C.

In-process ``gptfast.cli.main`` wherever possible (the tiny model, a 32-token context, the
reference backend, one thread: each run is well under a second); subprocesses only for a real
SIGINT.
"""
import errno
import os
import pickle
import queue
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import zipfile
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

import gptfast.cli
import gptfast.data
import gptfast.train
from gptfast.cli import main
from gptfast.data import Dataset
from gptfast.train import (_save_atomically, checkpoint_digest, estimated_checkpoint_bytes,
                           load_checkpoint, model_from_checkpoint)

CORPUS = str(Path(gptfast.data.__file__))
# Two steps of the tiny model; later options of the same name override these (argparse keeps the last).
TRAIN = ["train", "--data", CORPUS, "--device", "cpu", "--backend", "reference", "--block-size", "32",
         "--batch-size", "4", "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1",
         "--sample-tokens", "0", "--quiet"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The 2-core machine is shared: with 2 threads a busy neighbour makes each step ~30x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, _one_thread) -> Path:
    """An out-dir with a good 2-step checkpoint. Tests that change it work on a copy."""
    out = tmp_path_factory.mktemp("trained")
    main(TRAIN + ["--out-dir", str(out)])
    return out


@pytest.fixture
def ckpt_copy(trained, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    return out


@pytest.fixture
def train_batches(monkeypatch) -> list:
    """The training batches drawn: empty means the run stopped before its first step."""
    drawn = []
    real = Dataset.get_batch

    def spy(self, split, *args, **kwargs):
        if split == "train":
            drawn.append(split)
        return real(self, split, *args, **kwargs)

    monkeypatch.setattr(Dataset, "get_batch", spy)
    return drawn


def _main_expecting_exit(argv):
    try:
        main(argv)
    except KeyboardInterrupt:  # would end the pytest session: report it as this test's failure
        pytest.fail("KeyboardInterrupt escaped gptfast.cli.main")


def fails(argv: list[str], capsys, status: int = 2) -> str:
    """Run the CLI, expect exit ``status`` and exactly one line on stderr; return that line."""
    with pytest.raises(SystemExit) as exc:
        _main_expecting_exit(argv)
    err = capsys.readouterr().err
    assert exc.value.code == status, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------ item 7: found before the first step


def test_a_too_short_validation_split_is_reported_before_the_first_step(tmp_path, capsys, train_batches):
    data = tmp_path / "short.txt"
    data.write_text("x = 1\n" * 50)  # 300 bytes: train 270, val 30 < block_size + 1
    line = fails(TRAIN + ["--data", str(data), "--out-dir", str(tmp_path / "out")], capsys)
    assert line == ("gptfast train: error: the val split has 30 tokens, fewer than block_size + 1 = 33; "
                    "use more data or a smaller --block-size")
    assert train_batches == [] and not (tmp_path / "out" / "ckpt.pt").exists()


@pytest.mark.parametrize("where, resume, message", [
    ("file", False, "--out-dir {file} is a file, not a directory"),
    ("file", True, "--out-dir {file} is a file, not a directory"),
    ("under", False, "--out-dir {file}/sub: cannot create the directory (Not a directory)"),
])
def test_an_out_dir_that_is_or_is_under_a_file(tmp_path, capsys, train_batches, where, resume, message):
    file = tmp_path / "notes.txt"
    file.write_text("not a directory\n")
    out = file if where == "file" else file / "sub"
    line = fails(TRAIN + ["--out-dir", str(out)] + (["--resume"] if resume else []), capsys)
    assert line == "gptfast train: error: " + message.format(file=file)
    assert train_batches == [] and file.read_text() == "not a directory\n"


def test_an_unwritable_out_dir_is_reported_before_the_first_step(tmp_path, capsys, train_batches, monkeypatch):
    # Tests run as root, where chmod cannot make a directory read-only: refuse the probe file.
    real_open = open

    def read_only_open(file, mode="r", *args, **kwargs):
        if Path(file).name.startswith(".gptfast-write-test") and "w" in mode:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(gptfast.train, "open", read_only_open, raising=False)
    out = tmp_path / "out"
    line = fails(TRAIN + ["--out-dir", str(out)], capsys)
    assert line == f"gptfast train: error: --out-dir {out} is not writable (Permission denied)"
    assert train_batches == [] and list(out.iterdir()) == []  # the probe did not stay behind


def test_too_little_free_space_is_reported_before_the_first_step(tmp_path, capsys, train_batches, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "out"
    line = fails(TRAIN + ["--out-dir", str(out)], capsys)
    assert line.startswith(f"gptfast train: error: --out-dir {out}: 1.0 KB free, but a checkpoint needs about ")
    assert line.endswith(" MB; free some space or choose another --out-dir")
    assert train_batches == []


def test_the_free_space_estimate_covers_a_real_checkpoint(trained):
    model, _ = model_from_checkpoint(load_checkpoint(trained))
    size = (trained / "ckpt.pt").stat().st_size
    assert size <= estimated_checkpoint_bytes(model) <= 1.25 * size


def test_a_stale_temp_file_is_removed_before_the_first_step(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / "ckpt.pt.tmp"
    stale.write_bytes(b"\0" * 100_000)  # what a save killed half-way leaves
    seen = []
    real = Dataset.get_batch

    def spy(self, split, *args, **kwargs):
        seen.append(stale.exists())
        return real(self, split, *args, **kwargs)

    monkeypatch.setattr(Dataset, "get_batch", spy)
    main(TRAIN + ["--out-dir", str(out)])
    assert seen and not any(seen) and load_checkpoint(out)["iter"] == 2


# ------------------------------------------------------- item 8: options, a diverging run


@pytest.mark.parametrize("option, message", [
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0, got -0.1"),
    (["--grad-clip", "-1"], "--grad-clip must be a finite number >= 0 (0 disables clipping), got -1.0"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite number >= 0 (0 disables clipping), got nan"),
    (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
    (["--dropout", "-0.5"], "--dropout must be in [0, 1), got -0.5"),
    (["--beta1", "1"], "--beta1 must be in [0, 1), got 1.0"),
    (["--beta2", "1.5"], "--beta2 must be in [0, 1), got 1.5"),
    (["--beta2", "nan"], "--beta2 must be in [0, 1), got nan"),
    (["--seed", "-1"], "--seed must be in 0 .. 2**63 - 1, got -1"),
    (["--seed", str(2**63)], f"--seed must be in 0 .. 2**63 - 1, got {2**63}"),
    (["--lr-decay-iters", "-1"], "--lr-decay-iters must be >= 0, got -1"),
    (["--max-iters", "-1"], "--max-iters must be >= 0, got -1"),
    (["--eval-iters", "0"], "--eval-iters must be >= 1, got 0"),
    (["--grad-accum", "0"], "--grad-accum must be >= 1, got 0"),
    (["--device", "meta"], "--device meta: gptfast runs on cpu or cuda devices, not meta"),
])
def test_nonsensical_train_options_are_rejected_up_front(tmp_path, capsys, option, message):
    out = tmp_path / "out"
    assert fails(TRAIN + ["--out-dir", str(out)] + option, capsys) == f"gptfast train: error: {message}"
    assert not out.exists()  # nothing was started


@pytest.mark.parametrize("option, message", [
    (["--num-samples", "0"], "--num-samples must be >= 1, got 0"),
    (["--top-k", "0"], "--top-k must be >= 1, got 0"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0 (0: greedy), got nan"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0 (0: greedy), got -1.0"),
    (["--seed", "-1"], "--seed must be in 0 .. 2**63 - 1, got -1"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0, got -1"),
    (["--device", "meta"], "--device meta: gptfast runs on cpu or cuda devices, not meta"),
])
def test_nonsensical_sample_options_are_rejected(trained, capsys, option, message):
    line = fails(["sample", "--ckpt", str(trained), "--max-new-tokens", "2"] + option, capsys)
    assert line == f"gptfast sample: error: {message}"


@pytest.mark.parametrize("eval_interval, step, what", [
    ("10", 4, "training loss"),    # step 3 blows the weights up; step 4's loss is NaN
    ("1", 3, "validation loss"),   # step 3's evaluation sees it first, before its save
])
def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(ckpt_copy, capsys, eval_interval, step, what):
    before = (ckpt_copy / "ckpt.pt").read_bytes()
    line = fails(["train", "--resume", "--out-dir", str(ckpt_copy), "--max-iters", "6", "--lr", "1e30",
                  "--eval-interval", eval_interval], capsys, status=1)
    prefix = f"gptfast train: error: step {step}: the {what} is "
    assert line.startswith(prefix) and line[len(prefix):].split(";")[0] in ("nan", "inf", "-inf"), line
    assert line.endswith(f"; stopped without saving, the last checkpoint ({ckpt_copy}/ckpt.pt, step 2) "
                         "is kept; try a lower --lr (now 1e+30) or more --warmup-iters")
    assert (ckpt_copy / "ckpt.pt").read_bytes() == before


# ----------------------------------------------------- item 9: damaged checkpoints and data


def _flip_a_tensor_byte(file: Path) -> None:
    """Flip one byte in the middle of the largest tensor's storage, leaving the zip readable."""
    with zipfile.ZipFile(file) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(file.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x01
    file.write_bytes(bytes(raw))


def _damage(out: Path, kind: str) -> None:
    file = out / "ckpt.pt"
    good = file.read_bytes()
    if kind == "empty":
        file.write_bytes(b"")
    elif kind == "truncated":
        file.write_bytes(good[: len(good) // 2])
    elif kind == "random":
        file.write_bytes(random.Random(0).randbytes(4096))
    elif kind == "foreign dict":
        torch.save({"weights": torch.zeros(3)}, file)
    elif kind == "foreign tensor":
        torch.save(torch.zeros(3), file)
    elif kind == "foreign object":  # a pickled class: weights_only refuses it
        torch.save(Namespace(model=torch.zeros(3)), file)
    elif kind == "incomplete":
        ckpt = torch.load(file, weights_only=True)
        del ckpt["model"]
        torch.save(ckpt, file)
    elif kind == "directory":
        file.unlink()
        file.mkdir()
    elif kind == "flipped byte":
        _flip_a_tensor_byte(file)
        torch.load(file, weights_only=True)  # the damage that torch.load does not notice


DAMAGE = {
    "empty": "{file} is empty, not a checkpoint",
    "truncated": "{file} is not a readable checkpoint: damaged, truncated, or not written by torch.save",
    "random": "{file} is not a readable checkpoint: damaged, truncated, or not written by torch.save",
    "foreign dict": "{file} is not a gptfast train checkpoint",
    "foreign tensor": "{file} is not a gptfast train checkpoint",
    "foreign object": "{file} is not a readable checkpoint: damaged, truncated, or not written by torch.save",
    "incomplete": "{file} is an incomplete gptfast train checkpoint (no model)",
    "directory": "{file} is a directory, not a checkpoint file",
    "flipped byte": "{file} is damaged: its contents do not match the checksum written with it; "
                    "restore a copy or train again",
}


@pytest.mark.parametrize("command", ["sample", "train --resume"])
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_checkpoint_is_one_line_and_left_alone(ckpt_copy, capsys, command, kind):
    _damage(ckpt_copy, kind)
    file = ckpt_copy / "ckpt.pt"
    before = None if kind == "directory" else file.read_bytes()
    if command == "sample":
        argv = ["sample", "--ckpt", str(ckpt_copy), "--max-new-tokens", "2"]
    else:
        argv = ["train", "--resume", "--out-dir", str(ckpt_copy), "--max-iters", "4"]
    line = fails(argv, capsys)
    assert line.startswith(f"gptfast {command.split()[0]}: error: " + DAMAGE[kind].format(file=file)), line
    assert file.is_dir() if kind == "directory" else file.read_bytes() == before


def test_checkpoints_carry_a_checksum_and_old_ones_without_it_still_load(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GPTFAST_BACKEND", "reference")  # sample on the kernels the model trained on
    ckpt = torch.load(trained / "ckpt.pt", weights_only=True)
    assert ckpt["checksum"].startswith("sha256:") and ckpt["checksum"] == checkpoint_digest(ckpt)
    del ckpt["checksum"]  # as written before checksums existed
    old = tmp_path / "old"
    old.mkdir()
    torch.save(ckpt, old / "ckpt.pt")
    assert load_checkpoint(old)["iter"] == 2
    main(["sample", "--ckpt", str(old), "--prompt", "def ", "--max-new-tokens", "4"])
    assert capsys.readouterr().out.startswith("def ")


def _token_dir(path: Path, meta: bytes) -> Path:
    path.mkdir()
    (np.arange(2000) % 5).astype(np.uint16).tofile(path / "train.bin")
    (np.arange(500) % 5).astype(np.uint16).tofile(path / "val.bin")
    (path / "meta.pkl").write_bytes(meta)
    return path


@pytest.mark.parametrize("meta, message", [
    (b"\x80\x04garbage", "not a readable meta.pkl (UnpicklingError: "),
    (b"", "not a readable meta.pkl (EOFError: Ran out of input); fix or delete it"),
    (pickle.dumps([1, 2]), "expected a dict with vocab_size (and itos), got list"),
    (pickle.dumps({"vocab_size": "many"}), "vocab_size 'many' is not an integer"),
    (pickle.dumps({"vocab_size": 5, "itos": {1: "a"}}), "itos must map every id 0..n-1 to its string"),
])
def test_a_corrupt_meta_pkl_is_one_line(tmp_path, capsys, train_batches, meta, message):
    data = _token_dir(tmp_path / "data", meta)
    line = fails(TRAIN + ["--data", str(data), "--out-dir", str(tmp_path / "out")], capsys)
    assert line.startswith(f"gptfast train: error: --data {data / 'meta.pkl'}: {message}"), line
    assert train_batches == []


@pytest.mark.parametrize("command", ["train", "sample"])
def test_an_unknown_GPTFAST_BACKEND_is_one_line(trained, tmp_path, capsys, monkeypatch, command):
    monkeypatch.setenv("GPTFAST_BACKEND", "bogus")
    if command == "train":  # no --backend: the environment decides
        argv = [a for a in TRAIN if a not in ("--backend", "reference")] + ["--out-dir", str(tmp_path)]
    else:
        argv = ["sample", "--ckpt", str(trained), "--max-new-tokens", "2"]
    line = fails(argv, capsys)
    assert line.startswith(f"gptfast {command}: error: GPTFAST_BACKEND: unknown gptfast backend 'bogus'; "
                           "choose one of ('auto', 'reference'")


def test_the_backend_option_takes_the_spellings_the_api_takes(tmp_path, capsys):
    main(TRAIN + ["--backend", " Reference ", "--out-dir", str(tmp_path)])
    assert load_checkpoint(tmp_path)["train_config"]["backend"] == "reference"
    line = fails(TRAIN + ["--backend", "bogus", "--out-dir", str(tmp_path)], capsys)
    assert line == ("gptfast train: error: --backend 'bogus': unknown; choose from "
                    "auto, reference, triton, cuda, cpu")


def test_a_prompt_the_tokenizer_cannot_encode_is_one_line(trained, capsys):
    # "\udcff" is what Python makes of the byte 0xff in a command line that is not UTF-8.
    line = fails(["sample", "--ckpt", str(trained), "--prompt", "def \udcff", "--max-new-tokens", "2"], capsys)
    assert line == ("gptfast sample: error: --prompt: characters ['\\udcff'] cannot be encoded as UTF-8 "
                    "(position 4); the model reads UTF-8 bytes")


# ------------------------------------------------------------------- item 9: the disk


def _disk_full_save(obj, f, *args, **kwargs):
    f.write(b"partial checkpoint")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_on_save_is_one_line_and_keeps_the_previous_checkpoint(ckpt_copy, capsys, monkeypatch):
    before = (ckpt_copy / "ckpt.pt").read_bytes()
    monkeypatch.setattr(torch, "save", _disk_full_save)
    line = fails(["train", "--resume", "--out-dir", str(ckpt_copy), "--max-iters", "4"], capsys)
    assert line == (f"gptfast train: error: no space left on device: {ckpt_copy}/ckpt.pt; "
                    "the checkpoint was not written (a previous one is unchanged)")
    assert (ckpt_copy / "ckpt.pt").read_bytes() == before
    assert not (ckpt_copy / "ckpt.pt.tmp").exists()  # a partial file would keep the disk full


def test_the_atomic_save_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    _save_atomically({"x": torch.ones(3)}, tmp_path / "c.pt")
    assert events == ["fsync file", "rename", "fsync dir"]
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["x"], torch.ones(3))


def test_a_failed_save_leaves_no_temp_file_not_even_a_stale_one(tmp_path, monkeypatch):
    (tmp_path / "c.pt.tmp").write_bytes(b"\0" * 100_000)  # left by an earlier crash

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half")
        raise RuntimeError("serialisation bug")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="serialisation bug"):  # not a user error: re-raised as is
        _save_atomically({"x": torch.ones(3)}, tmp_path / "c.pt")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- item 9: Ctrl-C


def _sigint_at_train_batch(monkeypatch, n: int, times: int = 1) -> None:
    real = Dataset.get_batch
    count = [0]

    def spy(self, split, *args, **kwargs):
        if split == "train":
            count[0] += 1
            if count[0] == n:
                for _ in range(times):
                    signal.raise_signal(signal.SIGINT)
        return real(self, split, *args, **kwargs)

    monkeypatch.setattr(Dataset, "get_batch", spy)


def test_ctrl_c_finishes_the_step_checkpoints_it_and_exits_130(tmp_path, capsys, monkeypatch):
    _sigint_at_train_batch(monkeypatch, 3)
    with pytest.raises(SystemExit) as exc:
        _main_expecting_exit(TRAIN + ["--out-dir", str(tmp_path), "--max-iters", "50", "--eval-interval", "100"])
    err = capsys.readouterr().err
    assert exc.value.code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"gptfast train: interrupted at step 3; saved {tmp_path}/ckpt.pt "
                                            f"(continue with: gptfast train --resume --out-dir {tmp_path})")
    assert load_checkpoint(tmp_path)["iter"] == 3  # the step in progress was completed, then saved


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path, capsys, monkeypatch):
    _sigint_at_train_batch(monkeypatch, 3, times=2)
    with pytest.raises(SystemExit) as exc:
        _main_expecting_exit(TRAIN + ["--out-dir", str(tmp_path), "--max-iters", "50", "--eval-interval", "100"])
    assert exc.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "gptfast train: interrupted"
    assert not (tmp_path / "ckpt.pt").exists()


def test_ctrl_c_outside_training_exits_130_without_a_traceback(trained, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gptfast.cli, "sample_text", interrupted)
    assert fails(["sample", "--ckpt", str(trained)], capsys, status=130) == "gptfast sample: interrupted"


def test_sigint_to_a_gptfast_train_process(tmp_path):
    """A real SIGINT to a running ``gptfast train``: exit 130, the message, a loadable checkpoint."""
    argv = TRAIN + ["--out-dir", str(tmp_path), "--max-iters", "100000", "--eval-interval", "5"]
    # Python leaves SIGINT ignored if it was ignored at exec (a background job): restore the
    # default, as an interactive shell would, so that this tests the product and not the shell.
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from gptfast.cli import main; main(sys.argv[1:])")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        while not lines.get(timeout=120).startswith("step 5: val loss"):
            pass
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("gptfast train: interrupted at step ") and f"; saved {tmp_path}/ckpt.pt" in last
    step = int(last.split("interrupted at step ")[1].split(";")[0])
    assert step >= 5 and load_checkpoint(tmp_path)["iter"] == step
