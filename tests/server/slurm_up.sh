#!/usr/bin/env bash
# Start a one-node Slurm cluster on localhost in DIR, nothing under /etc touched: munged on its
# own socket and key, slurmctld and slurmd with DIR/slurm.conf (PlugStackConfig DIR/plugstack.conf,
# written by the caller or empty). Needs root and Debian's slurmd, slurmctld, slurm-client, munge.
# Any user may run srun: the munge socket's folder and slurm.conf are readable by all (the key is
# not). SLURMD_WRAP, when set, is a command prefix for slurmd (e.g. a private mount namespace
# that tests/server/expose.py prepares for the jobs).
# Usage: slurm_up.sh DIR      (stop: slurm_down.sh DIR)
# Prints "export SLURM_CONF=DIR/slurm.conf" for srun.
set -euo pipefail
D=$(realpath "$1")
mkdir -p "$D"/{munge,munge-run,state,spool,log}
chmod 0700 "$D/munge"
chmod 0755 "$D" "$D/munge-run"
HOST=$(hostname -s)
CPUS=$(nproc)
if [ ! -f "$D/munge/munge.key" ]; then
    dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 status=none
    chmod 0400 "$D/munge/munge.key"
fi
[ -f "$D/plugstack.conf" ] || : > "$D/plugstack.conf"
cat > "$D/slurm.conf" <<CONF
ClusterName=safehooktest
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$D/munge-run/munge.socket
CredType=cred/munge
SlurmctldPort=$((6817 + RANDOM % 500 * 2))
SlurmdPort=$((7817 + RANDOM % 500 * 2))
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
PlugStackConfig=$D/plugstack.conf
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
chmod 0644 "$D/slurm.conf" "$D/plugstack.conf"
munged --socket="$D/munge-run/munge.socket" --key-file="$D/munge/munge.key" --pid-file="$D/munge/munged.pid" \
       --log-file="$D/log/munged.log" --seed-file="$D/munge/munge.seed" --force
export SLURM_CONF="$D/slurm.conf"
fail() { echo "$1; logs in $D/log" >&2; tail -n 20 "$D"/log/*.log >&2 || true; exit 1; }
# In the foreground of a background job, so that their pids are ours to stop (slurm_down.sh).
slurmctld -D -f "$D/slurm.conf" >>"$D/log/slurmctld.out" 2>&1 &
echo $! > "$D/slurmctld.pid.sh"
${SLURMD_WRAP:-} slurmd -D -f "$D/slurm.conf" >>"$D/log/slurmd.out" 2>&1 &
echo $! > "$D/slurmd.pid.sh"
# Ready when the node is idle (at most 30 s).
for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
        echo "export SLURM_CONF=$D/slurm.conf"
        exit 0
    fi
    sleep 0.5
done
sinfo >&2 || true
fail "slurm did not come up"
