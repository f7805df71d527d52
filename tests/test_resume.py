"""Resuming is bit-exact across processes, with dropout on (issue 11, item 6).

The in-process test in test_train.py cannot see RNG draws made once per process (``peak_flops``
is cached): here each run is its own ``gptfast train`` process, as on a real machine. The tiny
model at a 32-token context, batch 4, six steps: each process takes a few seconds.
"""
import os
import subprocess
import sys
from pathlib import Path

import torch

import gptfast.data
from gptfast.train import measure_matmul_flops

CORPUS = str(Path(gptfast.data.__file__))
# --lr-decay-iters pins the schedule to the full run's, so the first half is the same 3 steps.
# The reference backend: bit-exactness is a property of the loop, and it needs no native build.
COMMON = ["--data", CORPUS, "--device", "cpu", "--backend", "reference", "--block-size", "32",
          "--batch-size", "4", "--dropout", "0.1", "--lr-decay-iters", "6", "--eval-iters", "1",
          "--sample-tokens", "0", "--quiet"]


def _env() -> dict:
    # One thread: the 2-core machine is shared, and the runs should not depend on thread timing.
    return {**os.environ, "OMP_NUM_THREADS": "1", "GPTFAST_BACKEND": ""}


def _train(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gptfast.cli", "train", *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"gptfast train failed ({proc.returncode}):\n{out}\n{err}"


def test_resume_in_a_new_process_is_bitwise_a_straight_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # The uninterrupted run and the first half are independent: run them side by side.
    runs = [_train(*COMMON, "--out-dir", str(straight), "--max-iters", "6", "--eval-interval", "3"),
            _train(*COMMON, "--out-dir", str(resumed), "--max-iters", "3", "--eval-interval", "3")]
    for proc in runs:
        _finish(proc)
    _finish(_train("--resume", "--out-dir", str(resumed), "--max-iters", "6"))

    a = torch.load(straight / "ckpt.pt", weights_only=True)
    b = torch.load(resumed / "ckpt.pt", weights_only=True)
    assert a["iter"] == b["iter"] == 6 and a["model_args"]["dropout"] == 0.1
    for name, p in a["model"].items():
        assert torch.equal(p, b["model"][name]), f"{name} differs after resuming in a new process"
    for i, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][i][key]), f"optimizer state {i}.{key}"
    assert torch.equal(a["rng"]["cpu"], b["rng"]["cpu"])
    assert a["val_loss"] == b["val_loss"]


def test_the_matmul_measurement_does_not_move_the_torch_rng():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    measure_matmul_flops(torch.device("cpu"), torch.float32, seconds=0.01)
    assert torch.equal(torch.get_rng_state(), before)
