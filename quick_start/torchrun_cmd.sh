# Shared launch helpers for the app launchers (apps/*/*.sh) and the slurm node scripts
# (quick_start/run_master.sh, run_slave.sh, train_multinode.sbatch). Source it:
#   source quick_start/torchrun_cmd.sh
#   fm_launcher_args "$@"; TRAIN_CONFIG="${TRAIN_CONFIG:-…}"; fm_launch apps/fm9g_2b/pretrain_dragonfly.py
# or run one subcommand:  bash quick_start/torchrun_cmd.sh run-node CMD [ARGS…]
# shellcheck shell=bash

# ------------------------------------------------------------------------------------------ torchrun
# fm_gpus_on_node: GPUs this process may use: slurm's count, else CUDA_VISIBLE_DEVICES, else nvidia-smi, else 1.
fm_gpus_on_node() {
  local n
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "${SLURM_GPUS_ON_NODE}" -gt 0 ] 2>/dev/null; then
    echo "$SLURM_GPUS_ON_NODE"
  elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "${CUDA_VISIBLE_DEVICES}" != "-1" ]; then
    awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES"
  elif command -v nvidia-smi >/dev/null 2>&1 && n="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')" && [ "$n" -gt 0 ]; then
    echo "$n"
  else
    echo 1  # CPU: one process (the fsdp engine on gloo)
  fi
}

# fm_free_port: a TCP port free on this host right now.
fm_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

# fm_torchrun_cmd SCRIPT [ARGS…]: sets the array FM_TORCHRUN_CMD to one torchrun command (c10d rendezvous)
# from the environment, with defaults: GPUS_PER_NODE (detected), NNODES 1, NODE_RANK ($RANK, else 0),
# MASTER_ENDPOINT localhost, MASTER_PORT (a free port on one node, else 12345), SIGNALS_TO_HANDLE
# (adds SIGUSR1, slurm's early warning). Also exports the resolved values.
fm_torchrun_cmd() {
  export GPUS_PER_NODE="${GPUS_PER_NODE:-$(fm_gpus_on_node)}"
  export NNODES="${NNODES:-1}"
  export NODE_RANK="${NODE_RANK:-${RANK:-0}}"
  export MASTER_ENDPOINT="${MASTER_ENDPOINT:-localhost}"
  if [ -z "${MASTER_PORT:-}" ]; then
    if [ "$NNODES" = "1" ]; then
      MASTER_PORT="$(fm_free_port)"  # one node: a free port avoids clashes between jobs on one machine
    else
      MASTER_PORT=12345  # every node must agree: set MASTER_PORT explicitly across nodes
    fi
  fi
  export MASTER_PORT
  local signals="${SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
  # shellcheck disable=SC2034  # the caller's result
  FM_TORCHRUN_CMD=(torchrun --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE" --node_rank="$NODE_RANK"
    --rdzv_id="${RDZV_ID:-1}" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ENDPOINT:$MASTER_PORT"
    --signals-to-handle="$signals" "$@")
}

# ------------------------------------------------------------------------------------------ app launchers
# The app launchers (apps/*/*.sh) are: defaults, then
#   fm_launcher_args "$@"; TRAIN_CONFIG="${TRAIN_CONFIG:-default.json}"; fm_launch apps/…/script.py

# fm_is_train_config FILE: FILE is a train config JSON (it names model_unique, train_iters or dataset_config).
fm_is_train_config() { [ -f "$1" ] && grep -qE '"(model_unique|train_iters|dataset_config)"' "$1"; }

# fm_launcher_args ARGS…: an app launcher's own options, anywhere among ARGS: --dry-run sets FM_DRY_RUN=1;
# --train_config X, or --config X where X is a train config file, sets TRAIN_CONFIG (a --config that names
# something else, e.g. a model config, is an override); --lora with no value sets FM_LORA=1. Everything else
# goes to the array FM_ARGS: train config overrides (--key value).
fm_launcher_args() {
  FM_DRY_RUN=0
  FM_LORA=0
  FM_ARGS=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --dry-run) FM_DRY_RUN=1 ;;
      --lora) if [ $# -gt 1 ] && [[ "$2" != --* ]]; then FM_ARGS+=("$1" "$2"); shift; else FM_LORA=1; fi ;;
      --config|--train_config)
        if [ $# -gt 1 ] && { [ "$1" = --train_config ] || fm_is_train_config "$2"; }; then
          TRAIN_CONFIG="$2"
        else
          FM_ARGS+=("$1" "${2:-}")
        fi
        [ $# -gt 1 ] && shift ;;
      *) FM_ARGS+=("$1") ;;
    esac
    shift
  done
}

