"""Shared setup of the GPU-only tests (tests/gpu/*): skipped without a GPU (tests/conftest.py)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the CPU test modules' check helpers

# Tests that let the Triton kernels autotune; every other test uses each config list's first entry.
TRITON_AUTOTUNED = {"test_attention_deterministic_backward_20_runs", "test_attention_race_large_batch",
                    "test_gelu_ffn_autotuned_bias_grad", "test_gated_ffn_autotuned_bias_grads"}


@pytest.fixture(autouse=True)
def _first_triton_config_only(monkeypatch, request):
    # Autotuning every (head dim, causal, dtype) of the grid compiles ~400 Triton kernel variants;
    # correctness tests use each list's first config, the race/determinism tests and
    # bench/gpu_check.py autotune. (All configs compile: gptfast.kernels.check.) No effect on cuda.
    if request.node.originalname not in TRITON_AUTOTUNED:
        monkeypatch.setenv("GPTFAST_TRITON_AUTOTUNE", "0")
