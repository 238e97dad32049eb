#!/usr/bin/env bash
#SBATCH --job-name=fm-slave
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=8
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
# One machine of a multi-node torchrun training (slave). #SBATCH values follow upstream's node script
# (8 GPUs, 8 × 8 CPUs); sbatch options override them: sbatch -p long --gres=gpu:4 --time=2-00:00:00 ….
# Submit once per other machine (NODE_RANK 1, 2, …), before or after the master:
#   sbatch quick_start/run_slave.sh --node-rank 1 --config apps/fm9g_2b/train_configs/2.4b.json
# It waits (RDZV_TIMEOUT, 1800 s) for the master's rendezvous file <checkout>/data/rendezvous/<name>.env
# on shared storage, takes NNODES and the address from it, then joins. Without slurm: bash run_slave.sh ….
# Options (each also an environment variable): bash quick_start/run_slave.sh --help. Everything else is
# passed to the app launcher as train config overrides (--train_iters 1000 --save /shared/ckpt).
# Preemption: slurm sends USR1 120 s before the time limit (--signal=B:USR1@120; needs --time) and
# `scancel --batch --signal=USR1 JOB` does it by hand; this script forwards it to the training processes,
# which checkpoint and exit 0. With --requeue (REQUEUE=1) the job then requeues itself and resumes from the
# latest checkpoint (train config: "resume_ckpt": "latest"). See docs/multinode.md.
set -euo pipefail

# Under sbatch this file runs from slurm's spool directory: find the checkout from FM_ROOT, this file's
# directory, or the submit directory (or its parents).
root=""
for d in "${FM_ROOT:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-$PWD}" \
  "${SLURM_SUBMIT_DIR:-$PWD}/.." "${SLURM_SUBMIT_DIR:-$PWD}/../.."; do
  if [ -n "$d" ] && [ -f "$d/quick_start/torchrun_cmd.sh" ]; then
    root="$(cd "$d" && pwd)"
    break
  fi
done
if [ -z "$root" ]; then
  echo "run_slave.sh: error: cannot find the fm checkout: submit from it (cd /path/to/fm) or set FM_ROOT" >&2
  exit 2
fi
# shellcheck source=quick_start/_env.sh
source "$root/quick_start/_env.sh"
export FM_ROOT_DIR="$root"
exec python -m fm.launch node slave "$@"
