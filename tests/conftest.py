"""Shared test configuration.

Without a CUDA GPU the Triton kernels can only run in Triton's interpreter, which must be
switched on before any kernel module is imported: do it here, first.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (none visible)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _isolate_backend_selection(monkeypatch):
    """A test's GPTFAST_BACKEND must not leak into the next one (nor the caller's shell into tests)."""
    monkeypatch.delenv("GPTFAST_BACKEND", raising=False)
    yield


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
