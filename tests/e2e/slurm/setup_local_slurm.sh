#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (munged + slurmctld + slurmd), for tests/e2e/test_slurm.py.
#
# Idempotent: a cluster this script already started is reused. Needs root (apt-get, munge, spool dirs).
# Everything it writes lives under $UNMASK_SLURM_DIR (default /tmp/unmask-slurm); clients find the
# cluster through SLURM_CONF=$UNMASK_SLURM_DIR/slurm.conf, so /etc/slurm is left alone.
# Exit 77 means "cannot install SLURM here: apt-get unreachable" (the test skips on it, nothing else).
# `setup_local_slurm.sh stop` stops slurmd and slurmctld, and munged if this script started it.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin  # slurmd, slurmctld, munged

dir=${UNMASK_SLURM_DIR:-/tmp/unmask-slurm}
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [ "${1:-}" = stop ]; then
  for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munged.pid"; do
    if running "$pidfile"; then
      pid=$(cat "$pidfile"); kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
    rm -f "$pidfile"
  done
  echo "setup_local_slurm: stopped"
  exit 0
fi
cpus=${UNMASK_SLURM_CPUS:-4}  # CPUs the node advertises; SlurmdParameters=config_overrides lets that exceed a small box
host=$(hostname -s)
conf=$dir/slurm.conf
export SLURM_CONF=$conf

if ! command -v slurmd >/dev/null || ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  echo "setup_local_slurm: installing slurm-wlm and munge with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get update -qq; then
    echo "setup_local_slurm: apt-get update failed: Debian mirrors unreachable, cannot install slurm-wlm" >&2
    exit 77
  fi
  apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# munge: the Debian package creates /etc/munge/munge.key; make one if it is missing.
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
mkdir -p "$dir/ctld" "$dir/d" "$dir/log"
if ! munge -n >/dev/null 2>&1; then
  if id munge >/dev/null 2>&1; then runuser -u munge -- munged; else munged --force; fi
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.2; done
  munge -n | unmunge >/dev/null || { echo "setup_local_slurm: munged did not start" >&2; exit 1; }
  cp /run/munge/munged.pid "$dir/munged.pid" 2>/dev/null || pgrep -n munged > "$dir/munged.pid" || true  # ours to stop
fi

cat > "$conf.new" <<CONF
# Written by tests/e2e/slurm/setup_local_slurm.sh: one node, no accounting, no cgroups.
ClusterName=unmask-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# Credential lifetime; also how long a requeued job is held before it may start again (default 120 s).
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/d
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=4096 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF

if running "$dir/slurmctld.pid" && running "$dir/slurmd.pid" && cmp -s "$conf" "$conf.new"; then
  rm "$conf.new"
else
  for daemon in slurmd slurmctld; do
    if running "$dir/$daemon.pid"; then kill "$(cat "$dir/$daemon.pid")"; sleep 1; fi
  done
  mv "$conf.new" "$conf"
  slurmctld -f "$conf" || { echo "setup_local_slurm: slurmctld failed; see $dir/log/slurmctld.log" >&2; exit 1; }
  slurmd -f "$conf" || { echo "setup_local_slurm: slurmd failed; see $dir/log/slurmd.log" >&2; exit 1; }
fi

# Wait until the node accepts work.
for _ in $(seq 60); do
  state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
  case $state in idle*|mixed*|allocated*) echo "setup_local_slurm: node $host is $state (SLURM_CONF=$conf)"; exit 0;; esac
  sleep 1
done
echo "setup_local_slurm: node $host never became idle (state: ${state:-unknown})." >&2
tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
exit 1
