#!/usr/bin/env bash
# The per-node steps of quick_start/train_multinode.sbatch (srun runs them on every node); the logic is Python
# (fm/launch/: the torchrun command, signal forwarding, the rendezvous file, requeue), unit-tested there.
#   bash quick_start/torchrun_cmd.sh run-node CMD [ARGS…]   run CMD, forwarding USR1/TERM/INT/HUP to its workers
#   bash quick_start/torchrun_cmd.sh signal-node SIG        signal the training workers of this node's run-node
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=quick_start/_env.sh
source "$root/quick_start/_env.sh"
export FM_ROOT_DIR="$root"
case "${1:-}" in
  run-node|signal-node) exec python -m fm.launch "$@" ;;
  *) echo "usage: bash quick_start/torchrun_cmd.sh run-node CMD [ARGS…] | signal-node SIG" >&2; exit 2 ;;
esac
