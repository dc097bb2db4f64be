# shellcheck shell=bash
# Sourced (never run) by slurm/llopsd_8node.sh, slurm/llopsd_1node.sh and slurm/evaluate.sh
# inside the batch job, after they set REPO_DIR. Holds what the three share: defaults, NCCL
# settings, the torch.distributed rendezvous, the srun (+ pyxis/enroot) launch, the
# checkpoint-and-requeue protocol and the choice of training recipe (algorithm=NAME). See
# docs/cluster.md.
#
# Environment (all optional; defaults in brackets):
#   CONTAINER_IMAGE   enroot image for pyxis: a .sqsh file or a registry URI
#                     [$REPO_DIR/containers/nemo-loop.sqsh]; "none" runs on the host
#   CONTAINER_MOUNTS  pyxis --container-mounts [$REPO_DIR:$REPO_DIR,$DATA_DIR:$DATA_DIR]
#   DATA_DIR          the shared data folder next to the repo [$REPO_DIR/../shared]
#   PYTHON            the interpreter that runs the recipe [python]
#   MASTER_PORT       rendezvous port [20000 + job id mod 20000]
#   MAX_REQUEUES      give up requeueing after this many restarts [20]

# The exit code with which a recipe says "checkpoint saved on the pre-timeout signal: requeue
# me" (nemo_loop/utils/preemption.py: REQUEUE_EXIT_CODE).
REQUEUE_EXIT_CODE=85

: "${SLURM_JOB_ID:?slurm/common.sh runs inside a Slurm job (sbatch)}"
REPO_DIR=$(cd "${REPO_DIR:?set REPO_DIR before sourcing slurm/common.sh}" && pwd)
: "${DATA_DIR:=$(cd "$REPO_DIR/.." && pwd)/shared}"
: "${CONTAINER_IMAGE:=$REPO_DIR/containers/nemo-loop.sqsh}"
: "${CONTAINER_MOUNTS:=$REPO_DIR:$REPO_DIR,$DATA_DIR:$DATA_DIR}"
: "${PYTHON:=python}"
: "${MAX_REQUEUES:=20}"

# --- NCCL / PyTorch settings for H100 nodes with InfiniBand (each can be overridden) --------
# Megatron-core needs one hardware work queue so TP/SP communication kernels run in issue order.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# A failed or timed-out collective aborts the process (and so ends the job) instead of hanging.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# Free communication buffers without record_stream: lower peak memory (megatron's advice).
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
# IB retransmission timeout 4.096 µs × 2^22 ≈ 17 s: ride out fabric hiccups at 64+ GPUs.
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
# More queue pairs per connection spread traffic over the adaptive-routing fabric paths.
export NCCL_IB_QPS_PER_CONNECTION=${NCCL_IB_QPS_PER_CONNECTION:-4}
# Print NCCL warnings (init problems, fallbacks to sockets) into the job log; INFO to debug.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Cluster-specific, set them in the environment if needed (check `ibstat` / `ip addr`):
#   NCCL_IB_HCA=mlx5_0,mlx5_3,...   only the compute-fabric HCAs (not storage/management ones)
#   NCCL_SOCKET_IFNAME=bond0        the interface for NCCL's bootstrap and socket fallback
#   NCCL_IB_GID_INDEX=3             RoCE clusters: the RoCEv2 GID
# One OpenMP thread per rank: 8 ranks share a node; the GPUs do the math.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Log lines reach the job output as they are printed.
export PYTHONUNBUFFERED=1

