"""The Slurm scripts' shell (shellcheck), the 64-GPU presets and the preemption handler."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemo_loop.utils.preemption import REQUEUE_EXIT_CODE, Preempted, PreemptionHandler

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "slurm").glob("*.sh")) + [REPO / "tests" / "slurm" / "cluster.sh"]


def test_shellcheck_is_clean(slurm_packages):
    assert len(SCRIPTS) >= 5
    result = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_requeue_exit_code_matches_the_batch_scripts():
    assert f"REQUEUE_EXIT_CODE={REQUEUE_EXIT_CODE}\n" in (REPO / "slurm" / "common.sh").read_text()


@pytest.mark.parametrize("preset, model, layers, tensor_parallel, data_parallel", [
    ("ouro_1p4b_64gpu", "ouro_1p4b", 24, 1, 64),
    ("ouro_2p6b_64gpu", "ouro_2p6b", 48, 2, 32),
])
def test_64gpu_presets_load_and_fit_64_ranks(preset, model, layers, tensor_parallel,
                                             data_parallel):
    from nemo_loop.algorithms.llopsd import LLOPSDConfig
    from nemo_loop.config import CONF_DIR, load_config

    config = load_config(LLOPSDConfig, CONF_DIR / "cluster" / f"{preset}.yaml",
                         ["trainer.max_steps=10"])
    config.validate(world_size=64)  # PP=1, divisibility of batch and heads/vocab by TP
    assert (config.model.name, config.model.num_layers) == (model, layers)
    assert config.model.params_dtype == "bfloat16"
    assert config.parallel.tensor_parallel == tensor_parallel
    assert config.parallel.pipeline_parallel == 1
    assert config.parallel.data_parallel(64) == data_parallel
    assert config.trainer.max_steps == 10
    from nemo_loop.algorithms.memory_plan import PlanAssumptions, plan_training
    from nemo_loop.algorithms.registry import algorithm

    plan = plan_training(algorithm("llopsd"), config, PlanAssumptions(world_size=64))
    assert plan.layout.endswith("= 64 ranks") and plan.fits, plan.render()


def _dry_run(script, *arguments):
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env.update(PYTHON=sys.executable, PYTHONPATH=str(REPO))
    return subprocess.run(["bash", f"slurm/{script}", "--dry-run", *arguments], cwd=REPO,
                          env=env, capture_output=True, text=True)


def test_dry_run_prints_the_plan_of_the_job_before_anything_is_allocated():
    """No Slurm job: the world size comes from the script's #SBATCH header (8 × 8)."""
    result = _dry_run("llopsd_8node.sh", "--config", "conf/cluster/ouro_2p6b_64gpu.yaml")
    assert result.returncode == 0, result.stderr
    for line in ("memory plan: llopsd, model ouro_2p6b", "TP 2 × PP 1 × DP 32 = 64 ranks",
                 "KV cache", "activations", "optimizer shard", "FLOPs per step"):
        assert line in result.stdout, result.stdout
    assert "of 80.0 GiB device memory: fits" in result.stdout


def test_dry_run_refuses_a_layout_that_does_not_fit_naming_the_part():
    result = _dry_run("llopsd_1node.sh", "algorithm=grpo", "model=ouro_1p4b",
                      "trainer.prompts_per_step=64", "rollout.max_new_tokens=3072",
                      "trainer.micro_batch_size=64")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "DP 8 = 8 ranks" in result.stdout  # the 1-node script's 8 tasks
    assert "refused: grpo does not fit" in result.stderr
    assert "the largest part is activations" in result.stderr


def test_usr1_sets_the_flag_until_closed():
    previous = signal.getsignal(signal.SIGUSR1)
    handler = PreemptionHandler()
    assert not handler.stop_requested()
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGUSR1)  # repeated: still only a flag
    assert handler.stop_requested() and handler.received == signal.SIGUSR1
    handler.close()
    assert signal.getsignal(signal.SIGUSR1) is previous


