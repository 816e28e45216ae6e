#!/usr/bin/env bash
# A real single-node Slurm on this machine, for testing the sbatch templates in slurm/ (CI does this).
#
#   bash scripts/slurm-local.sh start     install (apt) if missing, configure, start munged, slurmctld and
#                                         slurmd, wait until `sinfo` says the node is idle
#   bash scripts/slurm-local.sh stop      cancel the jobs, stop the daemons this script started (by PID)
#   bash scripts/slurm-local.sh status    what runs, and sinfo
#
# Idempotent: `start` with everything up only waits for the node to be idle; `stop` with nothing up
# does nothing. Needs root (the daemons run as root: SlurmUser=root). No systemd is needed or used.
#
# Knobs (environment):
#   HPCD_SLURM_STATE   state directory: spool, logs, PID files   [/var/lib/hpcdistill-slurm]
#   HPCD_SLURM_CPUS    CPUs of the node                          [nproc]
#   HPCD_SLURM_FORCE=1 overwrite /etc/slurm/slurm.conf even when this script did not write it
#
# What the configuration does and why (Slurm 22.05, Debian 12):
#   SlurmUser=root, ProctrackType=proctrack/linuxproc, TaskPlugin=task/none: no cgroups, no systemd;
#   cgroup.conf with CgroupPlugin=cgroup/v1 and an empty CgroupMountpoint, so slurmd starts in a
#   container; NodeName=localhost (slurmd -N localhost) with the machine's CPUs; ReturnToService=2;
#   MinJobAge=300 (squeue hides finished jobs at once; `scontrol show job` keeps their final state,
#   exit code and restart count for 5 minutes, which the tests read);
#   KillWait=5; long SlurmdTimeout/MessageTimeout (a loaded 2-core CI machine answers slowly: with
#   the defaults slurmctld marks the node DOWN "not responding"); AuthInfo cred_expire=10 (a requeued job may start again after ~11 s, not 121 s);
#   sched/builtin with sched_interval=2 (pending jobs, requeued ones included, start within seconds).
set -euo pipefail

STATE="${HPCD_SLURM_STATE:-/var/lib/hpcdistill-slurm}"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
CGROUP_CONF="$CONF_DIR/cgroup.conf"
MARKER="# written by hpcdistill scripts/slurm-local.sh"
PACKAGES=(slurmctld slurmd slurm-client munge libpmix-dev)
NODE=localhost

say() { echo "slurm-local: $*" >&2; }
die() { say "error: $*"; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "run as root (the local Slurm daemons run as root)"; }

install_packages() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # policy-rc.d: keep the packages' init scripts from starting daemons we then could not track.
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; created_policy=1; fi
    apt-get update -qq >/dev/null || say "apt-get update failed; trying the install anyway"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || { [ $created_policy = 1 ] && rm -f "$policy"; die "apt-get install ${missing[*]} failed"; }
    [ $created_policy = 1 ] && rm -f "$policy"
    return 0
}

# --- PID tracking ------------------------------------------------------------------------------------
pidfile() { echo "$STATE/pids/$1.pid"; }

# The PID of a daemon this script started, if that process still runs (and is that program).
running_pid() {
    local f pid comm
    f="$(pidfile "$1")"
    [ -s "$f" ] || return 1
    pid="$(cat "$f")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 1
    [ "$comm" = "$1" ] || return 1
    echo "$pid"
}

# Wait for a daemon's own PID file (it forks into the background), then record the PID as ours.
adopt_pid() {
    local name="$1" daemon_pidfile="$2" i pid
    for i in $(seq 1 100); do
        if [ -s "$daemon_pidfile" ]; then
            pid="$(cat "$daemon_pidfile")"
            if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
                echo "$pid" >"$(pidfile "$name")"
                return 0
            fi
        fi
        sleep 0.1
    done
    return 1
}

stop_pid() {
    local name="$1" pid i
    pid="$(running_pid "$name")" || { rm -f "$(pidfile "$name")"; return 0; }
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
        [ -d "/proc/$pid" ] || break
        sleep 0.1
    done
    if [ -d "/proc/$pid" ]; then
        say "$name (pid $pid) did not stop in 10 s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$(pidfile "$name")"
}

# --- configuration -----------------------------------------------------------------------------------
write_if_changed() {  # path content -> returns 0 if the file changed
    local path="$1" content="$2"
    if [ -f "$path" ] && [ "$(cat "$path")" = "$content" ]; then return 1; fi
    if [ -f "$path" ] && ! grep -qF "$MARKER" "$path" && [ "${HPCD_SLURM_FORCE:-0}" != 1 ]; then
        die "$path exists and was not written by this script; set HPCD_SLURM_FORCE=1 to overwrite it"
    fi
    printf '%s\n' "$content" >"$path"
    return 0
}

