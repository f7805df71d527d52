"""Quick Triton-vs-PyTorch comparison on one NVIDIA GPU, bf16: a thin wrapper over ``gptfast bench``
(the one benchmark implementation; the full suite is ``bench/gpu_suite.sh``).

    python bench/gpu_check.py [--out DIR]    # a few GPT-2-like shapes per op, fwd and fwd+bwd

Each backend is checked against a float64 ground truth before it is timed (CUDA events,
``triton.testing.do_bench`` median); the tables carry GPU, versions and date.
"""
from __future__ import annotations

import argparse
import sys

import torch

from gptfast import bench

RUNS = [
    ["attention", "--causal", "--backends", "triton,eager", "--sizes", "8,1024,12,64", "4,2048,16,128", "2,4096,8,256"],
    ["layer_norm", "--backends", "triton,eager", "--sizes", "8192,768", "8192,4096", "1024,65536"],
    ["gelu_ffn", "--backends", "triton,eager", "--sizes", "8192,768", "8192,1024", "4096,2048"],
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="also write results.json/.csv and plots here")
    parser.add_argument("--dry-run", action="store_true", help="print the plan only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.dry_run:
        print("gpu_check.py: no CUDA GPU visible", file=sys.stderr)
        return 1
    rc = 0
    for run in RUNS:
        extra = ["--device", "cuda", "--fwd", "--fwd-bwd"] + (["--out", args.out] if args.out else [])
        rc |= bench.main(run + extra + (["--dry-run"] if args.dry_run else []))
    return rc


if __name__ == "__main__":
    sys.exit(main())
