#!/usr/bin/env bash
# Superseded by bench/gpu_suite.sh (build, GPU tests, ceilings, every op and a GPT-2 training step,
# into bench/results/<date>-<gpu>/); kept so that old instructions still work.
exec bash "$(dirname "$0")/gpu_suite.sh" "$@"
