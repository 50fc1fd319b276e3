#!/usr/bin/env bash
# GRPO on GSM8K with rollout on standalone servers (disaggregated). One node: the first
# SERVERS GPUs each run `miles-fsdp serve`, the other GPUs train (torchrun); each step the
# trainer writes the weights to WEIGHTS_DIR and the servers load them (each server is started
# with --weights-root WEIGHTS_DIR: /update_weights loads nothing outside it).
#   MODEL=/ckpt/Qwen3-4B PRESET=qwen3-4b SERVERS=2 bash examples/gsm8k/run_disaggregated.sh
# Servers elsewhere: start `miles-fsdp serve --model $MODEL --host 0.0.0.0 --port 8000
# --weights-root $WEIGHTS_DIR` on each machine, then pass SERVER_URLS="http://hostA:8000
# http://hostB:8000" and that WEIGHTS_DIR, on a filesystem those machines mount at the same path.
# `export MILES_API_KEY=...` first to make the servers require that key (the trainer sends it);
# do so whenever a server listens beyond 127.0.0.1. Extra flags override the preset.
#
#   SERVERS       GPUs of this node that serve (default 1; ignored with SERVER_URLS)
#   SERVER_URLS   space-separated URLs of running servers (default: start SERVERS local ones)
#   PORT0         first local server port (default 8100)
#   RUN_DIR       run directory (default runs/gsm8k_disaggregated)
#   WEIGHTS_DIR   where each step's weights go (default RUN_DIR/weights); the servers' --weights-root
#   LOG_DIR       local servers' logs (default RUN_DIR.servers: beside the run directory, which the
#                 trainer requires empty unless --resume or --overwrite)
#   MILES_API_KEY optional key the servers require and the trainer sends
set -euo pipefail
source "$(dirname "$0")/_common.sh"
GPUS=$(nvidia-smi -L | wc -l)
SERVERS=${SERVERS:-1}
PORT0=${PORT0:-8100}
RUN_DIR=${RUN_DIR:-runs/gsm8k_disaggregated}
WEIGHTS_DIR=${WEIGHTS_DIR:-$RUN_DIR/weights}
LOG_DIR=${LOG_DIR:-$RUN_DIR.servers}
URLS=${SERVER_URLS:-}
TRAIN_GPUS=$(seq -s, 0 $((GPUS - 1)))
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
if [ -z "$URLS" ]; then
  if [ "$SERVERS" -ge "$GPUS" ]; then
    echo "SERVERS=$SERVERS leaves none of this node's $GPUS GPUs for training; lower SERVERS" >&2
    exit 1
  fi
  mkdir -p "$LOG_DIR"
  for i in $(seq 0 $((SERVERS - 1))); do
    CUDA_VISIBLE_DEVICES=$i miles-fsdp serve --model "$MODEL" --port $((PORT0 + i)) --log-level warning \
      --weights-root "$WEIGHTS_DIR" > "$LOG_DIR/server$i.log" 2>&1 &
    PIDS+=($!)
    URLS="$URLS http://127.0.0.1:$((PORT0 + i))"
  done
  for i in $(seq 0 $((SERVERS - 1))); do
    until curl -sf "http://127.0.0.1:$((PORT0 + i))/health" > /dev/null; do
      if ! kill -0 "${PIDS[$i]}" 2> /dev/null; then
        echo "server $i exited while starting; see $LOG_DIR/server$i.log" >&2
        exit 1
      fi
      sleep 2
    done
  done
  TRAIN_GPUS=$(seq -s, "$SERVERS" $((GPUS - 1)))
fi
NPROC=$(echo "$TRAIN_GPUS" | tr ',' '\n' | wc -l)
# shellcheck disable=SC2086  # URLS is a list
CUDA_VISIBLE_DEVICES=$TRAIN_GPUS torchrun --standalone --nproc-per-node "$NPROC" \
  examples/gsm8k/train.py "$PRESET" --model "$MODEL" --run-dir "$RUN_DIR" \
  --rollout.servers $URLS --rollout.weights-dir "$WEIGHTS_DIR" "$@"
