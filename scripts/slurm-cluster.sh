#!/usr/bin/env bash
# slurm-cluster.sh — bring up / tear down a throwaway single-node Slurm cluster
# on this machine, without systemd, for testing mergestream's Slurm examples.
#
# Usage:
#   scripts/slurm-cluster.sh up     STATE_DIR   # install (if needed) + start
#   scripts/slurm-cluster.sh down   STATE_DIR   # stop what `up` started
#   scripts/slurm-cluster.sh status STATE_DIR   # exit 0 iff the node is usable
#
#   conf=$(scripts/slurm-cluster.sh up "$STATE" | tail -n1)
#   export SLURM_CONF=$conf          # or: . "$STATE/env.sh"
#   sbatch ...; squeue ...
#   scripts/slurm-cluster.sh down "$STATE"
#
# `up`:
#   * needs root and apt-get (else exit 77 = "skip"); installs Debian's
#     slurmctld slurmd slurm-client munge if any is missing (`apt-get update`
#     once, noninteractive, service starts suppressed via policy-rc.d);
#   * creates STATE_DIR/munge/munge.key if missing and starts a private
#     munged (own socket, pid, log under STATE_DIR; the system munge is not
#     used or touched);
#   * writes STATE_DIR/slurm.conf (node = `hostname -s`, CPUs=nproc,
#     RealMemory from /proc/meminfo, proctrack/linuxproc, task/none,
#     select/cons_tres, SlurmUser=root, ReturnToService=2, free TCP ports —
#     6817/6818 when available), starts slurmctld and slurmd with -f that
#     conf, and waits (<= 60 s) until `sinfo` shows the node idle;
#   * records PIDs in STATE_DIR/pids/{munged,slurmctld,slurmd}.pid;
#   * if the cluster of this STATE_DIR is already up, healthy and its config
#     unchanged, it is reused; otherwise stale daemons of this STATE_DIR are
#     stopped first and the cluster starts with fresh state (job ids from 1);
#   * stdout: exactly one line, the absolute path to use as SLURM_CONF
#     (progress and guidance go to stderr). Also writes STATE_DIR/env.sh.
# `down`: cancels remaining jobs, stops exactly the daemons started for this
#   STATE_DIR (recorded PIDs, plus any process whose command line names this
#   STATE_DIR's files, e.g. from a lost pid file), waits for them to exit
#   (SIGKILL after 20 s). Safe to run when nothing is running.
#
# Exit codes: 0 ok; 1 failure (logs are printed); 2 usage; 77 this machine
#   cannot run the cluster (not root / no apt-get / no /proc).
set -euo pipefail

log() { printf '[slurm-cluster] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
skip() {
    {
        echo "=================================================================="
        echo "[slurm-cluster] SKIP (exit 77): cannot run a Slurm test cluster here:"
        echo "[slurm-cluster]   $*"
        echo "=================================================================="
    } >&2
    exit 77
}
usage() { echo "usage: $0 up|down|status STATE_DIR" >&2; exit 2; }

[ $# -eq 2 ] || usage
CMD=$1
case $CMD in up | down | status) ;; *) usage ;; esac
[ "$(id -u)" -eq 0 ] || skip "must run as root (uid is $(id -u))"
[ -r /proc/self/cmdline ] || skip "/proc is not mounted"
mkdir -p "$2"
STATE=$(cd "$2" && pwd -P)

CONF=$STATE/slurm.conf
PIDS=$STATE/pids
LOGS=$STATE/log
MUNGE_DIR=$STATE/munge
MUNGE_KEY=$MUNGE_DIR/munge.key
DAEMONS=(slurmctld slurmd munged)   # stop order

# Unix socket paths are limited to 108 bytes; slurmstepd puts sockets named
# <node>_<job>.<step> into the spool dir. Keep socket dirs short.
if [ ${#STATE} -le 60 ]; then
    RUN=$STATE/run
else
    RUN=/tmp/mergestream-slurm-$(printf '%s' "$STATE" | cksum | cut -d' ' -f1)
fi
MUNGE_SOCKET=$RUN/munge.socket
SPOOL=$RUN/spool

NODE=$(hostname -s)

# ---------------------------------------------------------------- helpers --

# pid_is_ours NAME PID: PID is alive, runs NAME and its command line names a
# file of this STATE_DIR (or our RUN dir).
pid_is_ours() {
    local name=$1 pid=$2 comm cmdline
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [ -r "/proc/$pid/comm" ] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [ "$comm" = "$name" ] || return 1
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ $cmdline == *"$STATE/"* || $cmdline == *"$RUN/"* ]]
}

recorded_pid() { cat "$PIDS/$1.pid" 2>/dev/null || true; }

# All live PIDs of daemon NAME belonging to this STATE_DIR.
our_pids() {
    local name=$1 pid p
    pid=$(recorded_pid "$name")
    if [ -n "$pid" ] && pid_is_ours "$name" "$pid"; then echo "$pid"; fi
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [ "$p" = "$pid" ] && continue
        if pid_is_ours "$name" "$p"; then echo "$p"; fi
    done
}