# --- torch.distributed rendezvous ------------------------------------------------------------
# Rank 0 runs on the job's first node. Its NodeAddr is the address Slurm itself uses to reach it
# (equal to the node name on most clusters; the test cluster runs all nodes on 127.0.0.1).
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
node_addr=$(scontrol show node "$first_node" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
export MASTER_ADDR=${MASTER_ADDR:-${node_addr:-$first_node}}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
unset first_node node_addr

# Each task maps Slurm's ids onto the variables torch.distributed (init_distributed) reads.
# The single quotes are intended: the variables expand in every task, not here.
# shellcheck disable=SC2016
TASK_WRAPPER='export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
NODE_RANK=$SLURM_NODEID
echo "[slurm-task] node=${SLURMD_NODENAME:-$(hostname)} RANK=$RANK LOCAL_RANK=$LOCAL_RANK" \
     "WORLD_SIZE=$WORLD_SIZE NODE_RANK=$NODE_RANK MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
exec "$@"'

srun_pid=

# Forward a signal that reached the batch shell (--signal=B:USR1@N, scancel --batch -s USR1)
# to the tasks: srun passes SIGUSR1 on to every task of its step.
forward_signal() {
    echo "[slurm] batch shell got SIG$1: forwarding it to the job step"
    [[ -n $srun_pid ]] && kill "-$1" "$srun_pid" 2>/dev/null
    return 0
}

# srun's options for running in the container (none when CONTAINER_IMAGE=none).
CONTAINER_ARGS=()
if [[ $CONTAINER_IMAGE != none ]]; then
    CONTAINER_ARGS=(--container-image="$CONTAINER_IMAGE" --container-mounts="$CONTAINER_MOUNTS"
                    --container-workdir="$REPO_DIR")
fi

# run_once CMD...: run CMD as a single task on the job's first node (in the container), e.g.
# the memory plan before the ranks start; return its exit code.
run_once() {
    echo "[slurm] $(date -u +%FT%TZ) one task: $*"
    (cd "$REPO_DIR" && srun --export=ALL --nodes=1 --ntasks=1 "${CONTAINER_ARGS[@]}" "$@")
}

# launch CMD...: run CMD once per Slurm task (in the container unless CONTAINER_IMAGE=none)
# with RANK/LOCAL_RANK/WORLD_SIZE/NODE_RANK/MASTER_ADDR/MASTER_PORT set; return its exit code.
launch() {
    local srun_args=(--export=ALL "${CONTAINER_ARGS[@]}")
    echo "[slurm] $(date -u +%FT%TZ) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0})" \
         "on $SLURM_JOB_NODELIST:" \
         "$SLURM_NTASKS tasks, rendezvous $MASTER_ADDR:$MASTER_PORT, image $CONTAINER_IMAGE"
    echo "[slurm] command: $*"
    trap 'forward_signal USR1' USR1
    srun "${srun_args[@]}" bash -c "$TASK_WRAPPER" slurm-task "$@" &
    srun_pid=$!
    local status
    while :; do
        status=0
        wait "$srun_pid" || status=$?
        # wait returns early (status > 128) when a trapped signal arrives; srun goes on.
        if ((status > 128)) && kill -0 "$srun_pid" 2>/dev/null; then continue; fi
        break
    done
    trap - USR1
    srun_pid=
    echo "[slurm] $(date -u +%FT%TZ) job step ended with exit code $status"
    return "$status"
}

# select_recipe [algorithm=NAME] OVERRIDES...: the recipe a training script runs. An optional
# first argument algorithm=NAME picks recipes/NAME.py (llopsd, grpo, rltt, oisd, ...; default
# llopsd); sets RECIPE to its path and RECIPE_ARGS to the remaining arguments (the overrides).
select_recipe() {
    local algorithm=llopsd
    if [[ ${1:-} == algorithm=* ]]; then
        algorithm=${1#algorithm=}
        shift
    fi
    RECIPE=recipes/$algorithm.py
    if [[ ! $algorithm =~ ^[a-z0-9_]+$ || ! -f $REPO_DIR/$RECIPE ]]; then
        local known=() path
        for path in "$REPO_DIR"/recipes/*.py; do
            known+=("$(basename "$path" .py)")
        done
        echo "[slurm] unknown algorithm '$algorithm': there is no $RECIPE" \
             "(recipes: ${known[*]})" >&2
        return 2
    fi
    # shellcheck disable=SC2034  # read by the batch scripts that source this file
    RECIPE_ARGS=("$@")
}

# launch_requeueable CMD...: launch; if the recipe exits with REQUEUE_EXIT_CODE (it saved a
# checkpoint on the pre-timeout signal), requeue this job, which resumes from that checkpoint.
launch_requeueable() {
    local status=0
    launch "$@" || status=$?
    if [[ $status == "$REQUEUE_EXIT_CODE" ]]; then
        local restarts=${SLURM_RESTART_COUNT:-0}
        if ((restarts >= MAX_REQUEUES)); then
            echo "[slurm] preempted, but the job already restarted $restarts times" \
                 "(MAX_REQUEUES=$MAX_REQUEUES): not requeueing"
            return "$status"
        fi
        echo "[slurm] checkpoint saved on the pre-timeout signal: requeueing job $SLURM_JOB_ID"
        # Ends this run of the job (the batch shell gets SIGTERM) and puts it back in the queue.
        scontrol requeue "$SLURM_JOB_ID"
        sleep 60  # not reached in practice: requeue kills this shell first
        return 0
    fi
    return "$status"
}
