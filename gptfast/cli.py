"""The ``gptfast`` command: ``train``, ``sample``, ``info``, ``build`` and ``bench``.

Bad input (a missing data path, an unknown preset, a damaged checkpoint, a full disk, ...) ends the
command with a one-line ``gptfast <cmd>: error: ...`` message and exit status 2, never a traceback:
every such error is a :class:`gptfast.data.UserError`. A run that diverged (non-finite loss) exits
with 1. Ctrl-C exits with 130; during training it first checkpoints the step reached and says
where. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from dataclasses import fields

import torch

from .data import DataError, UserError
from .model import PRESETS
from .train import (ConfigError, TrainConfig, TrainingInterrupted, check_backend_env, check_seed,
                    load_checkpoint, model_from_checkpoint, resolve_device, sample_text, train)

# Help text per TrainConfig field; the flag is the field name with dashes.
_TRAIN_HELP = {
    "preset": f"model preset: {', '.join(PRESETS)} (default: tiny); also sets training defaults",
    "data": "text file, directory of text files, or directory with nanoGPT train.bin/val.bin "
            "(default: built-in corpus, the Python standard library's source)",
    "out_dir": "where ckpt.pt is written and resumed from (default: out)",
    "resume": "continue from OUT_DIR/ckpt.pt; options not given are taken from that run",
    "device": "cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)",
    "dtype": "autocast dtype: float32, bfloat16, float16 (default: bfloat16 or float16 on cuda, "
             "float32 on cpu)",
    "backend": "gptfast op backend: auto, reference, triton, cuda, cpu (default: GPTFAST_BACKEND or auto)",
    "compile": "torch.compile the model",
    "seed": "seed for initialisation, batches and sampling (default: 1337)",
    "batch_size": "sequences per micro-batch",
    "block_size": "context length (default: the preset's)",
    "grad_accum": "micro-batches per optimizer step",
    "max_iters": "total optimizer steps, counting resumed ones",
    "lr": "peak learning rate (cosine decay to lr/10)",
    "warmup_iters": "steps of linear learning-rate warmup",
    "lr_decay_iters": "step at which the cosine reaches lr/10 (default: max-iters)",
    "weight_decay": "AdamW weight decay on matrices and embeddings (default: 0.1)",
    "beta1": "AdamW beta1 (default: 0.9)",
    "beta2": "AdamW beta2 (default: 0.95; 0.99 for tiny and small)",
    "grad_clip": "clip the global gradient norm to this; 0 disables (default: 1.0)",
    "dropout": "dropout probability (default: the preset's)",
    "eval_interval": "evaluate and checkpoint every N steps, and at the end",
    "eval_iters": "batches per split in each evaluation",
    "sample_tokens": "tokens to sample at the end; 0 for none",
    "quiet": "no banner and no progress bar",
    "no_pack": "let attention cross document boundaries (default: on data with documents -- the built-in "
               "corpus, a directory of text files, GPT-2 .bin tokens split at <|endoftext|> -- each token "
               "attends within its own document, positions restart at each)",
}


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    # Every default is None, so that TrainConfig can tell an option given from one left to the
    # preset, and --resume can inherit the options left out.
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool | None", bool):
            parser.add_argument(flag, action="store_true", default=None, help=_TRAIN_HELP[f.name])
            continue
        kind = {"int | None": int, "float | None": float}.get(f.type, str)
        parser.add_argument(flag, type=kind, default=None, help=_TRAIN_HELP[f.name],
                            metavar=f.name.upper())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptfast",
                                     description="Train and sample small GPTs on gptfast kernels.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,sample,info,build,bench}")

    p_train = sub.add_parser("train", help="train a GPT (default: the tiny preset on the built-in corpus)")
    _add_train_args(p_train)

    p_sample = sub.add_parser("sample", help="generate text from a checkpoint")
    p_sample.add_argument("--ckpt", default="out",
                          help="checkpoint file or the out-dir holding ckpt.pt (default: out)")
    p_sample.add_argument("--prompt", default="", help="text to continue (default: start of a fresh text)")
    p_sample.add_argument("--max-new-tokens", type=int, default=300)
    p_sample.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p_sample.add_argument("--top-k", type=int, default=None)
    p_sample.add_argument("--num-samples", type=int, default=1)
    p_sample.add_argument("--seed", type=int, default=1337)
    p_sample.add_argument("--device", default=None, help="default: cuda if available, else cpu")

    sub.add_parser("info", help="versions, devices and the backend table")
    p = sub.add_parser("build", help="compile the native extensions (cpu; --cuda: cuda) now instead of on first use")
    p.add_argument("--cuda", action="store_true",
                   help="build the cuda backend instead (nvcc for $TORCH_CUDA_ARCH_LIST, default 8.0;9.0+PTX; "
                        "about a minute); prints every kernel's registers, stack and shared memory and fails on "
                        "spills in the attention kernels")
    p.add_argument("--quiet", action="store_true", help="do not echo the compiler's output")

    from .bench import add_arguments as _add_bench_args
    p_bench = sub.add_parser(
        "bench", help="time an op or a training step against PyTorch eager / torch.compile",
        description="Check every backend against a float64 ground truth, then time it (CUDA events on "
                    "a GPU, torch.utils.benchmark on the CPU); print a table, and with --out write "
                    "results.json, results.csv and PNG plots. Size syntax per op: see --sizes.")
    _add_bench_args(p_bench)
    return parser


def cmd_train(args: argparse.Namespace) -> None:
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    train(config)


def cmd_sample(args: argparse.Namespace) -> None:
    # Every option is checked before the checkpoint is read (seconds for a large one).
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ConfigError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    check_seed(args.seed)
    check_seed(args.seed + args.num_samples - 1, "--seed + --num-samples - 1")  # sample i uses seed + i
    check_backend_env()
    device = resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = model_from_checkpoint(load_checkpoint(args.ckpt, device), device)
    if args.prompt:
        try:
            tokenizer.encode(args.prompt)
        except DataError as e:
            raise DataError(f"--prompt: {e}") from None
    for i in range(args.num_samples):
        if i:
            print("---")
        print(sample_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                          args.top_k, args.seed + i, device))


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Rows as left-aligned text columns under a header."""
    cells = [columns] + [[str(row[c]) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> None:
    import gptfast

    print(f"gptfast {gptfast.__version__}")
    print(f"torch   {torch.__version__}")
    try:
        import triton

        print(f"triton  {triton.__version__}")
    except ImportError:
        print("triton  not installed")
    print(f"python  {platform.python_version()} ({sys.executable})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            print(f"cuda:{i}  {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    else:
        print("cuda    none")
    print(f"cpu     {torch.get_num_threads()} threads ({os.cpu_count()} logical cores)")
    print()
    print(format_table(gptfast.backend_table(), ["op", "backend", "device", "available", "reason"]))


def cmd_build(args: argparse.Namespace) -> None:
    from . import _build

    backend = "cuda" if args.cuda else "cpu"
    start = time.perf_counter()
    try:
        module = _build.build(verbose=not args.quiet, backend=backend)
    except Exception as e:  # compiler/ninja missing or a compile error: one line, exit 1
        print(f"gptfast build: failed: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    if args.quiet:
        print(f"gptfast: native extension {module.__name__} ready in "
              f"{time.perf_counter() - start:.1f} s ({module.__file__})")
    if backend == "cuda":
        report_cuda_resources()


def report_cuda_resources() -> None:
    """The resource-usage table of the CUDA kernels; exit 1 on spills in the attention kernels."""
    from . import _build

    try:
        rows = _build.resource_usage()
    except Exception as e:
        print(f"gptfast build: cannot read the kernels' resource usage: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    for r in rows:
        r["smem (dyn)"] = "-" if r["shared_dynamic"] is None else f"{r['shared_dynamic'] / 1024:.1f} KiB"
    print("\nCUDA kernels (cuobjdump --dump-resource-usage; stack/local > 0 means register spills):")
    print(format_table(rows, ["kernel", "arch", "registers", "stack", "local", "shared_static", "smem (dyn)"]))
    bad = _build.spills(rows)
    if bad:
        names = ", ".join(f"{r['kernel']} ({r['arch']}: {r['stack']} B stack)" for r in bad)
        print(f"gptfast build: register spills in attention kernels: {names}", file=sys.stderr)
        raise SystemExit(1)
    checked = sum(_build.is_spill_checked(r["kernel"]) for r in rows)
    if checked == 0:  # a check that cannot fail would pass silently
        print("gptfast build: no attention kernel found in the resource usage", file=sys.stderr)
        raise SystemExit(1)
    print(f"no spills in the attention kernels ({checked} kernel binaries checked)")


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import BenchError, run

    try:
        rc = run(args, "gptfast " + " ".join(args.argv))
    except BenchError as e:
        print(f"gptfast bench: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if rc:
        raise SystemExit(rc)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: ``gptfast {train,sample,info,build,bench} ...``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in bench results
    handlers = {"train": cmd_train, "sample": cmd_sample, "info": cmd_info, "build": cmd_build,
                "bench": cmd_bench}
    try:
        handlers[args.command](args)
    except UserError as e:  # ConfigError, DataError, CheckpointError, TrainingDiverged
        parser.exit(e.exit_status, f"gptfast {args.command}: error: {_one_line(e)}\n")
    except TrainingInterrupted as e:  # Ctrl-C in training, after the checkpoint was written
        parser.exit(130, f"gptfast {args.command}: {e}\n")
    except KeyboardInterrupt:  # 128 + SIGINT, as a shell reports a process stopped by Ctrl-C
        parser.exit(130, f"gptfast {args.command}: interrupted\n")


def _one_line(e: BaseException) -> str:
    # A message that quotes a library's multi-line text would break the one-line promise.
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


if __name__ == "__main__":
    main()
