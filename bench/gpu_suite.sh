#!/usr/bin/env bash
# The GPU suite: on a machine with an NVIDIA GPU and no internet, build the extension, run the GPU
# tests, measure the card's ceilings (device-to-device copy GB/s, bf16 matmul TFLOP/s), then
# `gptfast bench` every op and a GPT-2 124M training step, all into one folder
# bench/results/<date>-<gpu>/ (results.json/.csv, one <op>.txt table each, PNG plots, suite.log).
#
#   bash bench/gpu_suite.sh                          # the whole suite, ~5 min on an H200
#   bash bench/gpu_suite.sh --device cpu --dry-run   # its Python parts, planning only (tests/test_bench.py)
#   bash bench/gpu_suite.sh --out DIR                # another output folder
#
# Stage time limits (s): build 100 + tests 150 + ceilings 15 + overhead 2 x 10 + attention 100
# + options 5 x 12 + layer_norm 40 + residual 25 + gelu_ffn 40 + train 70 + train nanogpt 60 + generate 45
# + drop_in 30 = 755: a
# stage's limit is its worst case
# (most finish well inside it); the device tool's call is 600 s, so the last stages may be cut. A stage that runs
# out of time is stopped (SIGTERM, then SIGKILL 10 s later) and keeps the rows it finished: the
# bench writes results.json after every size. Grids are modest: FlashAttention's grid up to
# seqlen 8k (the 16k point is in `gptfast bench attention`'s default grid), GPT-2 widths for
# LayerNorm and GELU-FFN. Backends: triton and cuda (csrc/cuda, built for sm_90 only here to save
# build time) against eager,
# torch.compile (not for attention: compiling SDPA gives SDPA, and costs a compile per shape),
# flash_attn / Liger when installed; not reference (it builds T x T: slow and memory-bound at 8k).
# Nothing here changes the card's clocks or settings.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
unset TRITON_INTERPRET

DEVICE=""; DRY=""; OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --dry-run) DRY="--dry-run"; shift ;;
        --out) OUT="$2"; shift 2 ;;
        *) echo "gpu_suite.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
DEV_ARGS=${DEVICE:+--device $DEVICE}

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

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' /' '__')
OUT=${OUT:-bench/results/$(date -u +%Y-%m-%d)-${gpu:-${DEVICE:-gpu}}}
BENCH="$PY -m gptfast.cli bench"

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, report its exit status
    local name=$1 limit=$2; shift 2
    echo; echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@"
    local rc=$?
    echo "-- $name: exit $rc$([ $rc -eq 124 ] && echo ' (time limit reached; rows so far are kept)') in $((SECONDS - t0)) s"
}

suite() {
    echo "== gptfast GPU suite: $(date -u '+%Y-%m-%d %H:%M UTC') -> $OUT"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit \
        --format=csv 2>/dev/null || echo "nvidia-smi: not available"
    $PY -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda)"
    $PY -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not importable"
    TESTS="tests/gpu tests/test_triton_attention.py tests/test_triton_layer_norm.py tests/test_triton_gelu_ffn.py tests/test_cuda_backend.py"
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
    if [ -n "$DRY" ]; then
        echo "would run: $PY -m gptfast.cli build"
        echo "would run: $PY -m gptfast.cli build --cuda --quiet"
        echo "would run: $PY -m pytest -q -p no:cacheprovider $TESTS"
    else
        stage build 100 bash -c "$PY -m gptfast.cli build --quiet && MAX_JOBS=\$(nproc) $PY -m gptfast.cli build --cuda --quiet"
        stage tests 150 $PY -m pytest -q -p no:cacheprovider --no-header $TESTS
    fi
    stage ceilings 15 $BENCH ceilings $DEV_ARGS $DRY --out "$OUT"
    # Host time per op call on tiny CUDA tensors (the GPU idles: the host's cost is what is timed)
    for B in cuda triton; do
        stage "overhead $B" 10 $BENCH overhead $DEV_ARGS $DRY --out "$OUT/overhead-$B" --backends $B
    done
    # FlashAttention's grid to 8k: hidden 2048, heads 2048/D, batch 16384/T; causal and not
    SIZES=""
    for D in 64 128; do for T in 512 1024 2048 4096 8192; do SIZES="$SIZES $((16384 / T)),$T,$((2048 / D)),$D"; done; done
    stage attention 100 $BENCH attention $DEV_ARGS $DRY --out "$OUT" --fwd --bwd --fwd-bwd \
        --backends cuda,triton,eager,flash_attn --sizes $SIZES
    # The options real models use, at Llama-style shapes (32 heads of 128, 8 kv heads), into a
    # subfolder (one op's rows per folder): GQA alone, + Mistral's window, + Gemma-2's softcap,
    # + dropout 0.1, + BLOOM's ALiBi
    GQA="4,2048,32,128,8"
    for OPT in "" "--window 1024" "--softcap 50" "--dropout 0.1" "--alibi"; do
        stage "attention options ${OPT:-gqa}" 12 $BENCH attention $DEV_ARGS $DRY --causal \
            --out "$OUT/attention-options" --fwd-bwd --backends cuda,triton,eager,flash_attn --sizes $GQA $OPT
    done
    stage layer_norm 40 $BENCH layer_norm $DEV_ARGS $DRY --out "$OUT" --fwd --bwd --fwd-bwd \
        --backends cuda,triton,eager,compile,liger
    # The fused residual add (y, s = LN(x + r), x + r) against the add then LayerNorm, own folder
    stage "layer_norm residual" 25 $BENCH layer_norm $DEV_ARGS $DRY --residual --out "$OUT/layer_norm-residual" \
        --fwd --fwd-bwd --backends cuda,triton,eager,compile,liger
    stage gelu_ffn 40 $BENCH gelu_ffn $DEV_ARGS $DRY --out "$OUT" --fwd --bwd --fwd-bwd \
        --backends cuda,triton,eager,compile
    stage train 70 $BENCH train $DEV_ARGS $DRY --out "$OUT" --sizes gpt2,8,1024 \
        --backends cuda,triton,eager,compile
    # GPT-2 124M against a nanoGPT-structured model (bench/nanogpt.py) as is, compiled and patched
    stage "train nanogpt" 60 $BENCH train $DEV_ARGS $DRY --model nanogpt --out "$OUT/train-nanogpt" \
        --sizes gpt2,8,1024 --backends cuda,triton,eager,compile,patched
    # Greedy decoding of GPT-2 124M from a 1k..8k prompt: KV cache vs none vs HF's generate
    stage generate 45 $BENCH generate $DEV_ARGS $DRY --out "$OUT" --backends triton,hf --repeats 2 \
        --sizes gpt2,1,1024,64 gpt2,1,2048,64 gpt2,1,4096,64 gpt2,1,8192,64
    # 13 Hugging Face decoder families' training step, patched (triton) vs unpatched (sdpa / eager)
    stage drop_in 30 $BENCH drop_in $DEV_ARGS $DRY --out "$OUT" --backends triton --dtype bf16
    echo; echo "== done: $OUT"
}

if [ -n "$DRY" ]; then
    suite
else
    mkdir -p "$OUT"
    suite 2>&1 | tee "$OUT/suite.log"
    echo "saved to $OUT"
    for f in "$OUT"/*.txt; do [ -f "$f" ] && { echo; cat "$f"; }; done  # the tables last
fi