configure() {
    local cpus mem
    cpus="${HPCD_SLURM_CPUS:-$(nproc)}"
    mem="$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)"
    mem="${mem:-1000}"
    mkdir -p "$CONF_DIR" "$STATE"/{pids,log,ctld,d,cgroup}
    chmod 755 "$STATE"
    local conf
    conf="$MARKER
ClusterName=hpcdistill-local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmctldTimeout=120
SlurmdTimeout=600
MessageTimeout=60
TCPTimeout=30
BatchStartTimeout=120
JobRequeue=1
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/log/slurmctld.pid
SlurmdPidFile=$STATE/log/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4"
    local changed=1
    write_if_changed "$CONF" "$conf" && changed=0
    write_if_changed "$CGROUP_CONF" "$MARKER
CgroupPlugin=cgroup/v1
CgroupMountpoint=$STATE/cgroup" && changed=0
    return $changed  # 0 = something changed
}

# --- daemons -----------------------------------------------------------------------------------------
start_munge() {
    if running_pid munged >/dev/null; then return 0; fi
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        say "a munged this script did not start is already running; using it"
        return 0
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        say "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 755 /run/munge
    rm -f /run/munge/munged.pid
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged --force
    adopt_pid munged /run/munge/munged.pid || die "munged did not start (see /var/log/munge/munged.log)"
    local i
    for i in $(seq 1 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munge does not work (see /var/log/munge/munged.log)"
}

start_slurmctld() {
    running_pid slurmctld >/dev/null && return 0
    say "starting slurmctld (log $STATE/log/slurmctld.log)"
    rm -f "$STATE/log/slurmctld.pid"
    # No -c: job state (and the job id counter) survive a restart, so run directories named after job
    # ids never collide; -i: ignore state files that do not match this configuration.
    slurmctld -i
    adopt_pid slurmctld "$STATE/log/slurmctld.pid" || die "slurmctld did not start; $(tail -5 "$STATE/log/slurmctld.log" 2>/dev/null)"
}

start_slurmd() {
    running_pid slurmd >/dev/null && return 0
    say "starting slurmd (log $STATE/log/slurmd.log)"
    rm -f "$STATE/log/slurmd.pid"
    slurmd -N "$NODE"
    adopt_pid slurmd "$STATE/log/slurmd.pid" || die "slurmd did not start; $(tail -5 "$STATE/log/slurmd.log" 2>/dev/null)"
}

wait_idle() {
    local i state
    for i in $(seq 1 120); do
        state="$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1 || true)"
        case "$state" in
            idle|mixed|allocated) say "node $NODE is $state"; return 0 ;;
            down*|drain*|fail*)
                scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    sinfo >&2 || true
    die "the node did not become idle in 60 s (state: ${state:-unknown}); see $STATE/log/"
}

cancel_jobs() {
    local jobs i
    jobs="$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ' || true)"
    [ -n "${jobs// /}" ] || return 0
    say "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for i in $(seq 1 60); do
        [ -z "$(squeue -h -o %A 2>/dev/null || true)" ] && return 0
        sleep 0.5
    done
}

cmd_start() {
    need_root
    install_packages
    if configure && { running_pid slurmctld >/dev/null || running_pid slurmd >/dev/null; }; then
        say "configuration changed: restarting the daemons"
        stop_pid slurmd
        stop_pid slurmctld
    fi
    start_munge
    start_slurmctld
    start_slurmd
    wait_idle
}

cmd_stop() {
    need_root
    if running_pid slurmctld >/dev/null; then cancel_jobs; fi
    stop_pid slurmd
    stop_pid slurmctld
    stop_pid munged
    # job steps left behind by a killed slurmd
    local pid
    for pid in $(pgrep -x slurmstepd 2>/dev/null || true); do
        say "stopping leftover slurmstepd (pid $pid)"
        kill -KILL "$pid" 2>/dev/null || true
    done
    return 0
}

cmd_status() {
    local name pid
    for name in munged slurmctld slurmd; do
        if pid="$(running_pid "$name")"; then echo "$name: running (pid $pid)"; else echo "$name: not running"; fi
    done
    if running_pid slurmctld >/dev/null; then sinfo; squeue; fi
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    restart) cmd_stop; cmd_start ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|restart|status" >&2; exit 2 ;;
esac
