#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests and for trying the launchers without a
# real cluster: `bash slurm/local_cluster.sh start|stop|status`.
#
# start   installs Debian's munge, slurmctld and slurmd when missing (needs root and apt), writes
#         /etc/slurm/slurm.conf for this host (its real CPU count and memory, partition `debug`),
#         creates the munge key, starts munged, slurmctld and slurmd, and waits until the node is
#         idle. Plugins need no cgroups (proctrack/linuxproc, task/none), so it runs in containers.
# stop    stops the three daemons this script started.
# status  prints sinfo (exit status 1 when the cluster is not up).
#
# Idempotent: starting a running cluster or stopping a stopped one changes nothing. Daemon state,
# logs and pid files live in $VETDINO_SLURM_STATE (default /tmp/vetdino-slurm).
set -euo pipefail

STATE_DIR=${VETDINO_SLURM_STATE:-/tmp/vetdino-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by vet-dino slurm/local_cluster.sh"
WAIT_S=${VETDINO_SLURM_WAIT_S:-60}
NODE=$(hostname -s)
CONFIG_CHANGED=0

log() { echo "local_cluster: $*" >&2; }
die() { log "$*"; exit 1; }

require_root() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (installs packages and starts daemons)"
}

install_packages() {
    local missing=()
    command -v munged >/dev/null 2>&1 || missing+=(munge)
    command -v slurmctld >/dev/null 2>&1 || missing+=(slurmctld slurm-client)
    command -v slurmd >/dev/null 2>&1 || missing+=(slurmd)
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${missing[@]}" >"$STATE_DIR/apt.log" 2>&1 \
        || { apt-get update -q >>"$STATE_DIR/apt.log" 2>&1 && apt-get install -y -q "${missing[@]}" >>"$STATE_DIR/apt.log" 2>&1; } \
        || die "apt-get install ${missing[*]} failed (see $STATE_DIR/apt.log)"
}

write_config() {
    if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to overwrite it"
    fi
    local cpus mem_mb
    cpus=$(nproc --all)
    mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 - 512 ))
    mkdir -p /etc/slurm "$STATE_DIR/ctld" "$STATE_DIR/d" "$STATE_DIR/log"
    local tmp
    tmp=$(mktemp /etc/slurm/.slurm.conf.XXXXXX)
    cat >"$tmp" <<EOF
$MARKER
ClusterName=vetdino
SlurmctldHost=$NODE(127.0.0.1)
AuthType=auth/munge
# a requeued job waits cred_expire seconds before it may start again (default 120)
AuthInfo=cred_expire=10
CryptoType=crypto/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=2
MinJobAge=300
SchedulerType=sched/backfill
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    chmod 644 "$tmp"
    if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 0
    fi
    mv -f "$tmp" "$CONF"
    CONFIG_CHANGED=1
}

ensure_munge_key() {
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating the munge key"
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
    chmod 700 /etc/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    chmod 400 /etc/munge/munge.key
}

alive() {  # pid file -> 0 when its process runs
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

start_munged() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    runuser -u munge -- munged || die "munged did not start (see /var/log/munge/munged.log)"
    for _ in $(seq 20); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    die "munged started but credentials do not verify"
}

start_slurm() {
    if alive "$STATE_DIR/slurmctld.pid" && alive "$STATE_DIR/slurmd.pid"; then
        [ "$CONFIG_CHANGED" -eq 1 ] && { scontrol reconfigure || die "scontrol reconfigure failed"; }
        return 0
    fi
    alive "$STATE_DIR/slurmctld.pid" || slurmctld || die "slurmctld did not start (see $STATE_DIR/log/slurmctld.log)"
    alive "$STATE_DIR/slurmd.pid" || slurmd || die "slurmd did not start (see $STATE_DIR/log/slurmd.log)"
}

wait_idle() {
    local state=""
    for _ in $(seq "$WAIT_S"); do
        state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null || true)
        case "$state" in
            idle*|mix*|alloc*) return 0 ;;
            down*|drain*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    die "node $NODE not idle after ${WAIT_S}s (state '${state:-unknown}'; see $STATE_DIR/log)"
}

start() {
    require_root
    mkdir -p "$STATE_DIR"
    install_packages
    write_config
    ensure_munge_key
    start_munged
    start_slurm
    wait_idle
    log "up: partition debug on $NODE ($(nproc --all) CPUs)"
}

stop_daemon() {  # name pid-file
    if alive "$2"; then
        local pid
        pid=$(cat "$2")
        kill "$pid"
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        log "stopped $1"
    fi
    rm -f "$2"
}

stop() {
    stop_daemon slurmd "$STATE_DIR/slurmd.pid"
    stop_daemon slurmctld "$STATE_DIR/slurmctld.pid"
    stop_daemon munged /run/munge/munged.pid
}

status() {
    command -v sinfo >/dev/null 2>&1 || die "SLURM is not installed"
    sinfo || die "the cluster is not up"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
