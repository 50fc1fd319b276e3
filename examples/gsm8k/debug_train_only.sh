#!/usr/bin/env bash
# Train from the batches debug_rollout_only.sh saved, with no engine: check the trainer, the
# loss and the on-policy assertion in isolation. Use the same --steps and the same number of
# processes as the rollout-only run (files are per step and rank).
#   MODEL=/ckpt/Qwen3-0.6B bash examples/gsm8k/debug_train_only.sh --steps 2
set -euo pipefail
source "$(dirname "$0")/_common.sh"
RUN_DIR=${RUN_DIR:-runs/gsm8k_debug}
if ! ls "$RUN_DIR"/rollouts/step_*.jsonl >/dev/null 2>&1; then
  echo "no saved batches in $RUN_DIR/rollouts: run examples/gsm8k/debug_rollout_only.sh first" >&2
  exit 1
fi
exec python examples/gsm8k/train.py "$PRESET" --model "$MODEL" --run-dir "$RUN_DIR/train_only" \
  --debug-mode train_only --rollout-dir "$RUN_DIR/rollouts" --steps 2 "$@"
