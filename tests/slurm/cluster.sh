#!/usr/bin/env bash
# A throw-away Slurm cluster on this one machine, for the @pytest.mark.slurm tests.
#
#   tests/slurm/cluster.sh install        apt-get Slurm, munge and shellcheck if a command is missing
#   tests/slurm/cluster.sh start DIR      install, then start munged + slurmctld + 8 slurmd in DIR
#   tests/slurm/cluster.sh stop DIR       stop every daemon started in DIR (by its pid file)
#
# `start` prints `export SLURM_CONF=DIR/slurm.conf`; every Slurm client reads that file.
# Everything lives in DIR: its own munge key and socket (so a system munged, if any, is neither
# needed nor touched), slurm.conf, state, spool, logs and pid files. Two sessions with two DIRs
# do not interfere (ports are picked free at start). `start` on a running DIR is a no-op and
# `stop` on a stopped one too.
#
# What makes Debian 12's Slurm 22.05 run without systemd or cgroups (daemons started by hand,
# as root): ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, and
# SlurmdParameters=config_overrides so that eight `slurmd -N nodeK` processes on distinct ports
# report the nodes of slurm.conf (8 CPUs and 8 "GPUs" each) rather than this machine's hardware.
# GPU gres needs File= devices: empty placeholder files do. select/cons_tres because
# --gpus-per-node needs it. Exit code 77: not root (the caller skips); any other failure is an
# error the caller must report.
set -euo pipefail

NODES=8
PACKAGES=(slurmctld slurmd slurm-client munge shellcheck)

log() { echo "[cluster.sh] $*" >&2; }

install_packages() {
    local missing=0 cmd
    for cmd in munged slurmctld slurmd sbatch shellcheck; do
        command -v "$cmd" >/dev/null 2>&1 || missing=1
    done
    [[ $missing == 0 ]] && return 0
    if [[ $(id -u) != 0 ]]; then
        log "Slurm is not installed and installing it needs root (apt-get ${PACKAGES[*]})"
        exit 77
    fi
    log "installing ${PACKAGES[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # Wait for the dpkg lock rather than fail when another session installs at the same time.
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${PACKAGES[@]}" \
        >/dev/null
}

free_port() {
    "${PYTHON:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

alive() {  # alive PIDFILE
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

write_conf() {
    local dir=$1 ctld_port node
    ctld_port=$(free_port)
    mkdir -p "$dir/state" "$dir/gpu"
    for node in $(seq 1 "$NODES"); do mkdir -p "$dir/spool/node$node"; done
    for index in $(seq 0 7); do : > "$dir/gpu/nvidia$index"; done
    cat > "$dir/slurm.conf" <<EOF
ClusterName=nemoloop
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=10
InactiveLimit=0
SlurmdTimeout=300
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
EOF
    for node in $(seq 1 "$NODES"); do
        echo "NodeName=node$node NodeHostname=localhost NodeAddr=127.0.0.1 Port=$(free_port)" \
             "CPUs=8 Sockets=1 CoresPerSocket=8 ThreadsPerCore=1 RealMemory=1000 Gres=gpu:8" \
             "State=UNKNOWN" >> "$dir/slurm.conf"
    done
    echo "PartitionName=debug Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP" \
        >> "$dir/slurm.conf"
    echo "AutoDetect=off" > "$dir/gres.conf"
    echo "NodeName=node[1-$NODES] Name=gpu File=$dir/gpu/nvidia[0-7]" >> "$dir/gres.conf"
}

start() {
    local dir=$1 node
    install_packages
    if [[ $(id -u) != 0 ]]; then
        log "the local cluster runs its daemons as root; not root"
        exit 77
    fi
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    chmod 755 "$dir"
    export SLURM_CONF=$dir/slurm.conf
    if alive "$dir/slurmctld.pid" && scontrol ping >/dev/null 2>&1; then
        log "already running in $dir"
        echo "export SLURM_CONF=$SLURM_CONF"
        return 0
    fi
    [[ -f $dir/slurm.conf ]] || write_conf "$dir"

    mkdir -p "$dir/munge"
    chmod 755 "$dir/munge"  # the socket's directory must be searchable by all
    if [[ ! -s $dir/munge/munge.key ]]; then
        dd if=/dev/urandom of="$dir/munge/munge.key" bs=1 count=1024 status=none
        chmod 600 "$dir/munge/munge.key"
    fi
    if ! alive "$dir/munge/munged.pid"; then
        munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
            --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
            --seed-file="$dir/munge/munged.seed"
    fi

    alive "$dir/slurmctld.pid" || slurmctld -i
    for node in $(seq 1 "$NODES"); do
        alive "$dir/slurmd-node$node.pid" || slurmd -N "node$node"
    done
    # Wait for the controller and for every node to be idle.
    local deadline=$((SECONDS + 60))
    until [[ $(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l) == "$NODES" ]]; do
        if ((SECONDS > deadline)); then
            log "nodes not idle after 60 s:"
            sinfo >&2 || true
            tail -n 20 "$dir/slurmctld.log" >&2 || true
            exit 1
        fi
        sleep 1
    done
    log "8 nodes idle in $dir"
    echo "export SLURM_CONF=$SLURM_CONF"
}

stop_pidfiles() {  # stop_pidfiles PIDFILE...: SIGTERM to all, SIGKILL to those left after 10 s
    local pidfile pids=() pid running
    for pidfile in "$@"; do
        if alive "$pidfile"; then pids+=("$(cat "$pidfile")"); fi
    done
    ((${#pids[@]})) || return 0
    kill "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 1 50); do
        running=0
        for pid in "${pids[@]}"; do
            if kill -0 "$pid" 2>/dev/null; then running=1; fi
        done
        ((running)) || return 0
        sleep 0.2
    done
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
}

stop() {
    local dir=$1 node slurmds=()
    [[ -d $dir ]] || return 0
    export SLURM_CONF=$dir/slurm.conf
    if alive "$dir/slurmctld.pid"; then
        # Cancel what is left so no job step outlives its slurmd.
        scancel --user="$(id -un)" 2>/dev/null || true
        sleep 1
    fi
    for node in $(seq 1 "$NODES"); do slurmds+=("$dir/slurmd-node$node.pid"); done
    stop_pidfiles "${slurmds[@]}"
    stop_pidfiles "$dir/slurmctld.pid"
    stop_pidfiles "$dir/munge/munged.pid"
    log "stopped the daemons of $dir"
}

case "${1:-}" in
    install) install_packages ;;
    start) start "${2:?usage: cluster.sh start DIR}" ;;
    stop) stop "${2:?usage: cluster.sh stop DIR}" ;;
    *) echo "usage: $0 install | start DIR | stop DIR" >&2; exit 2 ;;
esac
