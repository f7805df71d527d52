#!/usr/bin/env bash
# One-shot GPU check for the Triton backend (no internet needed): AOT table for this GPU, the GPU
# test module plus the Triton CPU-suite tests (now on CUDA tensors), then timings vs PyTorch in bf16.
# Stage timeouts (120 + 270 + 150 s) keep one run inside the device tool's 10-minute call limit.
# Writes everything to bench/results/gpu_check-<date>-<gpu>.txt as well as stdout. A few minutes on
# an H100/H200 (most of it Triton compilation and autotuning; reruns hit ~/.triton/cache).
#
#   bash bench/gpu_check.sh            # uses `python` on PATH (or $PYTHON)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
unset TRITON_INTERPRET

# gptfast.kernels lives in ./kernels and is mapped into the package by setup.py: make it importable.
if ! $PY -c "import gptfast.kernels" 2>/dev/null; then
    $PY -m pip install -q -e . --no-deps --no-build-isolation 2>/dev/null || true
fi
if ! $PY -c "import gptfast.kernels" 2>/dev/null; then
    SHIM=$(mktemp -d)/shim; mkdir -p "$SHIM/gptfast"
    for f in "$PWD"/gptfast/*; do ln -s "$f" "$SHIM/gptfast/"; done
    ln -s "$PWD/kernels" "$SHIM/gptfast/kernels"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '_')
mkdir -p bench/results
out="bench/results/gpu_check-$(date -u +%Y%m%d-%H%M)-${gpu:-gpu}.txt"
{
    echo "== gptfast Triton GPU check: $(date -u '+%Y-%m-%d %H:%M UTC')"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
    $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
    cap=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(10 * m + n)")
    echo; echo "== AOT compile check (sm_$cap)"
    arch=$([ "$cap" -ge 90 ] && echo 90 || echo 80)
    timeout 120 $PY -m gptfast.kernels.check --arch "$arch"; echo "check exit: $?"
    echo; echo "== tests (GPU module + Triton CPU-suite tests on CUDA)"
    timeout 270 $PY -m pytest -q -p no:cacheprovider tests/gpu tests/test_triton_attention.py \
        tests/test_triton_layer_norm.py tests/test_triton_gelu_ffn.py 2>&1 | tail -25
    echo "pytest exit: ${PIPESTATUS[0]}"
    echo; echo "== timings"
    timeout 150 $PY bench/gpu_check.py; echo "bench exit: $?"
} 2>&1 | tee "$out"
echo "saved to $out"
