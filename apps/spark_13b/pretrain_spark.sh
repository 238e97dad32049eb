#!/usr/bin/env bash
# Launch iFlytekSpark-13B pretraining with torchrun (same trainer and engines as dragonfly).
# Topology comes from the environment (defaults in brackets); hyperparameters live in the train config JSON, never here.
#   GPUS_PER_NODE  processes on this node   [number of GPUs from nvidia-smi, else 1]
#   NNODES         number of machines       [1]
#   NODE_RANK      this machine's rank      [$RANK, else 0]   (0 = master, 1, 2, … = slaves)
#   MASTER_ENDPOINT master host name        [localhost]
#   MASTER_PORT    master port              [a free port on one node, else 12345]
#   TRAIN_CONFIG   train config JSON        [apps/spark_13b/train_configs/13b_pretrain.json]; a --config X.json argument
#                  given to this script replaces it
# Usage: bash apps/spark_13b/pretrain_spark.sh [--dry-run] [--key value …]
# Every --key value overrides one key of the train config, e.g. --train_iters 100 --engine fsdp.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

dry_run=0
args=()
is_train_config() { [ -f "$1" ] && grep -qE '"(model_unique|train_iters|dataset_config)"' "$1"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --config|--train_config)
      if [ $# -gt 1 ] && { [ "$1" = --train_config ] || is_train_config "$2"; }; then TRAIN_CONFIG="$2"; else args+=("$1" "${2:-}"); fi
      [ $# -gt 1 ] && shift ;;
    *) args+=("$1") ;;
  esac
  shift
done

if [ -z "${GPUS_PER_NODE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && n="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')" && [ "$n" -gt 0 ]; then
    GPUS_PER_NODE="$n"
  else
    GPUS_PER_NODE=1
  fi
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-${RANK:-0}}"
MASTER_ENDPOINT="${MASTER_ENDPOINT:-localhost}"
if [ -z "${MASTER_PORT:-}" ]; then
  if [ "$NNODES" = "1" ]; then
    # One node: any free port avoids clashes between jobs sharing the machine.
    MASTER_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')"
  else
    MASTER_PORT=12345  # every node must agree: set MASTER_PORT explicitly across nodes
  fi
fi
TRAIN_CONFIG="${TRAIN_CONFIG:-apps/spark_13b/train_configs/13b_pretrain.json}"

cmd=(torchrun --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE" --node_rank="$NODE_RANK"
  --rdzv_id=1 --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ENDPOINT:$MASTER_PORT"
  --signals-to-handle="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
  apps/spark_13b/pretrain_spark.py --config "$TRAIN_CONFIG" ${args[@]+"${args[@]}"})

printf '%q ' "${cmd[@]}"
echo
if [ "$dry_run" = "1" ]; then
  exit 0
fi
# shellcheck disable=SC1091
source quick_start/_env.sh
exec "${cmd[@]}"
