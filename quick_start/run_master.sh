#!/usr/bin/env bash
#SBATCH --job-name=fm-master
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=8
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
# One machine of a multi-node torchrun training (master). #SBATCH values follow upstream's node script
# (8 GPUs, 8 × 8 CPUs); sbatch options override them: sbatch -p long --gres=gpu:4 --time=2-00:00:00 ….
# Submit once on the first machine, then run_slave.sh once per other machine (any order):
#   sbatch quick_start/run_master.sh --nnodes 2 --config apps/fm9g_2b/train_configs/2.4b.json
# The master publishes its address in <checkout>/data/rendezvous/<name>.env (shared storage); the
# slaves wait for it, so nobody edits a script or logs into a node. Without slurm: bash run_master.sh ….
# Options (each also an environment variable): bash quick_start/run_master.sh --help. Everything else is
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
  echo "run_master.sh: error: cannot find the fm checkout: submit from it (cd /path/to/fm) or set FM_ROOT" >&2
  exit 2
fi
# shellcheck source=quick_start/_env.sh
source "$root/quick_start/_env.sh"
export FM_ROOT_DIR="$root"
exec python -m fm.launch node master "$@"
