"""Ahead-of-time compilation of every Triton kernel config for sm_80 and sm_90 (no GPU needed).

Runs ``python -m gptfast.kernels.check --arch 80 90`` in a subprocess (it must not inherit the
TRITON_INTERPRET=1 that conftest.py sets on CPU machines). The check fails when a config exceeds
the chip's shared memory or an fp16/bf16 attention or matmul kernel has no wgmma on sm_90.
Measured: ~80 s with a cold Triton cache on 2 cores, a few seconds warm.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


def _has_nvidia_backend() -> bool:
    try:
        from triton.backends import backends
        return "nvidia" in backends
    except Exception:
        return False


@pytest.mark.skipif(not _has_nvidia_backend(), reason="this triton build has no NVIDIA backend to compile for")
def test_aot_compile_sm80_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "gptfast.kernels.check", "--arch", "80", "90"],
                          capture_output=True, text=True, env=env, timeout=900)
    out = proc.stdout + proc.stderr
    print(out)  # the table, visible with -s or on failure
    assert proc.returncode == 0, out[-4000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("sm_")]
    kernels90 = {r[1] for r in rows if r[0] == "sm_90"}
    for name in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq", "ffn_mm_fwd_gelu", "ffn_mm_bwd_dh",
                 "ffn_mm_bwd_dw2", "ln_fwd", "ln_bwd", "rms_fwd", "rms_bwd", "lce_logits", "gffn_fwd",
                 "gffn_bwd_da", "gffn_bwd_dwd", "gffn_bwd_dwgu", "gffn_bwd_dx"):
        assert name in kernels90, f"{name} missing from the AOT table"
    # every fp16/bf16 attention/matmul row on sm_90 shows wgmma, on sm_80 mma
    for r in rows:
        if (r[1].startswith("attn_") and r[1] != "attn_bwd_pre" or r[1].startswith(("ffn_mm", "gffn_"))) \
                and r[2] in ("fp16", "bf16"):
            assert ("wgmma" if r[0] == "sm_90" else "mma") in r, " ".join(r)
