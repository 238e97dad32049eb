#!/usr/bin/env bash
# Launch iFlytekSpark-13B pretraining with torchrun (same trainer and engines as dragonfly).
# Topology comes from the environment (defaults in brackets); hyperparameters live in the train config JSON, never here.
#   GPUS_PER_NODE  processes on this node   [GPUs: SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES or nvidia-smi; else 1]
#   NNODES         number of machines       [1]
#   NODE_RANK      this machine's rank      [$RANK, else 0]   (0 = master, 1, 2, … = slaves)
#   MASTER_ENDPOINT master host name        [localhost]
#   MASTER_PORT    master port              [a free port on one node, else 12345]
#   TRAIN_CONFIG   train config JSON        [apps/spark_13b/train_configs/13b_pretrain.json]; a --config X.json argument
#                  given to this script replaces it
# Usage: bash apps/spark_13b/pretrain_spark.sh [--dry-run] [--help] [--key value …]
# Every --key value overrides one key of the train config, e.g. --train_iters 100 --engine fsdp.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
# shellcheck source=quick_start/_env.sh
source quick_start/_env.sh
exec python -m fm.launch app apps/spark_13b/pretrain_spark.py apps/spark_13b/train_configs/13b_pretrain.json \
  --family=spark --prog=apps/spark_13b/pretrain_spark.sh -- "$@"