all_alive() {
    local d pid
    for d in "${DAEMONS[@]}"; do
        pid=$(recorded_pid "$d")
        [ -n "$pid" ] && pid_is_ours "$d" "$pid" || return 1
    done
}

# Is TCP port $1 being listened on (IPv4 or IPv6)?
port_in_use() {
    local hex
    hex=$(printf '%04X' "$1")
    awk -v p=":$hex" 'NR > 1 && $4 == "0A" && substr($2, length($2) - 4) == p { f = 1 } END { exit !f }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

choose_ports() {
    local base
    for base in 6817 16817 26817 36817 46817; do
        if ! port_in_use "$base" && ! port_in_use $((base + 1)); then
            CTLD_PORT=$base SLURMD_PORT=$((base + 1))
            return 0
        fi
    done
    die "no free port pair for slurmctld/slurmd (tried 6817, 16817, ..., 46817)"
}

node_state() {
    SLURM_CONF=$CONF timeout 10 sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1 || true
}

show_logs() {
    local f
    for f in "$LOGS"/*.log; do
        [ -f "$f" ] || continue
        log "---- tail of $f ----"
        tail -n 25 "$f" >&2 || true
    done
}

# ----------------------------------------------------------------- install --

REQUIRED_CMDS=(slurmctld slurmd sinfo sbatch squeue scancel munged)
PKGS=(slurmctld slurmd slurm-client munge)

ensure_installed() {
    local missing=() c
    for c in "${REQUIRED_CMDS[@]}"; do
        command -v "$c" >/dev/null 2>&1 || missing+=("$c")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null 2>&1 ||
        skip "commands missing (${missing[*]}) and no apt-get to install ${PKGS[*]}"
    log "installing ${PKGS[*]} (missing: ${missing[*]})"
    # Keep maintainer scripts from starting system services (no systemd here;
    # we start private daemons ourselves).
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        created_policy=1
    fi
    local rc=0
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                --no-install-recommends "${PKGS[@]}"
    } >&2 || rc=$?
    [ "$created_policy" -eq 1 ] && rm -f "$policy"
    [ "$rc" -eq 0 ] || die "apt-get install ${PKGS[*]} failed (rc=$rc)"
    for c in "${REQUIRED_CMDS[@]}"; do
        command -v "$c" >/dev/null 2>&1 || die "$c still missing after install"
    done
}

# ------------------------------------------------------------------ config --

write_conf() { # write_conf CTLD_PORT SLURMD_PORT > file
    local cpus mem_mb
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)
    cat <<EOF
# Generated by mergestream scripts/slurm-cluster.sh — single-node test cluster.
ClusterName=mergestream-test
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$1
SlurmdPort=$2
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmdParameters=config_overrides
MailProg=/bin/true
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

conf_port() { sed -n "s/^$1=//p" "$CONF" 2>/dev/null | head -n1; }

# --------------------------------------------------------------- start/stop --

wait_pidfile() { # wait_pidfile NAME FILE -> echoes pid
    local name=$1 file=$2 i pid
    for i in $(seq 1 100); do
        pid=$(cat "$file" 2>/dev/null || true)
        if [ -n "$pid" ] && pid_is_ours "$name" "$pid"; then
            echo "$pid"
            return 0
        fi
        sleep 0.1
    done
    return 1
}

start_daemons() {
    local pid
    mkdir -p "$PIDS" "$LOGS" "$MUNGE_DIR" "$RUN" "$SPOOL" "$STATE/ctld"
    chmod 700 "$MUNGE_DIR"
    chmod 755 "$RUN"   # munge clients need x on the socket dir

    if [ ! -s "$MUNGE_KEY" ]; then
        log "creating munge key $MUNGE_KEY"
        (umask 077 && dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none)
    fi
    chmod 600 "$MUNGE_KEY"

    log "starting munged (socket $MUNGE_SOCKET)"
    munged --force \
        --socket="$MUNGE_SOCKET" \
        --key-file="$MUNGE_KEY" \
        --pid-file="$RUN/munged.pid" \
        --log-file="$LOGS/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" \
        >>"$LOGS/munged.out" 2>&1 ||
        { cat "$LOGS/munged.out" >&2; show_logs; die "munged failed to start"; }
    pid=$(wait_pidfile munged "$RUN/munged.pid") || { show_logs; die "munged did not come up"; }
    echo "$pid" >"$PIDS/munged.pid"
    log "munged pid $pid"

    log "starting slurmctld (port $CTLD_PORT)"
    slurmctld -c -i -f "$CONF" >>"$LOGS/slurmctld.out" 2>&1 ||
        { cat "$LOGS/slurmctld.out" >&2; show_logs; die "slurmctld failed to start"; }
    pid=$(wait_pidfile slurmctld "$RUN/slurmctld.pid") || { show_logs; die "slurmctld did not come up"; }
    echo "$pid" >"$PIDS/slurmctld.pid"
    log "slurmctld pid $pid"

    log "starting slurmd (node $NODE, port $SLURMD_PORT)"
    slurmd -f "$CONF" -N "$NODE" >>"$LOGS/slurmd.out" 2>&1 ||
        { cat "$LOGS/slurmd.out" >&2; show_logs; die "slurmd failed to start"; }
    pid=$(wait_pidfile slurmd "$RUN/slurmd.pid") || { show_logs; die "slurmd did not come up"; }
    echo "$pid" >"$PIDS/slurmd.pid"
    log "slurmd pid $pid"
}

# Stop the daemons of this STATE_DIR; returns when they are gone.
stop_daemons() {
    local d pid pids=() i alive

    # Cancel leftover jobs so no slurmstepd/job processes outlive the cluster.
    if [ -f "$CONF" ] && [ -n "$(our_pids slurmctld)" ]; then
        if [ -n "$(SLURM_CONF=$CONF timeout 10 squeue -h -o %i 2>/dev/null || true)" ]; then
            log "cancelling remaining jobs"
            SLURM_CONF=$CONF timeout 10 scancel --full --quiet --user=root 2>/dev/null || true
            for i in $(seq 1 30); do
                [ -z "$(SLURM_CONF=$CONF timeout 10 squeue -h -o %i 2>/dev/null || true)" ] && break
                sleep 0.5
            done
        fi
    fi

    for d in "${DAEMONS[@]}"; do
        for pid in $(our_pids "$d"); do
            log "stopping $d (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$d:$pid")
        done
    done
    for i in $(seq 1 200); do
        alive=0
        for d in "${pids[@]}"; do
            pid_is_ours "${d%%:*}" "${d#*:}" && alive=1
        done
        [ "$alive" -eq 0 ] && break
        if [ "$i" -eq 200 ]; then
            for d in "${pids[@]}"; do
                if pid_is_ours "${d%%:*}" "${d#*:}"; then
                    log "SIGKILL ${d%%:*} (pid ${d#*:})"
                    kill -KILL "${d#*:}" 2>/dev/null || true
                fi
            done
            sleep 0.5
        fi
        sleep 0.1
    done
    for d in "${pids[@]}"; do
        if pid_is_ours "${d%%:*}" "${d#*:}"; then
            die "${d%%:*} (pid ${d#*:}) did not exit"
        fi
    done
    # The daemons have exited; give init a moment to reap the zombies so that
    # `pgrep slurmd` & co. come back empty right after `down` (~2 s seen).
    for i in $(seq 1 100); do
        alive=0
        for d in "${pids[@]}"; do
            [ -e "/proc/${d#*:}" ] && alive=1
        done
        [ "$alive" -eq 0 ] && break
        sleep 0.1
    done
    rm -f "$PIDS"/*.pid "$RUN"/*.pid
}

wait_idle() {
    local deadline=$((SECONDS + 60)) st=""
    while [ $SECONDS -lt $deadline ]; do
        st=$(node_state)
        case $st in
            idle) return 0 ;;
        esac
        # The daemons must stay alive meanwhile.
        all_alive || { log "a daemon exited during startup"; return 1; }
        sleep 0.5
    done
    log "node state still '${st:-?}' after 60 s"
    return 1
}

print_result() {
    printf 'export SLURM_CONF=%q\n' "$CONF" >"$STATE/env.sh"
    log "cluster up: node $NODE, slurmctld port $(conf_port SlurmctldPort)"
    log "use it with:  export SLURM_CONF=$CONF   (or: . $STATE/env.sh)"
    log "stop it with: $0 down $STATE"
    printf '%s\n' "$CONF"
}

# -------------------------------------------------------------------- main --

cmd_up() {
    local t0=$SECONDS
    ensure_installed

    # Reuse a healthy cluster of this STATE_DIR whose config is unchanged.
    if all_alive && [ -f "$CONF" ]; then
        if write_conf "$(conf_port SlurmctldPort)" "$(conf_port SlurmdPort)" | cmp -s - "$CONF" &&
            [ "$(node_state)" = idle ]; then
            log "already up (reusing daemons of $STATE)"
            print_result
            return 0
        fi
        log "existing cluster of $STATE is unhealthy or its config changed: restarting"
    fi

    stop_daemons
    # Fresh state: no jobs/nodes left from an earlier run.
    rm -rf "$STATE/ctld" "$SPOOL" "$LOGS"
    choose_ports
    mkdir -p "$LOGS"
    write_conf "$CTLD_PORT" "$SLURMD_PORT" >"$CONF"
    start_daemons
    if ! wait_idle; then
        show_logs
        stop_daemons || true
        die "node $NODE did not become idle"
    fi
    log "up in $((SECONDS - t0)) s"
    print_result
}

cmd_down() {
    stop_daemons
    [ "$RUN" = "$STATE/run" ] || rm -rf "$RUN"
    log "down: no daemons of $STATE left"
}

cmd_status() {
    local st
    if ! all_alive; then
        log "not up"
        return 1
    fi
    st=$(node_state)
    log "daemons alive; node $NODE state: ${st:-?}"
    [ -n "$st" ]
}

case $CMD in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) usage ;;
esac