# fm_launch SCRIPT: prints the torchrun command for SCRIPT --config "$TRAIN_CONFIG" FM_ARGS… (plus --lora true
# with FM_LORA=1); then, unless FM_DRY_RUN=1, sets up the environment (quick_start/_env.sh) and runs it in
# place of this shell. Run from the checkout root.
fm_launch() {
  local -a extra=()
  if [ "${FM_LORA:-0}" = "1" ]; then extra=(--lora true); fi
  fm_torchrun_cmd "$1" --config "$TRAIN_CONFIG" ${FM_ARGS[@]+"${FM_ARGS[@]}"} ${extra[@]+"${extra[@]}"}
  printf '%q ' "${FM_TORCHRUN_CMD[@]}"
  echo
  if [ "${FM_DRY_RUN:-0}" = "1" ]; then
    exit 0
  fi
  # shellcheck disable=SC1091
  source quick_start/_env.sh
  exec "${FM_TORCHRUN_CMD[@]}"
}

# ------------------------------------------------------------------------------------------ signals
# fm_descendants PID: all descendants of PID, one per line (children first).
fm_descendants() {
  local c
  for c in $(pgrep -P "$1" 2>/dev/null || true); do
    echo "$c"
    fm_descendants "$c"
  done
}

# fm_training_workers PID: the training processes under PID: the children of the torchrun agent(s) there.
# The signal goes to the workers, not to torchrun: torchrun does forward the signals in --signals-to-handle,
# but then ends with a SignalException traceback and exit status 1 even when every worker checkpointed and
# exited 0. Signalling the workers lets torchrun see them finish and exit 0.
fm_training_workers() {
  local p args
  for p in "$1" $(fm_descendants "$1"); do
    args="$(ps -o args= -p "$p" 2>/dev/null || true)"
    if [[ "$args" =~ (^|[ /])torchrun( |$) || "$args" =~ -m\ torch\.distributed\.(run|launch)( |$) ]]; then
      pgrep -P "$p" 2>/dev/null || true
    fi
  done
}

# fm_forward_signal SIG PID: deliver SIG to the training workers under PID (to PID itself if there are none yet).
fm_forward_signal() {
  local sig="$1" pid="$2" workers
  # The master withdraws its address at once, so that a requeued slave never reads a stale one.
  if [ -n "${FM_RDZV_OWNED:-}" ]; then rm -f "$FM_RDZV_OWNED"; fi
  workers="$(fm_training_workers "$pid" | tr '\n' ' ')"
  if [ -n "${workers// /}" ]; then
    echo "[fm] got SIG$sig: forwarding to the training processes ($workers) to checkpoint and exit" >&2
    # shellcheck disable=SC2086  # a list of pids
    kill -s "$sig" $workers 2>/dev/null || true
  else
    echo "[fm] got SIG$sig: no torchrun workers below $pid (yet, or on other nodes): forwarding to $pid" >&2
    kill -s "$sig" "$pid" 2>/dev/null || true
  fi
}

# fm_run_node CMD [ARGS…]: runs CMD as a child and waits for it. SIGUSR1 / SIGTERM / SIGINT / SIGHUP sent to
# this shell (slurm's --signal=B:USR1@T, scancel --batch --signal=USR1) are forwarded to the training
# processes, which save a checkpoint and exit. Returns CMD's exit status; FM_GOT_SIGNAL names the signal.
FM_GOT_SIGNAL=""
fm_run_node() {
  local sig rc
  "$@" &
  FM_CHILD_PID=$!
  for sig in USR1 TERM INT HUP; do
    # shellcheck disable=SC2064  # bind the signal name now
    trap "FM_GOT_SIGNAL=$sig; ${FM_FORWARD_FN:-fm_forward_signal} $sig \"\$FM_CHILD_PID\"" "$sig"
  done
  while true; do
    rc=0
    wait "$FM_CHILD_PID" || rc=$?
    # wait returns > 128 when a trapped signal interrupted it; the child is still running then.
    if [ "$rc" -gt 128 ] && kill -0 "$FM_CHILD_PID" 2>/dev/null; then
      continue
    fi
    break
  done
  trap - USR1 TERM INT HUP
  return "$rc"
}