def test_sigterm_is_caught_once_then_the_previous_handler_is_back():
    caught = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))
    try:
        handler = PreemptionHandler()
        os.kill(os.getpid(), signal.SIGTERM)
        assert handler.stop_requested() and caught == []
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM goes where it went before
        assert caught == [signal.SIGTERM]
        handler.close()
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_preempted_exits_with_the_requeue_code():
    with pytest.raises(SystemExit) as raised:
        raise Preempted(step=3)
    assert raised.value.code == REQUEUE_EXIT_CODE and raised.value.step == 3


def test_train_saves_and_raises_preempted_on_the_signal(megatron_single_process, tmp_path,
                                                        monkeypatch):
    from nemo_loop.algorithms import llopsd
    from nemo_loop.config import CONF_DIR, load_config

    config = load_config(llopsd.LLOPSDConfig, CONF_DIR / "llopsd.yaml", [
        f"output_dir={tmp_path}", "rollout.max_new_tokens=2", "data.limit=4",
        "trainer.prompts_per_step=1", "trainer.micro_batch_size=1", "trainer.max_steps=5"])
    real_step = llopsd.llopsd_step

    def step_then_signal(state):
        metrics = real_step(state)
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return metrics

    monkeypatch.setattr(llopsd, "llopsd_step", step_then_signal)
    with pytest.raises(Preempted) as raised:
        llopsd.train(config)
    assert raised.value.step == 2
    assert (tmp_path / "checkpoints" / "latest_checkpointed_step.txt").read_text() == "2"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored
    assert torch.distributed.is_initialized()


@pytest.mark.parametrize("arguments, recipe, overrides", [
    (["algorithm=grpo", "trainer.max_steps=3", "output_dir=runs/a b"], "recipes/grpo.py",
     ["trainer.max_steps=3", "output_dir=runs/a b"]),
    (["algorithm=rltt"], "recipes/rltt.py", []),
    (["algorithm=oisd", "model=tiny"], "recipes/oisd.py", ["model=tiny"]),
    (["algorithm=looprpt", "--config", "conf/looprpt_text.yaml"], "recipes/looprpt.py",
     ["--config", "conf/looprpt_text.yaml"]),
    (["algorithm=pretrain_looplm", "--config", "conf/pretrain_text.yaml"],
     "recipes/pretrain_looplm.py", ["--config", "conf/pretrain_text.yaml"]),
    (["trainer.max_steps=3"], "recipes/llopsd.py", ["trainer.max_steps=3"]),
])
def test_training_scripts_run_the_recipe_algorithm_names(arguments, recipe, overrides):
    """slurm/llopsd_{1,8}node.sh: select_recipe (slurm/common.sh) maps a first argument
    algorithm=NAME to recipes/NAME.py and passes the rest on unchanged."""
    result = _select_recipe(arguments)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\0")[:-1] == [recipe, *overrides]
    for script in ("llopsd_8node.sh", "llopsd_1node.sh"):
        text = (REPO / "slurm" / script).read_text()
        assert 'select_recipe "$@"' in text and '"$RECIPE" "${RECIPE_ARGS[@]}"' in text


def test_an_unknown_algorithm_is_refused_naming_the_recipes():
    result = _select_recipe(["algorithm=ppo"])
    assert result.returncode == 2
    assert "unknown algorithm 'ppo': there is no recipes/ppo.py" in result.stderr
    assert "grpo" in result.stderr and "oisd" in result.stderr


def _select_recipe(arguments):
    """Run select_recipe from slurm/common.sh alone (the file itself needs a Slurm job)."""
    program = ('set -euo pipefail; REPO_DIR=$1; shift; '
               'eval "$(sed -n "/^select_recipe() {/,/^}/p" "$REPO_DIR/slurm/common.sh")"; '
               'select_recipe "$@"; printf "%s\\0" "$RECIPE" "${RECIPE_ARGS[@]}"')
    return subprocess.run(["bash", "-c", program, "bash", str(REPO), *arguments],
                          capture_output=True, text=True)
