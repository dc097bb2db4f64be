# shellcheck shell=bash
# Sourced (never run) by slurm/llopsd_8node.sh and slurm/llopsd_1node.sh: the memory plan of the
# run they would launch (recipes/plan.py, docs/cluster.md "Memory plan"). `--dry-run` prints it
# on the login node before anything is allocated; inside the job it runs once more, as one task,
# before the ranks start, and a layout that does not fit ends the job there, naming the part of
# the step that overflows.
#
# Environment (optional):
#   PLAN_ARGS   extra planner options, e.g. "--device-memory-gib 141 --prompt-tokens 1024"

# header_world_size SCRIPT: nodes × tasks per node from SCRIPT's #SBATCH header.
header_world_size() {
    local nodes tasks
    nodes=$(sed -n 's/^#SBATCH --nodes=\([0-9][0-9]*\).*/\1/p' "$1" | head -n1)
    tasks=$(sed -n 's/^#SBATCH --ntasks-per-node=\([0-9][0-9]*\).*/\1/p' "$1" | head -n1)
    echo $((${nodes:-1} * ${tasks:-1}))
}

# plan_command WORLD_SIZE [algorithm=NAME] OVERRIDES...: sets PLAN_COMMAND to the planner's
# command line for the recipe (default llopsd) and overrides a training script was given.
plan_command() {
    local world_size=$1 algorithm=llopsd
    shift
    if [[ ${1:-} == algorithm=* ]]; then
        algorithm=${1#algorithm=}
        shift
    fi
    local extra=()
    if [[ -n ${PLAN_ARGS:-} ]]; then
        read -r -a extra <<<"$PLAN_ARGS"
    fi
    PLAN_COMMAND=(recipes/plan.py --algorithm "$algorithm" --world-size "$world_size"
                  "${extra[@]}" "$@")
}

# dry_run SCRIPT ARGS...: print the plan of `sbatch SCRIPT ARGS...` and exit with its status
# (0: fits, 3: does not fit, other: the config does not load).
dry_run() {
    local script=$1
    shift
    plan_command "$(header_world_size "$script")" "$@"
    cd "$REPO_DIR" && exec "${PYTHON:-python}" "${PLAN_COMMAND[@]}"
}