# fm_maybe_requeue RC: with REQUEUE=1 inside a slurm job that received a stop signal, put the job back in
# the queue (it resumes from the latest checkpoint: resume_ckpt "latest"). Otherwise returns RC.
fm_maybe_requeue() {
  local rc="$1"
  if [ "${REQUEUE:-0}" = "1" ] && [ -n "$FM_GOT_SIGNAL" ]; then
    if [ -n "${SLURM_JOB_ID:-}" ]; then
      echo "[fm] REQUEUE=1 and SIG$FM_GOT_SIGNAL: scontrol requeue $SLURM_JOB_ID (training exited with $rc)" >&2
      scontrol requeue "$SLURM_JOB_ID"
      return 0
    fi
    echo "[fm] REQUEUE=1 but not inside a slurm job (SLURM_JOB_ID unset): not requeued" >&2
  fi
  return "$rc"
}

# fm_node_pid_file: where the run-node task of this job on this machine records its pid (node-local).
fm_node_pid_file() {
  echo "${FM_PID_DIR:-/tmp}/fm-node-${SLURM_JOB_ID:-0}-${SLURM_NODEID:-0}.pid"
}

# fm_forward_via_srun SIG PID: train_multinode.sbatch's forwarder. Signalling srun would make slurm signal
# every process of the step, torchrun included, which then exits 1 even after a clean checkpoint; instead an
# extra step on every node (--overlap) signals just the training workers there. Falls back to srun itself.
fm_forward_via_srun() {
  local sig="$1" pid="$2"
  echo "[fm] got SIG$sig: asking the training processes on all $NNODES node(s) to checkpoint and exit" >&2
  if ! srun --overlap --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task=1 \
      bash "$FM_ROOT_DIR/quick_start/torchrun_cmd.sh" signal-node "$sig"; then
    echo "[fm] the signal step failed: signalling srun ($pid) instead" >&2
    kill -s "$sig" "$pid" 2>/dev/null || true
  fi
}

