"""Multi-process (DDP) plumbing for ``gptfast train`` under ``torchrun``.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; with WORLD_SIZE > 1 :func:`setup` joins the
process group (NCCL on CUDA, gloo on the CPU) and pins each rank to its local GPU. Without
torchrun everything here is a no-op and ``gptfast train`` runs exactly as a single process.

Data sharding: each rank draws its own micro-batches from ``batch_rng(seed, it, rank, world)``;
with one process that is ``default_rng([seed, it])``, the single-process stream, unchanged (and,
as numpy's SeedSequence pads keys with zeros, rank 0 of a multi-process run reads those batches too).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["DistInfo", "setup", "teardown", "batch_rng", "all_mean"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    initialized_here: bool = False   # setup() created the process group, teardown() destroys it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group if there is one; returns (info, this rank's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    created = False
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", **kwargs)
        created = True
    return DistInfo(rank, local_rank, world, created), device


def teardown(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def batch_rng(seed: int, it: int, rank: int = 0, world_size: int = 1) -> np.random.Generator:
    """The generator for training step ``it`` on ``rank``: a pure function of its arguments, so
    resumed runs see the same batches; one process keeps the single-process stream."""
    return np.random.default_rng([seed, it] if world_size == 1 else [seed, it, rank])


def all_mean(value: float, info: DistInfo, device: torch.device) -> float:
    """The mean of a Python float over ranks (the value itself on one process)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)  # SUM: gloo has no AVG
    return float(t.item()) / info.world_size
