#!/usr/bin/env bash
# A two-node SLURM cluster on this machine (loopback), for the slurm tests and for trying the
# sbatch workflow without a real cluster. Idempotent: running it again leaves a running cluster
# alone. Needs root (apt, /etc/slurm, daemons). Stop it with slurm/local/down.sh.
set -euo pipefail

STATE=${LIT_RESTORE_SLURM_STATE:-/var/lib/lit_restore_slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by lit_restore slurm/local/up.sh"
CPUS_PER_NODE=${LIT_RESTORE_SLURM_CPUS:-2}
HOST=$(hostname)

if [ "$(id -u)" -ne 0 ]; then
    echo "slurm/local/up.sh: run as root (it installs packages and starts daemons)" >&2
    exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# --- munge: the key, its run dir, the daemon (as the munge user) -----------------------------
mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
    else create-munge-key -f; fi
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

# --- names: n1 and n2 resolve to loopback so MASTER_ADDR (the first node's name) works ---------
grep -qE '^127\.0\.0\.1[[:space:]].*\bn1\b' /etc/hosts || echo "127.0.0.1 n1 n2" >> /etc/hosts

# --- slurm.conf: two nodes on this host, distinguished by port ----------------------------------
if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    echo "slurm/local/up.sh: $CONF exists and is not ours; not touching a real cluster's config" >&2
    exit 1
fi
mkdir -p "$STATE"/{ctld,log} /etc/slurm
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 4 ))
cat > "$CONF.tmp" <<CONFEOF
$MARK
ClusterName=litrestore
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again after cred_expire (default 120 s); short for preemption tests.
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# The periodic scheduler pass (default 60 s) is what starts a requeued job once eligible.
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=$STATE/ctld
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdSpoolDir=$STATE/slurmd.%n
SlurmdPidFile=$STATE/slurmd.%n.pid
SlurmdLogFile=$STATE/log/slurmd.%n.log
NodeName=n[1-2] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001-17002 CPUs=$CPUS_PER_NODE RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
CONFEOF
if ! cmp -s "$CONF.tmp" "$CONF"; then mv "$CONF.tmp" "$CONF"; CHANGED=1; else rm "$CONF.tmp"; CHANGED=0; fi

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if alive "$STATE/slurmctld.pid" && [ "$CHANGED" = 1 ]; then scontrol reconfigure; fi
alive "$STATE/slurmctld.pid" || slurmctld
for n in n1 n2; do
    mkdir -p "$STATE/slurmd.$n"
    alive "$STATE/slurmd.$n.pid" || slurmd -N "$n"
done

# --- wait until both nodes take jobs --------------------------------------------------------------
for _ in $(seq 60); do
    if [ "$(sinfo -h -N -t idle,mix,alloc -o '%N' 2>/dev/null | sort -u | wc -l)" -ge 2 ]; then
        sinfo -N
        exit 0
    fi
    scontrol update nodename=n[1-2] state=resume >/dev/null 2>&1 || true
    sleep 1
done
echo "slurm/local/up.sh: nodes did not come up; see $STATE/log/" >&2
sinfo -N >&2 || true
exit 1
