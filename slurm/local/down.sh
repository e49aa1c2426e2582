#!/usr/bin/env bash
# Stops the local cluster started by slurm/local/up.sh (its jobs are cancelled first).
# Leaves packages, munge and the config in place so the next `up.sh` is quick.
set -uo pipefail

STATE=${LIT_RESTORE_SLURM_STATE:-/var/lib/lit_restore_slurm}

stop() {  # stop the daemon whose pid file is $1, waiting for it to exit
    local pidfile=$1 pid
    [ -s "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
    rm -f "$pidfile"
}

if [ -s "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
    scancel --user="$(id -un)" 2>/dev/null || true
fi
stop "$STATE/slurmd.n1.pid"
stop "$STATE/slurmd.n2.pid"
stop "$STATE/slurmctld.pid"
echo "local SLURM cluster stopped"
