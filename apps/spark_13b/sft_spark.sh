#!/usr/bin/env bash
# Launch iFlytekSpark-13B fine-tuning with torchrun: full SFT, or LoRA with --lora (PEFT adapters only).
# Topology comes from the environment (defaults in brackets); hyperparameters live in the train config JSON, never here.
#   GPUS_PER_NODE  processes on this node   [GPUs: SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES or nvidia-smi; else 1]
#   NNODES         number of machines       [1]
#   NODE_RANK      this machine's rank      [$RANK, else 0]   (0 = master, 1, 2, … = slaves)
#   MASTER_ENDPOINT master host name        [localhost]
#   MASTER_PORT    master port              [a free port on one node, else 12345]
#   TRAIN_CONFIG   train config JSON        [train_configs/13b_sft.json; with --lora 13b_lora.json]; a --config X.json argument
#                  given to this script replaces it
# Usage: bash apps/spark_13b/sft_spark.sh [--dry-run] [--lora] [--key value …]
# Every --key value overrides one key of the train config, e.g. --train_iters 100 --engine fsdp.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

dry_run=0
lora=0
args=()
is_train_config() { [ -f "$1" ] && grep -qE '"(model_unique|train_iters|dataset_config)"' "$1"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --lora) if [ $# -gt 1 ] && [[ "$2" != --* ]]; then args+=("$1" "$2"); shift; else lora=1; fi ;;
    --config|--train_config)
      if [ $# -gt 1 ] && { [ "$1" = --train_config ] || is_train_config "$2"; }; then TRAIN_CONFIG="$2"; else args+=("$1" "${2:-}"); fi
      [ $# -gt 1 ] && shift ;;
    *) args+=("$1") ;;
  esac
  shift
done

if [ "$lora" = "1" ]; then
  TRAIN_CONFIG="${TRAIN_CONFIG:-apps/spark_13b/train_configs/13b_lora.json}"
  args+=(--lora true)
else
  TRAIN_CONFIG="${TRAIN_CONFIG:-apps/spark_13b/train_configs/13b_sft.json}"
fi

# shellcheck source=quick_start/torchrun_cmd.sh
source quick_start/torchrun_cmd.sh
fm_torchrun_cmd apps/spark_13b/sft_spark.py --config "$TRAIN_CONFIG" ${args[@]+"${args[@]}"}
cmd=("${FM_TORCHRUN_CMD[@]}")

printf '%q ' "${cmd[@]}"
echo
if [ "$dry_run" = "1" ]; then
  exit 0
fi
# shellcheck disable=SC1091
source quick_start/_env.sh
exec "${cmd[@]}"
