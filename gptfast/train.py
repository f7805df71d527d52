"""The ``gptfast train`` loop: AdamW, warmup + cosine learning rate, gradient clipping and
accumulation, autocast mixed precision, periodic evaluation, checkpoint/resume, MFU, sampling.

Reproducibility: the model is initialised from ``seed``; training batch ``it`` is drawn from
``np.random.default_rng([seed, it])``, so batches are a pure function of (seed, step); the torch
RNG (dropout) is saved in every checkpoint. Training k steps and resuming to N therefore gives
bit-identical parameters to N steps in one go (on the CPU, where kernels are deterministic).

Distributed: under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in DDP (NCCL on GPUs, gloo
on the CPU); ``batch_size`` and ``grad_accum`` are per rank, and rank r draws its micro-batches
from ``default_rng([seed, it, r])`` (its own shard of the data), so a step consumes
``world_size`` times the tokens. Rank 0 alone evaluates, logs, shows the progress bar and writes
the checkpoint; tokens/s and MFU count all ranks. Ranks > 0 seed their dropout RNG with
``seed + rank`` and checkpoints keep rank 0's RNG only, so a resumed multi-process run with
dropout is not bit-identical to a straight one (weights, optimizer and batches are).

MFU (model FLOPs utilisation) is ``flops_per_token * tokens/s / peak``. The peak is the
datasheet dense bf16/fp16 tensor-core rate for a few known GPUs; anywhere else (every CPU) it is
*measured* by timing a matmul at start, so there MFU is relative to the matmul throughput this
machine actually reached, not to a datasheet. The measurement draws its matrices from a private
generator: it runs after the checkpoint's RNG state is restored, and must not move it.

Faults are found before the first step where they can be: the data (both splits must hold
``block_size + 1`` tokens), the out-dir (created, and a file written to and removed from it) and
its free space (against the checkpoint's estimated size). A non-finite loss stops the run before
the optimizer step and before any save, so the last good checkpoint stays. Checkpoints are written
atomically (temp file, fsync, rename, fsync of the directory) and carry a sha256 of their tensors
and values, checked on load. On the main thread of a single process, Ctrl-C finishes the current
step, writes a checkpoint of it and raises :class:`TrainingInterrupted`; a second Ctrl-C stops at
once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import dist as gdist
from .data import Dataset, DataError, Tokenizer, UserError, load_dataset
from .model import GPT, PRESETS, GPTConfig, config_dict
from .ops._backend import BACKENDS, OPS, checked_name, requested_backend, resolve

CHECKPOINT_NAME = "ckpt.pt"

# Training defaults per model preset; TrainConfig fields left at None take these values.
# tiny: tuned so that `gptfast train --preset tiny` beats the unigram baseline by a wide margin
# within about two minutes on 2 CPU cores.
TRAIN_PRESETS: dict[str, dict] = {
    # Measured 2026-11-28 (`gptfast train --preset tiny`, 2-core AMD EPYC, torch 2.14.1, cpu
    # backend): 800 steps of 2,048 tokens at 20.7k tokens/s, val loss 1.85 nats vs a 3.14
    # unigram baseline, 1 min 55 s including the native build. Batch 16 learns more per token here than batch 32 x 400 steps
    # (val 1.98 after 1.6M tokens) at the same speed per token.
    "tiny": dict(batch_size=16, grad_accum=1, max_iters=800, lr=3e-3, warmup_iters=30,
                 eval_interval=200, eval_iters=20, beta2=0.99, sample_tokens=300),
    "small": dict(batch_size=32, grad_accum=1, max_iters=5000, lr=1e-3, warmup_iters=100,
                  eval_interval=500, eval_iters=50, beta2=0.99, dropout=0.1),
    # nanoGPT's GPT-2 recipe: ~0.5M tokens per optimizer step.
    "gpt2": dict(batch_size=12, grad_accum=40, max_iters=600_000, lr=6e-4, warmup_iters=2000,
                 eval_interval=1000, eval_iters=200),
    "gpt2-medium": dict(batch_size=8, grad_accum=60, max_iters=600_000, lr=3e-4, warmup_iters=2000,
                        eval_interval=1000, eval_iters=200),
}
# Used for fields that neither the user nor the preset set.
DEFAULTS = dict(
    out_dir="out", seed=1337, batch_size=16, grad_accum=1, max_iters=5000, lr=6e-4, warmup_iters=200,
    weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0, eval_interval=500, eval_iters=50,
    sample_tokens=200, compile=False, resume=False, quiet=False, no_pack=False,
)

# Dense bf16/fp16 tensor-core peaks from NVIDIA datasheets (FLOP/s), matched against
# torch.cuda.get_device_name(); the first matching substring wins.
GPU_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
)

# Model-shaping options: on --resume they come from the checkpoint and may not be changed.
_ARCH_FIELDS = ("preset", "block_size", "dropout")

# Seeds go to torch.manual_seed (which takes up to 2**64 - 1, after adding the rank or the sample
# index) and numpy's default_rng (non-negative only): 0 .. 2**63 - 1 leaves room for both.
SEED_MAX = 2**63 - 1

# What a gptfast train checkpoint holds; load_checkpoint rejects a file without these.
_CHECKPOINT_KEYS = ("model", "optimizer", "scaler", "model_args", "train_args", "iter",
                    "best_val_loss", "tokenizer", "rng")
_CHECKSUM_KEY = "checksum"
# Added to the tensors' size in the free-space estimate: the pickled structure, configs, tokenizer.
_CHECKPOINT_OVERHEAD_BYTES = 1 << 20


class ConfigError(UserError):
    """The options given to ``gptfast train``/``sample`` are inconsistent; the message says why."""


class CheckpointError(UserError):
    """A checkpoint cannot be read (missing pieces, damaged, not gptfast's) or written (disk full,
    I/O error); the message names the file."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; training stopped before the step and before any save.

    Exit status 1, not 2: the options were valid, the run failed (as a failed ``gptfast build``).
    """

    exit_status = 1


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, after a checkpoint of the step reached was written.

    A KeyboardInterrupt, so that code that does not know gptfast still stops on it.
    """

    def __init__(self, iter_num: int, checkpoint: Path | None):
        self.iter = iter_num
        self.checkpoint = checkpoint
        where = (f"saved {checkpoint} (continue with: gptfast train --resume --out-dir {checkpoint.parent})"
                 if checkpoint is not None else "no checkpoint written")
        super().__init__(f"interrupted at step {iter_num}; {where}")


