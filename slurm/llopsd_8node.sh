#!/usr/bin/env bash
#SBATCH --job-name=llopsd-8node
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
#SBATCH --open-mode=append
#SBATCH --signal=USR1@600
#SBATCH --requeue
#
# LLOPSD — or any training recipe — on 8 nodes × 8 GPUs (64 ranks). Submit from the repository
# root; arguments are config overrides for recipes/llopsd.py, or, after a first argument
# algorithm=NAME, for recipes/NAME.py (grpo, rltt, oisd, ...):
#
#   sbatch slurm/llopsd_8node.sh --config conf/cluster/ouro_1p4b_64gpu.yaml trainer.max_steps=500
#   sbatch slurm/llopsd_8node.sh model=ouro_1p4b parallel.tensor_parallel=2 output_dir=runs/x
#
# Logs: <job-name>-<job-id>.out/.err in the submit directory (appended across requeues).
# Pre-timeout: 600 s before the time limit Slurm sends SIGUSR1 to every task (not the batch
# shell); training saves a checkpoint after the current step and exits with code 85, and this
# script requeues the job, which resumes from that checkpoint (trainer.resume=true, the default).
# Environment knobs (CONTAINER_IMAGE=none, CONTAINER_MOUNTS, PYTHON, ...): slurm/common.sh.
#
# Memory plan: `bash slurm/llopsd_8node.sh --dry-run [algorithm=NAME] ARGS...` prints the per-rank
# plan of the job on the login node and exits (3 when it does not fit); inside the job the same
# plan runs first and a layout that does not fit ends it before the ranks start (slurm/plan.sh).
set -euo pipefail
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ ! -f $REPO_DIR/recipes/llopsd.py ]]; then
    echo "submit from the nemo-loop repository root or set REPO_DIR (got $REPO_DIR)" >&2
    exit 2
fi
# shellcheck source=slurm/plan.sh
source "$REPO_DIR/slurm/plan.sh"
if [[ ${1:-} == --dry-run ]]; then
    shift
    dry_run "${BASH_SOURCE[0]}" "$@"
fi
# shellcheck source=slurm/common.sh
source "$REPO_DIR/slurm/common.sh"
select_recipe "$@"
plan_command "$SLURM_NTASKS" "$@"
run_once "$PYTHON" "${PLAN_COMMAND[@]}"
launch_requeueable "$PYTHON" "$RECIPE" "${RECIPE_ARGS[@]}"
