#!/usr/bin/env bash
# Launch dragonfly pretraining with torchrun (same as `fm train`). Topology comes from the environment (defaults
# in brackets); hyperparameters live in the train config JSON, never here.
#   GPUS_PER_NODE  processes on this node   [GPUs: SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES or nvidia-smi; else 1]
#   NNODES         number of machines       [1]
#   NODE_RANK      this machine's rank      [$RANK, else 0]   (0 = master, 1, 2, … = slaves)
#   MASTER_ENDPOINT master host name        [localhost]
#   MASTER_PORT    master port              [a free port on one node, else 12345]
#   TRAIN_CONFIG   train config JSON        [apps/fm9g_2b/train_configs/2.4b.json]; a --config X.json argument
#                  given to this script replaces it
# Usage: bash apps/fm9g_2b/pretrain_dragonfly.sh [--dry-run] [--help] [--key value …]
# Every --key value overrides one key of the train config, e.g. --train_iters 100 --engine fsdp. Everything is
# checked before torchrun starts (fm.launch, fm.train.preflight).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
# shellcheck source=quick_start/_env.sh
source quick_start/_env.sh
exec python -m fm.launch app apps/fm9g_2b/pretrain_dragonfly.py apps/fm9g_2b/train_configs/2.4b.json \
  --prog=apps/fm9g_2b/pretrain_dragonfly.sh -- "$@"
