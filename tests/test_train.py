"""The training loop: learning, the schedule, checkpoints and exact resumption.

Runs train on this repository's own source (a few KB of Python) with the tiny model at a
short context, so that each run takes about a second on 2 CPU cores.
"""
import math
from pathlib import Path

import pytest
import torch

import gptfast.data
from gptfast.model import GPT
from gptfast.train import (TRAIN_PRESETS, ConfigError, TrainConfig, load_checkpoint, lr_at,
                           measure_matmul_flops, model_from_checkpoint, sample_text, train)

CORPUS = str(Path(gptfast.data.__file__))


def small_run(out_dir, **overrides) -> TrainConfig:
    options = dict(data=CORPUS, out_dir=str(out_dir), preset="tiny", device="cpu", block_size=32,
                   batch_size=8, max_iters=30, eval_interval=30, eval_iters=2, sample_tokens=0,
                   quiet=True)
    return TrainConfig(**{**options, **overrides})


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    cfg = TrainConfig(lr=1.0, warmup_iters=10, max_iters=110).resolved()
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_at(110, cfg) == lr_at(500, cfg) == pytest.approx(0.1)
    assert all(lr_at(i, cfg) >= lr_at(i + 1, cfg) for i in range(10, 120))


def test_tiny_model_loss_drops_in_30_steps(tmp_path):
    result = train(small_run(tmp_path))
    # An untrained byte-level model predicts ~uniformly: loss log(256) = 5.55 nats.
    assert result.val_loss < math.log(256) - 1.5
    assert result.train_loss < math.log(256) - 1.5
    assert result.tokens_per_sec > 0 and 0 < result.mfu < 2


def test_checkpoint_holds_what_resume_and_sample_need(tmp_path):
    result = train(small_run(tmp_path, max_iters=4, eval_interval=2))
    ckpt = load_checkpoint(tmp_path)  # weights_only: plain values and tensors only
    assert ckpt["iter"] == 4 and ckpt["val_loss"] == pytest.approx(result.val_loss)
    assert ckpt["best_val_loss"] <= ckpt["val_loss"]
    assert ckpt["tokenizer"]["kind"] == "bytes" and ckpt["model_args"]["block_size"] == 32
    assert ckpt["train_args"]["max_iters"] == 4 and ckpt["train_args"]["lr"] is None
    assert ckpt["train_config"]["lr"] == TRAIN_PRESETS["tiny"]["lr"]
    model, tokenizer = model_from_checkpoint(ckpt)
    # The checkpoint is also a nanoGPT-style file that GPT.from_pretrained_file reads.
    other = GPT.from_pretrained_file(tmp_path / "ckpt.pt")
    for (name, p), q in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(p, q), name
    text = sample_text(model, tokenizer, "def ", max_new_tokens=20, seed=3)
    assert text.startswith("def ") and text == sample_text(model, tokenizer, "def ", 20, seed=3)


def test_resume_gives_bitwise_the_same_parameters_as_a_straight_run(tmp_path):
    # Dropout on, so that restoring the torch RNG matters; the schedule ends at step 12 in both.
    straight = small_run(tmp_path / "straight", max_iters=12, eval_interval=4, dropout=0.1,
                         lr_decay_iters=12)
    train(straight)
    train(small_run(tmp_path / "resumed", max_iters=8, eval_interval=4, dropout=0.1, lr_decay_iters=12))
    # Only what changes is given: the rest comes from the checkpoint's run.
    result = train(TrainConfig(out_dir=str(tmp_path / "resumed"), resume=True, max_iters=12))
    assert result.iter == 12 and result.config.dropout == 0.1 and result.config.batch_size == 8
    a = load_checkpoint(tmp_path / "straight")
    b = load_checkpoint(tmp_path / "resumed")
    assert a["iter"] == b["iter"] == 12
    for name, p in a["model"].items():
        assert torch.equal(p, b["model"][name]), f"{name} differs after resuming"
    assert a["val_loss"] == b["val_loss"]


def test_resume_rejects_a_different_model_shape_and_a_missing_checkpoint(tmp_path):
    train(small_run(tmp_path, max_iters=2, eval_interval=2))
    with pytest.raises(ConfigError, match="block-size 64 differs from the checkpoint's 32"):
        train(TrainConfig(out_dir=str(tmp_path), resume=True, block_size=64))
    with pytest.raises(ConfigError, match="no checkpoint at"):
        train(TrainConfig(out_dir=str(tmp_path / "nowhere"), resume=True))


def test_resume_checks_shape_options_against_the_model_even_when_they_were_defaults(tmp_path):
    """A first run that left block size and preset to the preset's defaults still pins them:
    a different --block-size/--preset on --resume is an error, the model's own value is accepted."""
    first = small_run(tmp_path, max_iters=2, eval_interval=2, block_size=None, preset=None, batch_size=2)
    train(first)
    with pytest.raises(ConfigError, match="block-size 32 differs from the checkpoint's 128"):
        train(TrainConfig(out_dir=str(tmp_path), resume=True, block_size=32, max_iters=3))
    with pytest.raises(ConfigError, match="preset small differs from the checkpoint's tiny"):
        train(TrainConfig(out_dir=str(tmp_path), resume=True, preset="small", max_iters=3))
    result = train(TrainConfig(out_dir=str(tmp_path), resume=True, block_size=128, max_iters=3))
    assert result.iter == 3


def test_resume_past_max_iters_only_evaluates(tmp_path):
    first = train(small_run(tmp_path, max_iters=2, eval_interval=2))
    again = train(TrainConfig(out_dir=str(tmp_path), resume=True))
    assert again.iter == 2 and again.val_loss == first.val_loss


@pytest.mark.parametrize("options, message", [
    (dict(preset="huge"), "unknown --preset 'huge'"),
    (dict(dtype="float16"), "float16 needs a CUDA device"),
    (dict(dtype="int8"), "--dtype must be one of"),
    (dict(backend="bogus"), "--backend 'bogus': unknown"),
    (dict(batch_size=0), "--batch-size must be >= 1"),
    (dict(lr=math.inf), r"--lr must be a finite number > 0, got inf"),
    (dict(dropout=1.0), r"--dropout must be in \[0, 1\), got 1.0"),
    (dict(device="meta"), "--device meta: gptfast runs on cpu or cuda devices, not meta"),
])
def test_bad_options_raise_a_clear_error(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        train(small_run(tmp_path, **options))


def test_measured_matmul_throughput_is_plausible():
    flops = measure_matmul_flops(torch.device("cpu"), torch.float32, seconds=0.05)
    assert 1e8 < flops < 1e14