# ------------------------------------------------------------------------------------------ master/slave
# fm_node_usage ROLE: help of run_master.sh / run_slave.sh.
fm_node_usage() {
  cat <<EOF
usage: sbatch quick_start/run_$1.sh [options] [--key value …]      (or: bash quick_start/run_$1.sh …)
  --app PATH        app launcher                      APP           [apps/fm9g_2b/pretrain_dragonfly.sh]
  --config PATH     train config JSON                 TRAIN_CONFIG  [the launcher's default]
  --name NAME       rendezvous name (master = slaves) RDZV_NAME     [fm]
  --rdzv-dir DIR    shared directory for it           RDZV_DIR      [<checkout>/data/rendezvous]
  --requeue         requeue the job after a stop signal (resumes from latest)   REQUEUE=1
  --dry-run         print what would run, run nothing
EOF
  if [ "$1" = "master" ]; then
    cat <<EOF
  --nnodes N        number of machines                NNODES        [1]
  --port P          rendezvous port                   MASTER_PORT   [a free port]
EOF
  else
    cat <<EOF
  --node-rank N     this machine's rank (1, 2, …)     NODE_RANK     [\$RANK, else 1]
  --master HOST[:P] skip the rendezvous file          MASTER_ENDPOINT, MASTER_PORT [from the file]
  --nnodes N        number of machines                NNODES        [from the file]
  --timeout S       seconds to wait for the master    RDZV_TIMEOUT  [1800]
EOF
  fi
  cat <<EOF
Other arguments go to the launcher, i.e. override train config keys (--train_iters 100 --save DIR).
Environment: GPUS_PER_NODE [slurm's GPUs, else detected, else 1], SIGNALS_TO_HANDLE, FM_ROOT.
EOF
}

# fm_rdzv_get FILE KEY: one KEY=value of a rendezvous file (read, never sourced).
fm_rdzv_get() {
  sed -n "s/^$2=//p" "$1" | tail -n1
}

# fm_rdzv_fresh FILE: the file exists and its master touched it within RDZV_STALE seconds.
fm_rdzv_fresh() {
  [ -s "$1" ] || return 1
  local age=$(( $(date +%s) - $(stat -c %Y "$1" 2>/dev/null || echo 0) ))
  [ "$age" -le "${RDZV_STALE:-120}" ]
}

# fm_publish_rendezvous FILE: write the master's address atomically (temp file + rename) and keep touching it
# while the master lives (a heartbeat: slaves ignore a file whose master died without cleaning up).
fm_publish_rendezvous() {
  local f="$1" tmp
  mkdir -p "$(dirname "$f")"
  tmp="$(mktemp "$f.tmp.XXXXXX")"
  {
    echo "# written by quick_start/run_master.sh; slaves read it (quick_start/run_slave.sh)"
    echo "MASTER_ENDPOINT=$MASTER_ENDPOINT"
    echo "MASTER_PORT=$MASTER_PORT"
    echo "NNODES=$NNODES"
    echo "MASTER_JOB=${SLURM_JOB_ID:-pid$$}"
    echo "STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  } >"$tmp"
  chmod 0644 "$tmp"
  mv -f "$tmp" "$f"
  FM_RDZV_OWNED="$f"
  (
    trap - USR1 TERM INT HUP
    while kill -0 "$$" 2>/dev/null && [ -f "$f" ]; do
      touch -c "$f" 2>/dev/null || true
      sleep "${RDZV_HEARTBEAT:-15}"
    done
  ) </dev/null >/dev/null 2>&1 &  # detached from our output: a pipe reader must not wait for its last sleep
  FM_HEARTBEAT_PID=$!
  echo "[fm] master: published $MASTER_ENDPOINT:$MASTER_PORT (NNODES=$NNODES) in $f" >&2
}

# fm_wait_rendezvous FILE: wait (RDZV_TIMEOUT seconds) for a live master's file; sets MASTER_ENDPOINT etc.
fm_wait_rendezvous() {
  local f="$1" timeout="${RDZV_TIMEOUT:-1800}" start=$SECONDS said=0
  while ! fm_rdzv_fresh "$f"; do
    if [ $((SECONDS - start)) -ge "$timeout" ]; then
      echo "run_slave.sh: error: no live master published $f within ${timeout}s. Submit" \
        "quick_start/run_master.sh with the same --name/RDZV_NAME and a --rdzv-dir/RDZV_DIR on storage" \
        "shared by all machines, raise RDZV_TIMEOUT, or give the master with --master HOST:PORT." >&2
      return 1
    fi
    if [ "$said" = "0" ]; then
      echo "[fm] slave: waiting up to ${timeout}s for the master's rendezvous file $f" >&2
      said=1
    fi
    sleep "${RDZV_POLL:-2}"
  done
  MASTER_ENDPOINT="$(fm_rdzv_get "$f" MASTER_ENDPOINT)"
  MASTER_PORT="$(fm_rdzv_get "$f" MASTER_PORT)"
  NNODES="${NNODES:-$(fm_rdzv_get "$f" NNODES)}"
  if [ -z "$MASTER_ENDPOINT" ] || [ -z "$MASTER_PORT" ] || [ -z "$NNODES" ]; then
    echo "run_slave.sh: error: $f lacks MASTER_ENDPOINT, MASTER_PORT or NNODES; delete it, restart the master" >&2
    return 1
  fi
  echo "[fm] slave: master is $MASTER_ENDPOINT:$MASTER_PORT (NNODES=$NNODES, job $(fm_rdzv_get "$f" MASTER_JOB))" >&2
}

# fm_node_main ROLE ROOT [ARGS…]: the body of run_master.sh (ROLE master) and run_slave.sh (ROLE slave).
fm_node_main() {
  local role="$1" root="$2" dry_run=0 rdzv_file rc
  shift 2
  local -a rest=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --app) APP="$2"; shift 2 ;;
      --config|--train-config) TRAIN_CONFIG="$2"; shift 2 ;;
      --name) RDZV_NAME="$2"; shift 2 ;;
      --rdzv-dir) RDZV_DIR="$2"; shift 2 ;;
      --nnodes) NNODES="$2"; shift 2 ;;
      --port) MASTER_PORT="$2"; shift 2 ;;
      --node-rank) NODE_RANK="$2"; shift 2 ;;
      --master)
        MASTER_ENDPOINT="${2%%:*}"
        if [ "$2" != "$MASTER_ENDPOINT" ]; then MASTER_PORT="${2#*:}"; fi
        shift 2 ;;
      --timeout) RDZV_TIMEOUT="$2"; shift 2 ;;
      --requeue) REQUEUE=1; shift ;;
      --dry-run) dry_run=1; shift ;;
      -h|--help) fm_node_usage "$role"; return 0 ;;
      --) shift; rest+=("$@"); break ;;
      *) rest+=("$1"); shift ;;
    esac
  done
  APP="${APP:-apps/fm9g_2b/pretrain_dragonfly.sh}"
  case "$APP" in /*) ;; *) APP="$root/$APP" ;; esac
  if [ ! -f "$APP" ]; then
    echo "run_$role.sh: error: app launcher $APP not found (--app / APP, e.g. apps/fm9g_2b/pretrain_dragonfly.sh)" >&2
    return 2
  fi
  if [ -n "${TRAIN_CONFIG:-}" ]; then
    export TRAIN_CONFIG
  fi
  rdzv_file="${RDZV_DIR:-$root/data/rendezvous}/${RDZV_NAME:-fm}.env"
  export GPUS_PER_NODE="${GPUS_PER_NODE:-$(fm_gpus_on_node)}"
  # torchrun reads PET_<OPTION> for options a launcher does not pass: make sure slurm's USR1 is handled.
  export PET_SIGNALS_TO_HANDLE="${SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
  # Saving a big model takes longer than torchrun's default 30 s before it SIGKILLs its workers.
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"

  if [ "$role" = "master" ]; then
    NNODES="${NNODES:-1}"
    NODE_RANK=0
    MASTER_ENDPOINT="${MASTER_ENDPOINT:-$(hostname)}"
    MASTER_PORT="${MASTER_PORT:-$(fm_free_port)}"
  else
    NODE_RANK="${NODE_RANK:-${RANK:-1}}"
    if [ -n "${MASTER_ENDPOINT:-}" ]; then
      MASTER_PORT="${MASTER_PORT:-12345}"
      if [ -z "${NNODES:-}" ]; then
        echo "run_slave.sh: error: with --master/MASTER_ENDPOINT give --nnodes/NNODES too" >&2
        return 2
      fi
    elif [ "$dry_run" = "1" ]; then
      echo "[fm] slave (dry run): would wait for the master's rendezvous file $rdzv_file"
      return 0
    else
      fm_wait_rendezvous "$rdzv_file" || return 1
    fi
  fi
  export NNODES NODE_RANK MASTER_ENDPOINT MASTER_PORT
  echo "[fm] $role on $(hostname): NNODES=$NNODES NODE_RANK=$NODE_RANK MASTER=$MASTER_ENDPOINT:$MASTER_PORT" \
    "GPUS_PER_NODE=$GPUS_PER_NODE job=${SLURM_JOB_ID:-none} restarts=${SLURM_RESTART_COUNT:-0}"
  if [ "$dry_run" = "1" ]; then
    if [ "$role" = "master" ]; then
      echo "[fm] master (dry run): would publish the rendezvous file $rdzv_file"
    fi
    bash "$APP" --dry-run "${rest[@]}"
    return 0
  fi
  if [ "$role" = "master" ]; then
    fm_publish_rendezvous "$rdzv_file"
    # shellcheck disable=SC2064  # bind the file name now
    trap "rm -f '$rdzv_file'; kill \$FM_HEARTBEAT_PID 2>/dev/null || true" EXIT
  fi
  cd "$root"
  rc=0
  fm_run_node bash "$APP" "${rest[@]}" || rc=$?
  if [ "$role" = "master" ]; then
    rm -f "$rdzv_file"
  fi
  echo "[fm] $role: training exited with status $rc${FM_GOT_SIGNAL:+ after SIG$FM_GOT_SIGNAL}" >&2
  fm_maybe_requeue "$rc"
}

# ------------------------------------------------------------------------------------------ subcommands
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  case "${1:-}" in
    run-node)
      # One node of train_multinode.sbatch (srun runs this once per node): node rank from slurm. Records its
      # pid so that `signal-node` (a later srun step on the same node) can find it.
      shift
      export NODE_RANK="${SLURM_NODEID:-${NODE_RANK:-0}}"
      export GPUS_PER_NODE="${GPUS_PER_NODE:-$(fm_gpus_on_node)}"
      pid_file="$(fm_node_pid_file)"
      echo "$$" >"$pid_file"
      # shellcheck disable=SC2064  # bind the file name now
      trap "rm -f '$pid_file'" EXIT
      rc=0
      fm_run_node "$@" || rc=$?
      exit "$rc"
      ;;
    signal-node)
      # signal-node SIG: deliver SIG to the training workers of this job's run-node on this machine.
      pid_file="$(fm_node_pid_file)"
      if [ -s "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
        fm_forward_signal "${2:-USR1}" "$(cat "$pid_file")"
      else
        echo "[fm] signal-node: no running node task on $(hostname) ($pid_file)" >&2
      fi
      ;;
    *)
      echo "usage: bash quick_start/torchrun_cmd.sh run-node CMD [ARGS…] | signal-node SIG  (or source it)" >&2
      exit 2
      ;;
  esac
fi
