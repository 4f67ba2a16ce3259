#!/usr/bin/env bash
# Stop what slurm_up.sh DIR started, by the pids it saved, once running steps have finished
# (at most 20 s), so that no slurmstepd is left retrying a gone controller.
D=$(realpath "$1")
export SLURM_CONF="$D/slurm.conf"
for _ in $(seq 40); do
    [ -z "$(squeue -h 2>/dev/null)" ] && break
    sleep 0.5
done
for f in "$D/slurmd.pid.sh" "$D/slurmctld.pid.sh" "$D/munge/munged.pid"; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null
done
for f in "$D/slurmd.pid.sh" "$D/slurmctld.pid.sh"; do
    for _ in $(seq 20); do
        [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null || break
        sleep 0.25
    done
done
exit 0
