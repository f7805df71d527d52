"""DDP on the CPU with gloo: 2 processes give the single-process gradients, and ``gptfast train``
runs under torchrun with rank 0 alone logging and checkpointing.

Both use the ``reference`` backend (the DDP logic does not depend on the backend, and it keeps
the file well under a minute on 2 cores even when the native extension would need a rebuild).
Processes talk over 127.0.0.1 only, on a free port, with bounded timeouts.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import gptfast
import gptfast.data
from gptfast import dist as gdist
from gptfast.model import GPT, GPTConfig
from gptfast.testing import assert_close

WORLD = 2
TIMEOUT_S = 90
CONFIG = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_batch(batch=8):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, CONFIG.vocab_size, (batch, CONFIG.block_size), generator=g)
    return x, torch.randint(0, CONFIG.vocab_size, (batch, CONFIG.block_size), generator=g)


def grads_after_one_step(model, x, y):
    with gptfast.use_backend("reference"):
        _, loss = model(x, y)
        loss.backward()
    raw = model.module if hasattr(model, "module") else model
    return {n: p.grad.detach().clone() for n, p in raw.named_parameters()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    info, device = gdist.setup(torch.device("cpu"))
    try:
        torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's parameters
        model = torch.nn.parallel.DistributedDataParallel(GPT(CONFIG))
        x, y = global_batch()
        shard = slice(rank * len(x) // WORLD, (rank + 1) * len(x) // WORLD)  # this rank's share
        grads = grads_after_one_step(model, x[shard], y[shard])
        torch.save({"grads": grads, "params": model.module.state_dict()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        gdist.teardown(info)


def test_two_gloo_processes_give_the_single_process_gradients(tmp_path):
    ctx = mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    torch.manual_seed(0)
    single = GPT(CONFIG)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    single.load_state_dict(results[0]["params"])  # rank 0's initial parameters, which DDP broadcast
    for name, p in results[1]["params"].items():
        assert torch.equal(p, results[0]["params"][name]), f"{name}: ranks hold different parameters"
    want = grads_after_one_step(single, *global_batch())
    for r, res in enumerate(results):
        for name, g in want.items():
            # fp32: the per-rank means averaged by all-reduce vs one mean over the whole batch
            assert_close(res["grads"][name], g, atol=1e-6, rtol=1e-5, name=f"rank {r} grad {name}")


def test_batch_rng_shards_by_rank_and_keeps_the_single_process_stream():
    one = gdist.batch_rng(7, 5).integers(0, 1 << 30, 4)
    assert np.array_equal(one, np.random.default_rng([7, 5]).integers(0, 1 << 30, 4))
    r0, r1 = (gdist.batch_rng(7, 5, r, 2).integers(0, 1 << 30, 4) for r in range(2))
    assert not np.array_equal(r0, r1)
    assert np.array_equal(r0, one)  # numpy's SeedSequence pads with zeros: rank 0 reads the 1-process batches


def test_torchrun_gptfast_train_on_two_cpu_processes(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(WORLD),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "gptfast.cli", "train", "--max-iters", "3", "--device", "cpu", "--backend", "reference",
           "--data", str(Path(gptfast.data.__file__)), "--out-dir", str(out), "--block-size", "16",
           "--batch-size", "2", "--eval-interval", "2", "--eval-iters", "1", "--sample-tokens", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stdout = proc.stdout
    # rank 0 alone logs: the banner, the two evaluations (steps 2 and 3) and the summary, once each
    assert stdout.count("data: ") == 1 and stdout.count("done: 3 steps") == 1, stdout
    assert stdout.count("saved ") == 2, stdout
    assert "64 tokens per step (2 x 1 x 16 x 2 ranks)" in stdout  # global tokens per step
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt"]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter"] == 3 and not any(k.startswith("module.") for k in ckpt["model"])
