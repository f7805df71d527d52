"""FSDP2 (``torch.distributed.fsdp.fully_shard``) around a gptfast GPT: one training step on one GPU.

A world of one process (NCCL over 127.0.0.1) is enough to check that gptfast's ops run on the
DTensor-backed parameters fully_shard installs and gathers: the loss is finite, equals the
unwrapped model's, and one AdamW step changes every parameter. Skipped without a GPU.
"""
from __future__ import annotations

import copy
import math
import os
import socket

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (none visible)"),
]


@pytest.fixture
def one_rank_process_group():
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-params"])
def test_fully_shard_gptfast_gpt_one_step(one_rank_process_group, bf16):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from gptfast.model import GPT, GPTConfig

    torch.manual_seed(0)
    device = torch.device("cuda", 0)
    model = GPT(GPTConfig(block_size=128, vocab_size=256, n_layer=2, n_head=4, n_embd=128)).to(device)
    plain = copy.deepcopy(model)
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
          else MixedPrecisionPolicy())
    for block in model.transformer.h:  # one FSDP unit per block, then the root (embeddings, ln_f, head)
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (4, 128), device=device)
    y = torch.randint(0, 256, (4, 128), device=device)
    before = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    _, loss = model(x, y)
    assert math.isfinite(loss.item())
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        _, want = plain(x, y)
    assert abs(loss.item() - want.item()) <= (2e-2 if bf16 else 1e-4), (loss.item(), want.item())
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        assert torch.isfinite(p.full_tensor()).all(), n
        assert not torch.equal(p.full_tensor(), before[n]), f"{n} did not change"
