#!/usr/bin/env bash
# Start a one-host slurm cluster on this machine for the slurm tests (Debian/Ubuntu, as root).
# Idempotent: installs slurm-wlm + munge only when missing, rewrites slurm.conf only when it changed,
# starts munged / slurmctld / slurmd only when they are not running, then waits until sinfo shows the
# node idle. Exit codes: 0 ready; 2 cannot work here (message on stderr says why); 1 failed.
# No systemd needed: the daemons are started directly (munged as user munge, slurm as root).
#   SLURM_SETUP_CPUS  CPUs of the node       [online CPUs]
#   SLURM_SETUP_WAIT  seconds to wait for it [60]
set -euo pipefail

die() { echo "setup_slurm: $2" >&2; exit "$1"; }

[ "$(id -u)" = "0" ] || die 2 "not root: starting slurmctld/slurmd/munged needs root"
node="$(hostname -s)"
cpus="${SLURM_SETUP_CPUS:-$(getconf _NPROCESSORS_ONLN)}"  # not nproc: it obeys OMP_NUM_THREADS
wait_s="${SLURM_SETUP_WAIT:-60}"

# ---------------------------------------------------------------------------------------- install
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || die 2 "slurm is not installed and there is no apt-get to install it"
  echo "setup_slurm: installing slurm-wlm and munge with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 || die 2 "apt-get update failed (no network to the package mirror?)"
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >&2 \
    || die 2 "apt-get install slurm-wlm munge failed"
fi

# ---------------------------------------------------------------------------------------- munge
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  pid_file=/run/munge/munged.pid
  if [ -s "$pid_file" ] && ! kill -0 "$(cat "$pid_file")" 2>/dev/null; then
    rm -f "$pid_file" /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  fi
  runuser -u munge -- /usr/sbin/munged --force
  for _ in $(seq 50); do
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.1
  done
  munge -n </dev/null | unmunge >/dev/null || die 1 "munged does not answer"
fi

# ---------------------------------------------------------------------------------------- slurm.conf
install -d -m 0755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
conf="$(cat <<EOF
# Written by tests/slurm/setup_slurm.sh: a one-host test cluster.
ClusterName=fmtest
SlurmctldHost=$node
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MailProg=/bin/true
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=$node CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
)"
changed=0
if [ ! -f /etc/slurm/slurm.conf ] || [ "$(cat /etc/slurm/slurm.conf)" != "$conf" ]; then
  tmp="$(mktemp /etc/slurm/.slurm.conf.XXXXXX)"
  printf '%s\n' "$conf" >"$tmp"
  chmod 0644 "$tmp"
  mv -f "$tmp" /etc/slurm/slurm.conf
  changed=1
fi

# ---------------------------------------------------------------------------------------- daemons
running() {  # running NAME: is a process with exactly this name alive?
  local pid_file="/run/slurm/$1.pid"
  [ -s "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null
}
stop() {  # stop NAME: only the daemon whose pid file we wrote
  local pid_file="/run/slurm/$1.pid"
  if running "$1"; then
    kill "$(cat "$pid_file")"
    for _ in $(seq 50); do running "$1" || break; sleep 0.1; done
  fi
}
if [ "$changed" = "1" ]; then
  stop slurmd
  stop slurmctld
fi
running slurmctld || slurmctld
running slurmd || slurmd

deadline=$((SECONDS + wait_s))
state=""
while [ "$SECONDS" -lt "$deadline" ]; do
  state="$(sinfo -h -n "$node" -o '%T' 2>/dev/null | head -n1 || true)"
  case "$state" in
    idle|mixed|allocated) echo "setup_slurm: node $node is $state" >&2; exit 0 ;;
    down*|drain*|fail*) scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  sleep 0.5
done
die 1 "node $node not idle after ${wait_s}s (state: '${state:-none}'); see /var/log/slurm/slurmctld.log and slurmd.log"
