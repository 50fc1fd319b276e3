#!/usr/bin/env bash
# GRPO on GSM8K, one GPU. Extra flags override the preset, e.g. --steps 50.
#   MODEL=/ckpt/Qwen3-0.6B bash examples/gsm8k/run_1gpu.sh
set -euo pipefail
source "$(dirname "$0")/_common.sh"
exec python examples/gsm8k/train.py "$PRESET" --model "$MODEL" "$@"
