"""The CPU benchmark: ``gptfast bench`` for every op and a training step, default CPU grids.

A thin wrapper over ``gptfast.bench`` (the one benchmark implementation): the ``cpu`` and
``reference`` backends against PyTorch eager and ``torch.compile``, each checked against a float64
ground truth before it is timed with ``torch.utils.benchmark`` medians. Writes results.json,
results.csv, one <op>.txt table per op and PNG plots to ``bench/results/cpu-<date>/``.

    python bench/bench_cpu.py                      # every op (a few minutes each on 2 cores)
    python bench/bench_cpu.py --ops attention train
    python bench/bench_cpu.py --threads 1 --out /tmp/cpu1

The earlier, hand-rolled version of this script wrote ``bench/results/cpu_2026-11-28.md``; that
file is kept as a record of the numbers quoted at the time.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

from gptfast import bench

ROOT = Path(__file__).resolve().parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", nargs="+", default=list(bench.OPS), choices=bench.OPS)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None, help="output folder (default bench/results/cpu-<date>)")
    parser.add_argument("--dry-run", action="store_true", help="print the plans only")
    args, rest = parser.parse_known_args(argv)  # anything else goes to gptfast bench (e.g. --backends)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or str(ROOT / "results" / f"cpu-{datetime.date.today().isoformat()}")
    rc = 0
    for op in args.ops:
        rc |= bench.main([op, "--device", "cpu", "--out", out, *rest] + (["--dry-run"] if args.dry_run else []))
    return rc


if __name__ == "__main__":
    sys.exit(main())
