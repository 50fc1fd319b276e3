#!/usr/bin/env bash
# GRPO on GSM8K over all GPUs of one or more nodes (torchrun, one process per GPU).
#
# One node, 8 GPUs:
#   MODEL=/ckpt/Qwen3-8B PRESET=qwen3-8b bash examples/gsm8k/run_multi_gpu.sh
# Two nodes: run on every node, same MODEL/PRESET, the checkpoint and data at the same paths:
#   MASTER_ADDR=<node 0 hostname or IP> NNODES=2 NODE_RANK=<0 or 1> MODEL=... bash examples/gsm8k/run_multi_gpu.sh
#
#   MASTER_ADDR   address of node 0, reachable from all nodes (default localhost: one node)
#   MASTER_PORT   free TCP port on node 0 (default 29500)
#   NNODES        number of nodes (default 1)
#   NODE_RANK     this node's index, 0..NNODES-1 (default 0)
#   GPUS_PER_NODE processes per node (default: all visible GPUs)
set -euo pipefail
source "$(dirname "$0")/_common.sh"
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}
if [ "$NNODES" -gt 1 ] && [ "$MASTER_ADDR" = localhost ]; then
  echo "NNODES=$NNODES but MASTER_ADDR is localhost: set MASTER_ADDR to node 0's address on every node" >&2
  exit 1
fi
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  examples/gsm8k/train.py "$PRESET" --model "$MODEL" "$@"
