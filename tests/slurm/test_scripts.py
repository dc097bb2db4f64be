"""The Slurm scripts' shell (shellcheck), the 64-GPU presets and the preemption handler."""

import os
import signal
import subprocess
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
