"""Pretraining resumes exactly: after a preemption signal (in-process) and after a SIGKILL in
the middle of a save (the recipe in subprocesses), which also must leave no process behind."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from nemo_loop.algorithms import pretrain
from nemo_loop.config import CONF_DIR, load_config
from nemo_loop.utils.preemption import Preempted
from tests.processes import survivors

ROOT = Path(__file__).resolve().parents[2]
TINY_RUN = ["trainer.micro_batch_size=8", "trainer.global_batch_size=8", "trainer.log_interval=1",
            "trainer.eval_interval=0", "optim.warmup_steps=2", "validation_problems=8",
            "test_problems=8"]


def _losses(run: Path) -> dict[int, float]:
    """Step → loss from metrics.jsonl; a step logged twice is an error."""
    losses = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            assert record["step"] not in losses, f"step {record['step']} logged twice"
            losses[record["step"]] = record["loss"]
    return losses


@pytest.mark.resume
def test_preempted_pretraining_saves_exits_85_and_resumes_exactly(megatron_single_process,
                                                                   tmp_path, monkeypatch):
    def config(run, *overrides):
        return load_config(pretrain.PretrainConfig, CONF_DIR / "pretrain.yaml", [
            f"output_dir={run}", "trainer.max_steps=4", *TINY_RUN, *overrides])

    straight = pretrain.pretrain(config(tmp_path / "straight"))
    real_step = pretrain.train_step
    steps = []

    def step_then_signal(*args, **kwargs):
        metrics = real_step(*args, **kwargs)
        steps.append(metrics)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # what slurm sends before the time limit
        return metrics

    monkeypatch.setattr(pretrain, "train_step", step_then_signal)
    with pytest.raises(Preempted) as raised:
        pretrain.pretrain(config(tmp_path / "resumed"))
    assert raised.value.step == 2 and raised.value.code == 85
    assert (tmp_path / "resumed" / "checkpoints" / "latest_checkpointed_step.txt").read_text() \
        == "2"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored
    monkeypatch.setattr(pretrain, "train_step", real_step)

    resumed = pretrain.pretrain(config(tmp_path / "resumed"))
    assert [m["step"] for m in resumed if "loss" in m] == [3, 4]
    logged = [json.loads(line)["step"] for line in
              (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]  # every step once, the last one too (held-out scores in it)
    expected = [m["loss"] for m in straight if "loss" in m]
    assert [m["loss"] for m in steps + resumed if "loss" in m] == expected
    assert len(set(expected)) == 4  # the steps really differ
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")
    assert (tmp_path / "resumed" / "model" / "checkpoint.json").is_file()


def test_a_pre_timeout_signal_during_setup_requeues_before_the_first_step(
        megatron_single_process, tmp_path, monkeypatch):
    """SIGUSR1 while the model is being built used to end the process with -10 (its default
    action), which the batch script does not requeue. Now the handler is installed before the
    setup, and the loop exits for a requeue (85) before step 1: nothing new to save."""
    received = []

    def stand_in(signum, frame):
        """For SIGUSR1's default action, which would end pytest: without the fix the signal
        lands here and training simply runs on."""
        received.append(signum)

    previous = signal.signal(signal.SIGUSR1, stand_in)
    real_build = pretrain.build_trainable_model

    def build_after_a_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)  # slurm's pre-timeout signal, during setup
        return real_build(*args, **kwargs)

    monkeypatch.setattr(pretrain, "build_trainable_model", build_after_a_signal)
    run = tmp_path / "run"
    config = load_config(pretrain.PretrainConfig, CONF_DIR / "pretrain.yaml", [
        f"output_dir={run}", "trainer.max_steps=2", *TINY_RUN])
    try:
        with pytest.raises(Preempted) as raised:
            pretrain.pretrain(config)
        assert raised.value.code == 85 and raised.value.step == 0
        assert received == []  # the run's handler took it, and restored this one after
        assert signal.getsignal(signal.SIGUSR1) is stand_in
        assert not (run / "metrics.jsonl").exists()
        assert not any((run / "checkpoints").glob("step_*"))
    finally:
        signal.signal(signal.SIGUSR1, previous)


# Runs the recipe, but SIGKILLs itself in the middle of its second save (shards written, not yet
# renamed into place), after writing the PIDs of all its descendants to argv[1].
KILLED_DURING_SAVE = """
import json, os, signal, sys
from pathlib import Path

import psutil

sys.path.insert(0, {root!r})
from nemo_loop import checkpointing

real_save_rng_states = checkpointing._save_rng_states
saves = []


def save_then_die(directory):
    real_save_rng_states(directory)
    saves.append(directory)
    if len(saves) == 2:
        children = [p.pid for p in psutil.Process().children(recursive=True)]
        Path(sys.argv[1]).write_text(json.dumps(children))
        os.kill(os.getpid(), signal.SIGKILL)


checkpointing._save_rng_states = save_then_die
from recipes.pretrain_looplm import main

main(sys.argv[2:])
"""


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.resume
def test_kill_during_a_save_leaves_no_process_and_the_rerun_resumes_exactly(tmp_path):
    overrides = ["trainer.max_steps=6", "trainer.save_interval=2", *TINY_RUN]
    straight = _run(["recipes/pretrain_looplm.py", f"output_dir={tmp_path / 'straight'}",
                     *overrides])
    assert straight.returncode == 0, straight.stderr[-3000:]

    run, children_file = tmp_path / "killed", tmp_path / "children.json"
    killed = _run(["-c", KILLED_DURING_SAVE.format(root=str(ROOT)), str(children_file),
                   f"output_dir={run}", *overrides])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    children = json.loads(children_file.read_text())
    remaining = survivors(children, grace_s=5.0)
    for pid in remaining:  # clean up what the run left, by PID, before failing
        psutil.Process(pid).kill()
    assert remaining == [], f"processes outlived the killed run: {remaining} of {children}"
    checkpoints = run / "checkpoints"
    assert (checkpoints / "step_0000004.tmp").is_dir()  # killed mid-save
    assert (checkpoints / "latest_checkpointed_step.txt").read_text() == "2"

    resumed = _run(["recipes/pretrain_looplm.py", f"output_dir={run}", *overrides])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"removed {checkpoints / 'step_0000004.tmp'}" in resumed.stdout
    assert f"resumed from step 2 (checkpoint {checkpoints / 'step_0000002'})" in resumed.stdout
    losses = _losses(run)  # each step once: what was logged after step 2 was dropped
    assert list(losses) == [1, 2, 3, 4, 5, 6]
    assert losses == _losses(tmp_path / "straight")
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "latest_checkpointed_step.txt", "step_0000004", "step_0000006"]  # keep_last=2
