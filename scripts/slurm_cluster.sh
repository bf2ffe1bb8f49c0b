#!/usr/bin/env bash
# A real one-node Slurm cluster in a folder, for tests and for trying the Slurm launcher:
#
#   scripts/slurm_cluster.sh start DIR   # munged + slurmctld + slurmd, state and logs in DIR
#   export SLURM_CONF=DIR/slurm.conf     # then sbatch, squeue, scancel, bytelm sweep talk to it
#   scripts/slurm_cluster.sh stop DIR
#
# Needs root and Debian's slurm-wlm and munge packages (scripts/test.sh installs them in CI).
# Several clusters can run on one host at once: each has its own folder, ports, munge socket
# and key. No accounting (slurmdbd): job states come from squeue and scontrol, as on any
# cluster. cred_expire=5 and the scheduler intervals below make a requeued job start again
# within seconds. A fresh DIR starts job ids at 1: never reuse a results folder across clusters.
set -euo pipefail

cmd=${1:-}; dir=${2:-}
if [[ -z "$cmd" || -z "$dir" ]]; then
  echo "usage: $0 start|stop|status DIR" >&2; exit 2
fi
mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
conf=$dir/slurm.conf

stop() {
  local munge_dir
  munge_dir=$(cat "$dir/munge.path" 2>/dev/null || true)
  for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" ${munge_dir:+"$munge_dir/munged.pid"}; do
    if [[ -s $pidfile ]]; then
      pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
  if [[ -n $munge_dir && $munge_dir == /tmp/bytelm-munge.* ]]; then rm -rf "$munge_dir" "$dir/munge.path"; fi
}

case $cmd in
  stop) stop; exit 0 ;;
  status) SLURM_CONF=$conf timeout 10 sinfo -h -o "%P %a %T %D" ; exit $? ;;
  start) ;;
  *) echo "usage: $0 start|stop|status DIR" >&2; exit 2 ;;
esac

for tool in munged slurmctld slurmd sinfo; do
  command -v "$tool" >/dev/null || { echo "$0: $tool not found: install Debian's slurm-wlm and munge" >&2; exit 1; }
done
[[ $(id -u) == 0 ]] || { echo "$0: run as root (slurmd starts jobs as their users)" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
host=$(hostname -s)
cpus=$(nproc)
# RealMemory below what is free, so the node is not drained for having less than it claims
mem=$(( $(awk '/MemAvailable/ {print $2}' /proc/meminfo) / 1024 / 2 ))
ctld_port=$(free_port); slurmd_port=$(free_port)
while [[ $slurmd_port == "$ctld_port" ]]; do slurmd_port=$(free_port); done

mkdir -p "$dir/state" "$dir/spool" "$dir/log"
# munged runs as the munge user, which must reach its files: they live in a folder of
# their own under /tmp (DIR may sit inside a folder only root can enter)
stop
munge_dir=$(mktemp -d /tmp/bytelm-munge.XXXXXX)
echo "$munge_dir" > "$dir/munge.path"
mkdir -p "$munge_dir/key"
dd if=/dev/urandom of="$munge_dir/key/munge.key" bs=1024 count=1 status=none
chmod 755 "$munge_dir"; chmod 700 "$munge_dir/key"; chmod 400 "$munge_dir/key/munge.key"
chown -R munge: "$munge_dir"
socket=$munge_dir/munge.socket

cat > "$conf" <<CONF
ClusterName=bytelm$ctld_port
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$socket,cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
KillWait=5
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF

runuser -u munge -- munged --key-file="$munge_dir/key/munge.key" --socket="$socket" \
  --pid-file="$munge_dir/munged.pid" --log-file="$munge_dir/munged.log" --seed-file="$munge_dir/munged.seed"
export SLURM_CONF=$conf
slurmctld -i -f "$conf"
slurmd -f "$conf"
for _ in $(seq 100); do
  if [[ $(timeout 5 sinfo -h -o "%T" 2>/dev/null | head -n1) == idle ]]; then
    echo "Slurm is up: export SLURM_CONF=$conf"
    exit 0
  fi
  sleep 0.3
done
echo "$0: the cluster did not reach idle; logs in $dir/log" >&2
timeout 5 sinfo >&2 || true
stop
exit 1
