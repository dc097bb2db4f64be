"""LoopRPT and text pretraining end to end: short runs that must lower the hard-token
cross-entropy at the early loops (shell game and MATH text), the recipes, and exact resume after
a preemption signal (LoopRPT on the shell game, Ouro's loss on the text corpus).

Thresholds (fixed seeds, from a random init): the mean hard-token CE of loops 1 and 2 over the
last 3 logged steps is at least ``*_DROP`` nats below step 1's. Measured when written (mean of
the last 3 steps): shell game, 30 steps, L1 4.21 → ~1.3 and L2 4.18 → ~1.0; MATH text, 12 steps
at lr 1e-2, L1 10.83 → 8.17 and L2 10.84 → 7.96.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_loop.config import CONF_DIR, load_config

ROOT = Path(__file__).resolve().parents[2]
SHELL_GAME_DROP = 1.5
TEXT_DROP = 1.0


@pytest.fixture(scope="module")
def math_corpus(tmp_path_factory):
    """The first 200 MATH problems + solutions (MATH500 excluded), through the recipe."""
    prefix = tmp_path_factory.mktemp("corpus") / "math"
    run = subprocess.run([sys.executable, "recipes/preprocess_text.py", "limit=200",
                          f"output_prefix={prefix}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"wrote {prefix}.bin/.idx/.meta.json: 200 documents" in run.stdout
    return prefix


def _looprpt_config(output_dir, *overrides):
    from nemo_loop.algorithms.looprpt import LoopRPTConfig

    return load_config(LoopRPTConfig, CONF_DIR / "looprpt.yaml", [
        f"output_dir={output_dir}", "trainer.log_interval=1", "trainer.eval_interval=0",
        "optim.warmup_steps=0", "validation_problems=16", "test_problems=16",
        "checkpoint.check_free_space=false", *overrides])


def _text_overrides(corpus):
    return ["model=tiny_chat", "data.source=text", f"data.text.paths=[{corpus}]",
            "data.text.sequence_length=16", "data.text.validation_sequences=4",
            "data.text.test_sequences=4"]


def _early_loop_drop(history):
    steps = [m for m in history if "hard_ce_per_loop" in m]
    first, last = steps[0]["hard_ce_per_loop"], [m["hard_ce_per_loop"] for m in steps[-3:]]
    return [first[r] - sum(m[r] for m in last) / len(last) for r in (0, 1)]


@pytest.mark.slow
def test_looprpt_on_the_shell_game_lowers_hard_token_ce_at_early_loops(
        megatron_single_process, tmp_path):
    from nemo_loop.algorithms import looprpt

    history = looprpt.train(_looprpt_config(
        tmp_path, "trainer.max_steps=30", "trainer.micro_batch_size=16",
        "trainer.global_batch_size=16"))
    drops = _early_loop_drop(history)
    assert min(drops) >= SHELL_GAME_DROP, drops
    final = history[-1]
    assert len(final["validation_accuracy_per_loop"]) == 4
    step = history[0]
    assert len(step["reward_per_loop"]) == len(step["hard_accuracy_per_loop"]) == 4
    assert sum(step["exit_prob_per_loop"]) == pytest.approx(1.0, abs=1e-5)
    assert step["flops_student"] == pytest.approx(3 * 9 * step["flops_teacher"], rel=1e-9)
    assert (tmp_path / "model" / "checkpoint.json").is_file()


@pytest.mark.slow
def test_looprpt_on_math_text_lowers_hard_token_ce_at_early_loops(
        megatron_single_process, math_corpus, tmp_path):
    from nemo_loop.algorithms import looprpt

    history = looprpt.train(_looprpt_config(
        tmp_path, *_text_overrides(math_corpus), "trainer.max_steps=12",
        "trainer.micro_batch_size=4", "trainer.global_batch_size=4", "looprpt.num_rollouts=2",
        "optim.lr=1e-2", "optim.min_lr=1e-2"))
    drops = _early_loop_drop(history)
    assert min(drops) >= TEXT_DROP, drops
    assert len(history[-1]["test_ce_per_loop"]) == 4
    # ⌈20% of 16⌉ = 4 hard tokens in each of the 4 sequences (every position is a target)
    assert history[0]["hard_tokens"] == 4 * 4 and history[0]["num_tokens"] == 4 * 16


def _preempt_at(module, step_number, monkeypatch):
    """Make ``module.train_step`` send SIGUSR1 (Slurm's pre-timeout signal) after step N."""
    real, done = module.train_step, []

    def step_then_signal(*args, **kwargs):
        metrics = real(*args, **kwargs)
        done.append(metrics)
        if len(done) == step_number:
            os.kill(os.getpid(), signal.SIGUSR1)
        return metrics

    monkeypatch.setattr(module, "train_step", step_then_signal)
    return real


def _losses(history):
    return [m["loss"] for m in history if "loss" in m]


@pytest.mark.resume
def test_preempted_looprpt_resumes_exactly(megatron_single_process, tmp_path, monkeypatch):
    from nemo_loop.algorithms import looprpt
    from nemo_loop.utils.preemption import Preempted

    overrides = ["trainer.max_steps=4", "trainer.micro_batch_size=4",
                 "trainer.global_batch_size=8", "looprpt.num_rollouts=2"]
    straight = looprpt.train(_looprpt_config(tmp_path / "straight", *overrides))
    real = _preempt_at(looprpt, 2, monkeypatch)
    with pytest.raises(Preempted) as raised:
        looprpt.train(_looprpt_config(tmp_path / "resumed", *overrides))
    assert raised.value.step == 2
    monkeypatch.setattr(looprpt, "train_step", real)
    resumed = looprpt.train(_looprpt_config(tmp_path / "resumed", *overrides))
    assert [m["step"] for m in resumed if "loss" in m] == [3, 4]
    expected = _losses(straight)
    assert len(set(expected)) == 4
    assert _losses(resumed) == expected[2:]  # the EMA teacher, noise and data resumed exactly
    records = [json.loads(line) for line in
               (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.resume
def test_text_pretraining_resumes_exactly(megatron_single_process, math_corpus, tmp_path,
                                          monkeypatch):
    from nemo_loop.algorithms import pretrain
    from nemo_loop.utils.preemption import Preempted

    def config(run):
        return load_config(pretrain.PretrainConfig, CONF_DIR / "pretrain_text.yaml", [
            *_text_overrides(math_corpus), f"output_dir={run}", "trainer.max_steps=4",
            "trainer.micro_batch_size=2", "trainer.global_batch_size=4",
            "trainer.log_interval=1", "trainer.eval_interval=2", "optim.warmup_steps=0",
            "checkpoint.check_free_space=false"])

    straight = pretrain.pretrain(config(tmp_path / "straight"))
    assert [list(m) for m in straight if "validation_ce_per_loop" in m][0] == [
        "validation_ce_per_loop", "test_ce_per_loop"]
    real = _preempt_at(pretrain, 2, monkeypatch)
    with pytest.raises(Preempted):
        pretrain.pretrain(config(tmp_path / "resumed"))
    monkeypatch.setattr(pretrain, "train_step", real)
    resumed = pretrain.pretrain(config(tmp_path / "resumed"))
    expected = _losses(straight)
    assert len(set(expected)) == 4 and expected[0] > 10.0  # ≈ log 49152 from a random init
    assert _losses(resumed) == expected[2:]
    assert resumed[-1] == straight[-1]  # the held-out CE per loop after the last step


@pytest.mark.slow
def test_looprpt_recipe(tmp_path):
    run = subprocess.run(
        [sys.executable, "recipes/looprpt.py", "trainer.max_steps=2", "trainer.log_interval=1",
         "trainer.micro_batch_size=4", "trainer.global_batch_size=4", "looprpt.num_rollouts=2",
         "validation_problems=8", "test_problems=8", f"output_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "hard CE L1=" in run.stdout and "test accuracy per loop: L1=" in run.stdout
    assert "looprpt:" in (tmp_path / "config.yaml").read_text()
    assert (tmp_path / "model" / "checkpoint.json").is_file()