def check_seed(value: int, option: str = "--seed") -> None:
    """ConfigError unless ``value`` is a seed every generator here accepts (0 .. SEED_MAX)."""
    if not 0 <= value <= SEED_MAX:
        raise ConfigError(f"{option} must be in 0 .. 2**63 - 1, got {value}")


@dataclass
class TrainConfig:
    """Options of ``gptfast train``. ``None`` means: the preset's default (``TRAIN_PRESETS``),
    else ``DEFAULTS``; on ``resume``, first the value stored in the checkpoint."""

    preset: str | None = None            # model preset (gptfast.model.PRESETS); default "tiny"
    data: str | None = None              # text file, dir of text files, or dir with train.bin/val.bin
    out_dir: str | None = None
    resume: bool | None = None           # continue from out_dir/ckpt.pt
    device: str | None = None            # default: cuda if available, else cpu
    dtype: str | None = None             # autocast dtype; default bfloat16/float16 on cuda, float32 else
    backend: str | None = None           # gptfast op backend for the whole run
    compile: bool | None = None          # torch.compile the model
    seed: int | None = None
    batch_size: int | None = None        # sequences per micro-batch
    block_size: int | None = None        # context length; default: the preset's
    grad_accum: int | None = None        # micro-batches per optimizer step
    max_iters: int | None = None         # optimizer steps in total (including resumed ones)
    lr: float | None = None              # peak learning rate; the cosine decays to lr / 10
    warmup_iters: int | None = None
    lr_decay_iters: int | None = None    # end of the cosine; default max_iters
    weight_decay: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    grad_clip: float | None = None       # max global gradient norm; 0 disables clipping
    dropout: float | None = None         # default: the preset's
    eval_interval: int | None = None     # evaluate and checkpoint every this many steps, and at the end
    eval_iters: int | None = None        # batches per split per evaluation
    sample_tokens: int | None = None     # tokens sampled at the end; 0 for none
    quiet: bool | None = None            # no banner, no progress bar
    no_pack: bool | None = None          # attend across document boundaries (default: pack documents)

    def resolved(self) -> "TrainConfig":
        """A copy with every None replaced by the preset's or the global default."""
        preset = self.preset or "tiny"
        if preset not in PRESETS:
            raise ConfigError(f"unknown --preset {preset!r}; choose from {', '.join(PRESETS)}")
        base = {**DEFAULTS, **TRAIN_PRESETS.get(preset, {})}
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in values.items():
            if value is None and name in base:
                values[name] = base[name]
        values["preset"] = preset
        if values["backend"] is not None:
            # The spellings the API accepts (" CPU " is "cpu"), normalised once here.
            try:
                values["backend"] = checked_name(values["backend"])
            except ValueError:
                raise ConfigError(f"--backend {values['backend']!r}: unknown; choose from "
                                  f"{', '.join(('auto',) + BACKENDS)}") from None
        if values["block_size"] is None:
            values["block_size"] = PRESETS[preset].block_size
        if values["lr_decay_iters"] is None:
            values["lr_decay_iters"] = values["max_iters"]
        if values["device"] is None:
            values["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        cfg = TrainConfig(**values)
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        """ConfigError, naming the option, for any value that cannot give a meaningful run.

        Checked before anything is loaded: ``--lr inf`` used to train to NaN and overwrite the
        last good checkpoint. Comparisons are written so that NaN fails them.
        """
        def flag(name: str) -> str:
            return "--" + name.replace("_", "-")

        for name in ("batch_size", "block_size", "grad_accum", "eval_interval", "eval_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("max_iters", "warmup_iters", "lr_decay_iters", "sample_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a finite number > 0, got {self.lr}")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                hint = " (0 disables clipping)" if name == "grad_clip" else ""
                raise ConfigError(f"{flag(name)} must be a finite number >= 0{hint}, got {value}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{flag(name)} must be in [0, 1), got {getattr(self, name)}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        check_seed(self.seed)


@dataclass
class TrainResult:
    """What a finished run reached; ``gptfast train`` prints it, tests inspect it."""

    iter: int
    train_loss: float                 # mean training loss since the previous evaluation
    val_loss: float
    best_val_loss: float
    unigram_loss: float
    tokens_per_sec: float             # mean over the steps of this invocation, evaluation excluded
    mfu: float | None                 # fraction of peak_flops
    peak_flops: float
    peak_source: str                  # "datasheet" or "measured"
    checkpoint: Path
    sample: str | None = None
    config: TrainConfig = field(default_factory=TrainConfig)


# ------------------------------------------------------------------------------------ helpers


def lr_at(it: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``cfg.lr``, then a cosine decay to ``cfg.lr / 10`` at ``lr_decay_iters``."""
    min_lr = cfg.lr / 10
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / cfg.warmup_iters
    if it >= cfg.lr_decay_iters:
        return min_lr
    progress = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The autocast dtype: bf16 on GPUs that have it, else fp16 (with loss scaling); fp32 on CPU,
    where autocast to bf16 is slower than fp32 on most machines without AMX."""
    if name is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ConfigError(f"--dtype must be one of {', '.join(dtypes)}, got {name!r}")
    if dtypes[name] == torch.float16 and device.type != "cuda":
        raise ConfigError("--dtype float16 needs a CUDA device; use bfloat16 or float32 on the CPU")
    return dtypes[name]


def resolve_device(name: str) -> torch.device:
    """``--device`` as a torch.device that gptfast can train and sample on (cpu, an existing cuda)."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device {name!r}: {' '.join(str(e).split())}") from None
    if device.type not in ("cpu", "cuda"):
        # meta, mps, xpu, ...: no gptfast backend runs there (every backend is cpu or cuda).
        raise ConfigError(f"--device {name}: gptfast runs on cpu or cuda devices, not {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available in this PyTorch build / machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """FLOP/s of a square matmul in ``dtype``, timed for about ``seconds`` after one warm-up.

    RNG-neutral: the matrices come from a private generator. On --resume this runs after the
    checkpoint's RNG state is restored; drawing from the default generator shifted every later
    dropout mask (a max parameter difference of 0.013 on the small preset).
    """
    n = 4096 if device.type == "cuda" else 1024
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
        if device.type == "cuda" and reps % 10:
            continue  # queue launches in groups; synchronising after each would time the gaps
        sync()
    sync()
    return 2.0 * n**3 * reps / (time.perf_counter() - start)


@functools.lru_cache(maxsize=None)
def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, "datasheet" | "measured") that MFU is relative to; measured once per process."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS:
            if key in name:
                return flops, "datasheet"
    return measure_matmul_flops(device, dtype), "measured"


def sample_text(model: GPT, tokenizer: Tokenizer, prompt: str = "", max_new_tokens: int = 200,
                temperature: float = 0.8, top_k: int | None = None, seed: int = 0,
                device: torch.device | str = "cpu") -> str:
    """The prompt followed by ``max_new_tokens`` sampled tokens, decoded to text.

    An empty prompt starts from the tokenizer's neutral start token (not shown in the output).
    """
    ids = tokenizer.encode(prompt) if prompt else tokenizer.start_tokens()
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    model.train(was_training)
    new = out[0].tolist() if prompt else out[0, len(ids):].tolist()
    return tokenizer.decode(new)


# -------------------------------------------------------------------------------- checkpoints


def checkpoint_path(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a file, else ``path/ckpt.pt``."""
    path = Path(path).expanduser()
    return path if path.is_file() else path / CHECKPOINT_NAME


def checkpoint_digest(ckpt: dict) -> str:
    """sha256 over a checkpoint's contents (all but its checksum entry), in a fixed order.

    Covers every tensor's bytes (with its key path, dtype and shape) and every plain value's
    repr: a flipped byte in a tensor's storage is read back by torch.load without complaint, so
    only this catches it. Dict entries are visited sorted by key, lists in order.
    """
    h = hashlib.sha256()

    def visit(path: str, value) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            h.update(f"{path}:{t.dtype}:{tuple(value.shape)}:".encode())
            h.update(t.view(torch.uint8).numpy().data)
        elif isinstance(value, dict):
            for key, item in sorted(value.items(), key=lambda kv: str(kv[0])):
                visit(f"{path}/{key}", item)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(f"{path}[{i}]", item)
        else:
            h.update(f"{path}={type(value).__name__}:{value!r};".encode())

    visit("", {k: v for k, v in ckpt.items() if k != _CHECKSUM_KEY})
    return "sha256:" + h.hexdigest()


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict:
    """Read a checkpoint written by ``gptfast train`` (a file, or the out-dir holding ckpt.pt).

    Raises CheckpointError, naming the file, for anything that is not a whole, undamaged gptfast
    checkpoint: a directory, an empty, truncated or random file, another program's torch.save
    output, or tensors that do not match the stored checksum. Checkpoints written before
    checksums were added (no "checksum" entry) load as before.
    """
    file = checkpoint_path(path)
    if file.is_dir():
        raise CheckpointError(f"{file} is a directory, not a checkpoint file")
    if not file.exists():
        raise ConfigError(f"no checkpoint at {file} (train one with: gptfast train --out-dir {file.parent})")
    if file.stat().st_size == 0:
        raise CheckpointError(f"{file} is empty, not a checkpoint")
    try:
        # weights_only: a checkpoint is tensors and plain values, never arbitrary pickled objects.
        ckpt = torch.load(file, map_location=device, weights_only=True)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {file} ({e.strerror or e})") from None
    except Exception as e:
        # torch.load reports a bad file as whatever its zip reader or unpickler meets
        # (RuntimeError, UnpicklingError, EOFError, ValueError, ...): all mean the same here.
        raise CheckpointError(f"{file} is not a readable checkpoint: damaged, truncated, or not "
                              f"written by torch.save ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "train_args" not in ckpt:
        raise CheckpointError(f"{file} is not a gptfast train checkpoint")
    missing = [k for k in _CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{file} is an incomplete gptfast train checkpoint (no {', '.join(missing)})")
    stored = ckpt.get(_CHECKSUM_KEY)
    if stored is not None and stored != checkpoint_digest(ckpt):
        raise CheckpointError(f"{file} is damaged: its contents do not match the checksum written "
                              f"with it; restore a copy or train again")
    shapes = {"model": dict, "optimizer": dict, "model_args": dict, "train_args": dict,
              "tokenizer": dict, "rng": dict, "iter": int}
    wrong = [k for k, kind in shapes.items() if not isinstance(ckpt[k], kind)]
    if wrong or ckpt["tokenizer"].get("kind") not in ("bytes", "chars", "gpt2"):
        raise CheckpointError(f"{file} is not a gptfast train checkpoint (bad {', '.join(wrong) or 'tokenizer'})")
    try:
        GPTConfig(**ckpt["model_args"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: its model_args do not describe a gptfast GPT ({e})") from None
    return ckpt


def model_from_checkpoint(ckpt: dict, device: torch.device | str = "cpu") -> tuple[GPT, Tokenizer]:
    """The trained model (in eval mode) and its tokenizer."""
    model = GPT(GPTConfig(**ckpt["model_args"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # missing/unexpected keys, wrong shapes
        raise CheckpointError(f"the checkpoint's weights do not fit its model_args "
                              f"({' '.join(str(e).split())[:200]})") from None
    return model.to(device).eval(), Tokenizer.from_state_dict(ckpt["tokenizer"])


def _save_atomically(obj: dict, file: Path) -> None:
    """Write ``obj`` to ``file`` so that a crash or a full disk leaves the previous file intact.

    Temp file, flush + fsync, rename over ``file``, fsync of the directory (without the fsyncs
    a power loss can leave the renamed file empty). A ``<name>.tmp`` left by an earlier crash is
    removed first (on a full disk it is what keeps the disk full), and the temp file is removed
    on any failure. OSError (ENOSPC, EDQUOT, EIO, ...) becomes a one-line CheckpointError.
    """
    tmp = file.with_name(file.name + ".tmp")
    try:
        tmp.unlink(missing_ok=True)
        # Through a Python file object: torch.save(obj, path) reports a full disk as
        # "basic_ios::clear" / "unexpected pos", losing errno; f.write raises OSError(ENOSPC).
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise CheckpointError(_write_error(e, file)) from None
        raise
    _fsync_dir(file.parent)


def _write_error(e: OSError, file: Path) -> str:
    if e.errno == errno.ENOSPC:
        what = f"no space left on device: {file}"
    elif e.errno == getattr(errno, "EDQUOT", None):
        what = f"disk quota exceeded: {file}"
    else:
        what = f"cannot write {file} ({e.strerror or e})"
    return f"{what}; the checkpoint was not written (a previous one is unchanged)"


def _fsync_dir(path: Path) -> None:
    # Makes the rename durable. Not every platform can open a directory (Windows): best effort.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def prepare_out_dir(out_dir: Path) -> None:
    """Create ``--out-dir`` and prove it writable (a file created and removed), or ConfigError.

    Checked before training: a read-only or misnamed out-dir used to surface at the first save.
    A ``ckpt.pt.tmp`` left by a crashed save is removed (it can be most of a full disk).
    """
    if out_dir.is_file():
        raise ConfigError(f"--out-dir {out_dir} is a file, not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out-dir {out_dir}: cannot create the directory ({e.strerror or e})") from None
    probe = out_dir / f".gptfast-write-test-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"gptfast")
        probe.unlink()
        (out_dir / (CHECKPOINT_NAME + ".tmp")).unlink(missing_ok=True)
    except OSError as e:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        raise ConfigError(f"--out-dir {out_dir} is not writable ({e.strerror or e})") from None


def estimated_checkpoint_bytes(model: torch.nn.Module) -> int:
    """Bytes a checkpoint of ``model`` takes: its state dict, AdamW's two moments per trained
    parameter, and a margin for the rest (configs, tokenizer, pickle structure)."""
    seen, state = set(), 0
    for t in model.state_dict().values():  # tied weights (wte/lm_head) are stored once
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            state += t.numel() * t.element_size()
    moments = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return state + moments + _CHECKPOINT_OVERHEAD_BYTES


def check_free_space(out_dir: Path, needed: int) -> None:
    """ConfigError if ``out_dir``'s file system has less than ``needed`` bytes free.

    The previous checkpoint stays until the new one is renamed over it, so a whole new one must
    fit next to it: ``needed`` is one checkpoint, not the difference.
    """
    free = shutil.disk_usage(out_dir).free
    if free < needed:
        raise ConfigError(f"--out-dir {out_dir}: {_format_bytes(free)} free, but a checkpoint needs "
                          f"about {_format_bytes(needed)}; free some space or choose another --out-dir")


def check_backend_env() -> None:
    """ConfigError if GPTFAST_BACKEND names no backend (checked up front: the ops would raise a
    ValueError at their first call, deep inside a step or a sample)."""
    try:
        requested_backend(None)
    except ValueError as e:
        raise ConfigError(str(e)) from None


@contextlib.contextmanager
def _deferred_sigint(enabled: bool):
    """Yields a list that becomes non-empty once Ctrl-C is pressed; the loop polls it.

    The first SIGINT only asks the loop to stop after the current step (a KeyboardInterrupt in
    the middle of ``optimizer.step()`` would leave half-updated weights to checkpoint); a second
    one raises KeyboardInterrupt at once. Only on the main thread (where signals are delivered)
    and only over Python's default handler: a SIG_IGN (a background job) or an application's own
    handler is left alone.
    """
    requested: list[bool] = []
    if (not enabled or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield requested
        return

    def handler(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(True)
        # os.write, not print: the handler may run in the middle of tqdm's write to stderr.
        os.write(2, b"\ngptfast train: stopping after this step to write a checkpoint "
                    b"(Ctrl-C again to stop now, without one)\n")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


def _merge_resume(given: TrainConfig, ckpt: dict) -> TrainConfig:
    """Options for a resumed run: those given now, else those given to the checkpointed run."""
    saved = ckpt["train_args"]
    # What the checkpointed model really is: train_args holds options *as given* (None when a
    # preset default applied), so shape options given now are checked against the resolved run.
    actual = {"preset": ckpt.get("train_config", {}).get("preset"),
              "block_size": ckpt["model_args"]["block_size"], "dropout": ckpt["model_args"]["dropout"]}
    values = {}
    for f in fields(given):
        value = getattr(given, f.name)
        old = saved.get(f.name)
        if f.name in _ARCH_FIELDS and value is not None and value != actual[f.name]:
            raise ConfigError(f"--{f.name.replace('_', '-')} {value} differs from the checkpoint's "
                              f"{actual[f.name]}; the model's shape cannot change on --resume")
        values[f.name] = value if value is not None else old
    values["resume"] = True
    return TrainConfig(**values)


# ------------------------------------------------------------------------------ the main loop


def train(config: TrainConfig) -> TrainResult:
    """Train (or, with ``config.resume``, continue training) a GPT; see the module docstring."""
    given = config
    ckpt = None
    out_dir = Path(given.out_dir or DEFAULTS["out_dir"]).expanduser()
    if out_dir.is_file():  # else --resume would take the file for the checkpoint itself
        raise ConfigError(f"--out-dir {out_dir} is a file, not a directory")
    if given.resume:
        ckpt = load_checkpoint(out_dir)
        given = _merge_resume(given, ckpt)
    cfg = given.resolved()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    data = load_dataset(cfg.data)
    if ckpt is not None and Tokenizer.from_state_dict(ckpt["tokenizer"]).kind != data.tokenizer.kind:
        raise DataError(f"--data gives {data.tokenizer.kind} tokens but the checkpoint was trained "
                        f"on {ckpt['tokenizer']['kind']} tokens")
    prepare_out_dir(Path(cfg.out_dir).expanduser())  # every rank: mkdir and a probe are harmless
    info, device = gdist.setup(device)
    try:
        with backend_context(cfg.backend, device):
            result = _run(given, cfg, ckpt, data, device, dtype, info)
        if info.enabled:
            torch.distributed.barrier()  # every rank returns once rank 0's checkpoint is written
        return result
    finally:
        gdist.teardown(info)


def backend_context(name: str | None, device: torch.device):
    """``gptfast.use_backend(name)`` (no change when ``name`` is None), checked up front.

    An explicit backend that cannot run one of the ops on ``device`` is reported now, with the
    registry's reason, rather than as an exception from inside the first training step. With
    ``name`` None, GPTFAST_BACKEND is checked instead. Only the named backend's availability is
    asked: asking for every backend's would build the native extension for ``--backend reference``.
    """
    if name is None:
        check_backend_env()
        return contextlib.nullcontext()
    import gptfast
    from .ops._backend import _REGISTRY

    try:
        name = checked_name(name)  # the spellings the API accepts
    except ValueError:
        raise ConfigError(f"--backend {name!r}: unknown; choose from {', '.join(('auto',) + BACKENDS)}") from None
    unavailable = []
    if name != "auto":  # auto falls back per op, so it always runs
        for op in OPS:
            impl = _REGISTRY.get((op, name))
            reason = "not implemented" if impl is None else impl.unavailable_reason(device)
            if reason is not None:
                unavailable.append(f"{op}: {reason}")
    if unavailable:
        raise ConfigError(f"--backend {name} cannot run on {device.type} ({'; '.join(unavailable)})")
    return gptfast.use_backend(name)


def resolved_backends(device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """The backend each gptfast op runs on for ``device``/``dtype`` under the current selection."""
    return {op: resolve(op, device, dtype).backend for op in OPS}


def _run(given: TrainConfig, cfg: TrainConfig, ckpt: dict | None, data: Dataset,
         device: torch.device, dtype: torch.dtype, info: gdist.DistInfo = gdist.DistInfo()) -> TrainResult:
    out_dir = Path(cfg.out_dir).expanduser()  # created and checked by prepare_out_dir
    if not info.is_main:  # rank 0 alone logs and shows progress
        cfg = dataclasses.replace(cfg, quiet=True)
    if device.type == "cuda":
        # TF32 for the fp32 matmuls that autocast leaves (and for --dtype float32).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(cfg.seed)
    if ckpt is not None:
        model_config = GPTConfig(**ckpt["model_args"])
    else:
        overrides = dict(vocab_size=data.vocab_size, block_size=cfg.block_size)
        if cfg.dropout is not None:
            overrides["dropout"] = cfg.dropout
        model_config = GPTConfig.from_preset(cfg.preset, **overrides)
    if model_config.vocab_size < data.vocab_size:
        raise DataError(f"the data's vocabulary ({data.vocab_size}) is larger than the model's "
                        f"({model_config.vocab_size})")
    data.check_block_size(model_config.block_size)  # val is first read at the first evaluation
    model = GPT(model_config).to(device)
    if info.is_main:
        check_free_space(out_dir, estimated_checkpoint_bytes(model))
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start_iter, best_val = 0, math.inf
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:  # parts that do not fit together
            raise CheckpointError(f"{out_dir / CHECKPOINT_NAME}: its state does not fit its model "
                                  f"({' '.join(str(e).split())[:200]})") from None
        start_iter, best_val = ckpt["iter"], ckpt["best_val_loss"]
        # Restored last: building the model above consumed random numbers.
        torch.set_rng_state(ckpt["rng"]["cpu"].cpu())
        if device.type == "cuda" and ckpt["rng"].get("cuda"):
            torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng"]["cuda"]])
    if not info.is_main:
        torch.manual_seed(cfg.seed + info.rank)  # distinct dropout masks per rank
    step_model = torch.compile(model) if cfg.compile else model
    if info.enabled:
        # DDP broadcasts rank 0's parameters at construction and averages gradients in backward.
        step_model = torch.nn.parallel.DistributedDataParallel(
            step_model, device_ids=[device.index] if device.type == "cuda" else None)

    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    block = model_config.block_size
    tokens_per_iter = cfg.batch_size * cfg.grad_accum * block * info.world_size  # all ranks
    # Packed documents: attention stays within each document of a window (gptfast.data).
    pack = data.has_documents and not cfg.no_pack

    def forward(m, batch):
        x, y, *doc = (t.to(device, non_blocking=True) for t in batch)
        return m(x, y, doc_ids=doc[0] if doc else None)
    flops_per_token = model.flops_per_token(block)
    unigram = data.unigram_entropy()
    log = print if cfg.quiet else tqdm.write
    if not cfg.quiet:
        print(f"data: {data.description}")
        print(f"model: preset {cfg.preset}, {model.num_params() / 1e6:.2f}M parameters, "
              f"block {block}, vocab {model_config.vocab_size}; {device.type} {str(dtype)[6:]}"
              f"{', compiled' if cfg.compile else ''}")
        if data.has_documents:
            print("documents: packed, attention within each document (--no-pack: across them)" if pack else
                  "documents: not packed (--no-pack), attention crosses document boundaries")
        # Resolving loads each backend now (a native one may build on first use), so that cost
        # is not charged to the first timed step, and the log says which kernels ran.
        chosen = ", ".join(f"{op} {name}" for op, name in resolved_backends(device, dtype).items())
        print(f"backend {cfg.backend or requested_backend(None)}: {chosen}")
        ranks = f" x {info.world_size} ranks" if info.enabled else ""
        print(f"{tokens_per_iter:,} tokens per step ({cfg.batch_size} x {cfg.grad_accum} x {block}{ranks}), "
              f"{cfg.max_iters} steps; unigram baseline (val) {unigram:.3f} nats")
    device_peak, peak_source = peak_flops(device, dtype)
    peak = device_peak * info.world_size  # MFU of the whole job: every rank has this device's peak
    mfu_label = "mfu" if peak_source == "datasheet" else "mfu*"
    if not cfg.quiet:
        if peak_source == "datasheet":
            print(f"MFU relative to the {torch.cuda.get_device_name(device)} datasheet peak "
                  f"{device_peak / 1e12:.0f} TFLOP/s{' per rank' if info.enabled else ''}")
        else:
            print(f"mfu* = relative to a measured {str(dtype)[6:]} matmul on this {device.type}: "
                  f"{device_peak / 1e9:.1f} GFLOP/s{' per rank' if info.enabled else ''} (not a datasheet peak)")
        if start_iter:
            print(f"resuming from {out_dir / CHECKPOINT_NAME} at step {start_iter}")

    def evaluate() -> float:
        """Mean validation loss over ``eval_iters`` batches.

        The same batches every time (own generator, fixed seed): evaluations are comparable and
        do not disturb the training RNG, so resumed runs stay identical. The training loss is
        not re-evaluated: the mean loss of the steps since the last evaluation stands in for it,
        which halves the evaluation cost (on the tiny preset that is ~5% of the run).
        """
        # Under DDP only rank 0 evaluates, on the unwrapped model (no collectives).
        eval_model = step_model.module if info.enabled else step_model
        eval_model.eval()
        rng = np.random.default_rng([cfg.seed, 1 << 32])
        total = 0.0
        with torch.no_grad():
            for _ in range(cfg.eval_iters):
                batch = data.get_batch("val", cfg.batch_size, block, rng, pack)
                with autocast:
                    _, loss = forward(eval_model, batch)
                total += loss.item()
        eval_model.train()
        return total / cfg.eval_iters

    checkpoint_file = out_dir / CHECKPOINT_NAME
    last_saved = start_iter if ckpt is not None else None  # the step of the checkpoint on disk

    def save(iter_num: int, val_loss: float) -> None:
        nonlocal last_saved
        rng_state = {"cpu": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}
        obj = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "model_args": config_dict(model_config),
            "train_args": _plain(dataclasses.asdict(given)),  # as given: what --resume inherits
            "train_config": _plain(dataclasses.asdict(cfg)),  # as resolved, for the record
            "iter": iter_num,
            "val_loss": val_loss,
            "best_val_loss": best_val,
            "unigram_loss": unigram,
            "tokenizer": data.tokenizer.state_dict(),
            "rng": rng_state,
        }
        obj[_CHECKSUM_KEY] = checkpoint_digest(obj)
        _save_atomically(obj, checkpoint_file)
        last_saved = iter_num

    def diverged(what: str, value: float, iter_num: int) -> TrainingDiverged:
        kept = (f"the last checkpoint ({checkpoint_file}, step {last_saved}) is kept"
                if last_saved is not None else "no checkpoint was written")
        return TrainingDiverged(f"step {iter_num}: the {what} is {value}; stopped without saving, "
                                f"{kept}; try a lower --lr (now {cfg.lr:g}) or more --warmup-iters")

    model.train()
    bar = tqdm(total=cfg.max_iters, initial=start_iter, desc="train", unit="step",
               disable=cfg.quiet, dynamic_ncols=True, file=sys.stderr)
    val_loss = train_loss = math.nan
    recent_losses: list[float] = []  # training losses since the last evaluation
    timed_tokens, timed_seconds, smooth_dt = 0, 0.0, None
    # Under DDP a rank that stopped on its own would leave the others waiting in an all-reduce:
    # there Ctrl-C keeps its default effect (torchrun stops every rank).
    with _deferred_sigint(not info.enabled) as stop_requested, contextlib.closing(bar):
        for it in range(start_iter, cfg.max_iters):
            t0 = time.perf_counter()
            lr = lr_at(it, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch_all = data.get_batch("train", cfg.batch_size * cfg.grad_accum, block,
                                       gdist.batch_rng(cfg.seed, it, info.rank, info.world_size), pack)
            loss_sum = 0.0
            for micro, batch in enumerate(zip(*(t.chunk(cfg.grad_accum) for t in batch_all))):
                # DDP: all-reduce gradients once per step, in the last micro-batch's backward.
                sync = (step_model.no_sync() if info.enabled and micro < cfg.grad_accum - 1
                        else contextlib.nullcontext())
                with sync:
                    with autocast:
                        _, loss = forward(step_model, batch)
                    # Each micro-batch's loss is a mean; dividing makes the accumulated gradient the
                    # gradient of the mean over the whole step.
                    scaler.scale(loss / cfg.grad_accum).backward()
                loss_sum += loss.item()
            loss_sum = gdist.all_mean(loss_sum, info, device)  # the logged loss is the global batch's
            if not math.isfinite(loss_sum):
                # Before the optimizer step and any save: the weights and the checkpoint stay good.
                raise diverged("training loss", loss_sum / cfg.grad_accum, it + 1)
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            recent_losses.append(loss_sum / cfg.grad_accum)
            dt = time.perf_counter() - t0

            # The first step of a run pays for warm-up (allocation, compilation): not timed.
            if it > start_iter:
                timed_tokens += tokens_per_iter
                timed_seconds += dt
                # Smooth the step time, not the rate: a mean of rates would hide slow steps.
                smooth_dt = dt if smooth_dt is None else 0.9 * smooth_dt + 0.1 * dt
            postfix = {"loss": f"{recent_losses[-1]:.3f}", "lr": f"{lr:.1e}"}
            if smooth_dt is not None:
                smooth_tps = tokens_per_iter / smooth_dt
                postfix["tok/s"] = f"{smooth_tps:,.0f}"
                postfix[mfu_label] = f"{100 * flops_per_token * smooth_tps / peak:.1f}%"
            bar.set_postfix(postfix, refresh=False)
            bar.update()

            iter_num = it + 1
            if info.is_main and (iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters):
                val_loss, train_loss = evaluate(), sum(recent_losses) / len(recent_losses)
                recent_losses.clear()
                if not math.isfinite(val_loss):  # finite training loss, but the step broke the weights
                    raise diverged("validation loss", val_loss, iter_num)
                best_val = min(best_val, val_loss)
                save(iter_num, val_loss)
                log(f"step {iter_num}: val loss {val_loss:.4f} (unigram baseline {unigram:.4f}), "
                    f"train loss {train_loss:.4f} (mean since last eval), lr {lr:.2e}; "
                    f"saved {checkpoint_file}")
            if stop_requested:  # Ctrl-C: this step is complete, checkpoint it and stop
                if info.is_main and last_saved != iter_num:
                    if not all(torch.isfinite(p).all() for p in model.parameters()):
                        raise diverged("model", "not finite", iter_num)
                    save(iter_num, val_loss)
                raise TrainingInterrupted(iter_num, checkpoint_file if info.is_main else None)
    if start_iter >= cfg.max_iters and info.is_main:  # nothing left to train: where the checkpoint stands
        val_loss = evaluate()
        log(f"step {start_iter}: already trained to --max-iters {cfg.max_iters}; val loss {val_loss:.4f}")

    tokens_per_sec = timed_tokens / timed_seconds if timed_seconds else math.nan
    mfu = flops_per_token * tokens_per_sec / peak if timed_seconds else None
    result = TrainResult(
        iter=max(start_iter, cfg.max_iters), train_loss=train_loss, val_loss=val_loss,
        best_val_loss=best_val, unigram_loss=unigram, tokens_per_sec=tokens_per_sec, mfu=mfu,
        peak_flops=peak, peak_source=peak_source, checkpoint=out_dir / CHECKPOINT_NAME, config=cfg,
    )
    if timed_seconds and info.is_main:
        of_what = "datasheet peak" if peak_source == "datasheet" else f"measured {str(dtype)[6:]} matmul rate"
        print(f"done: {result.iter} steps, val loss {val_loss:.4f} vs unigram baseline "
              f"{unigram:.4f} nats; {tokens_per_sec:,.0f} tokens/s, MFU {100 * mfu:.1f}% of the {of_what}")
    if cfg.sample_tokens and info.is_main:
        with autocast:
            result.sample = sample_text(model, data.tokenizer, max_new_tokens=cfg.sample_tokens,
                                        seed=cfg.seed, device=device)
        print(f"--- sample ({cfg.sample_tokens} tokens, temperature 0.8) ---\n{result.sample}\n---")
    return result


def _plain(d: dict) -> dict:
    """``d`` with Path values as strings, so that a weights_only torch.load can read it."""
    return {k: os.fspath(v) if isinstance(v, Path) else v for k, v in d.items()}
