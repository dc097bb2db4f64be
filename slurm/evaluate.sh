#!/usr/bin/env bash
#SBATCH --job-name=nemo-loop-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
#
# Evaluate a LoopLM checkpoint (recipes/evaluate.py) on math benchmarks at several loop budgets.
# Submit from the repository root; arguments are config overrides for conf/eval.yaml:
#
#   sbatch slurm/evaluate.sh checkpoint=runs/llopsd/checkpoints benchmarks=[math500,aime24]
#
# The evaluation splits the model over tensor-parallel ranks only (no data parallelism), so use
# one task per TP rank:
#
#   sbatch --ntasks-per-node=2 --gpus-per-node=2 slurm/evaluate.sh tensor_parallel=2 ...
#
# Environment knobs (CONTAINER_IMAGE=none, CONTAINER_MOUNTS, PYTHON, ...): slurm/common.sh.
set -euo pipefail
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ ! -f $REPO_DIR/recipes/evaluate.py ]]; then
    echo "submit from the nemo-loop repository root or set REPO_DIR (got $REPO_DIR)" >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source "$REPO_DIR/slurm/common.sh"
launch "$PYTHON" recipes/evaluate.py "$@"
