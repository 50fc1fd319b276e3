#!/usr/bin/env bash
# Generate and save rollout batches without training: check prompts, sampling, rewards.
# Batches go to $RUN_DIR/rollouts/step_XXXXX_rankR.jsonl (one Sample per line).
#   MODEL=/ckpt/Qwen3-0.6B bash examples/gsm8k/debug_rollout_only.sh --steps 2
set -euo pipefail
source "$(dirname "$0")/_common.sh"
RUN_DIR=${RUN_DIR:-runs/gsm8k_debug}
exec python examples/gsm8k/train.py "$PRESET" --model "$MODEL" --run-dir "$RUN_DIR" \
  --debug-mode rollout_only --steps 2 "$@"
