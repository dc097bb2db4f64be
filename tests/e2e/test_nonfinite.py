"""Broken settings are stopped, not trained on (issue 23): pretraining at optim.lr=1e6 skips its
non-finite steps, stops with an error after trainer.max_skipped_steps of them and leaves its last
checkpoints finite and loadable, with strict-JSON metrics; LLOPSD at the same setting collapses
(entropy and loss 0, nothing non-finite) and says so once."""

import json
import logging

import pytest
import torch

from nemo_loop.algorithms import pretrain
from nemo_loop.algorithms.llopsd import LLOPSDConfig, train
from nemo_loop.algorithms.training_run import NonFiniteTrainingError
from nemo_loop.config import CONF_DIR, load_config


def _strict_records(path):
    def refuse(token):
        raise ValueError(f"bare {token} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_pretraining_at_lr_1e6_stops_and_keeps_finite_checkpoints(megatron_single_process,
                                                                  tmp_path):
    from nemo_loop.checkpointing import complete_checkpoints, load_model_checkpoint
    from nemo_loop.models.looplm.model import build_loop_model

    run = tmp_path / "run"
    config = load_config(pretrain.PretrainConfig, CONF_DIR / "pretrain.yaml", [
        f"output_dir={run}", "optim.lr=1e6", "optim.min_lr=0", "optim.warmup_steps=0",
        "trainer.max_steps=40", "trainer.save_interval=1", "checkpoint.keep_last=2",
        "trainer.max_skipped_steps=3", "trainer.micro_batch_size=16",
        "trainer.global_batch_size=16", "trainer.log_interval=1", "trainer.eval_interval=0",
        "validation_problems=8", "test_problems=8"])
    with pytest.raises(NonFiniteTrainingError) as raised:
        pretrain.pretrain(config)

    records = _strict_records(run / "metrics.jsonl")
    skipped = [record for record in records if record["update_skipped"]]
    assert [record["skipped_steps"] for record in skipped] == [1, 2, 3]
    last = records[-1]["step"]
    assert [record["step"] for record in skipped] == [last - 2, last - 1, last]
    for record in skipped:  # what was not finite is null, and named
        assert record["nonfinite"] and all(record[key] is None or None in record[key]
                                           for key in record["nonfinite"])
        assert record["nonfinite_loss"] or record["nonfinite_grads"]
    first = "the loss" if skipped[0]["nonfinite_loss"] else "the gradients"
    assert str(raised.value).startswith(
        f"training stopped at step {last}: 3 steps in a row were skipped "
        f"(trainer.max_skipped_steps=3) because their update was not finite; the first "
        f"non-finite quantity was {first} at step {last - 2}")

    checkpoints = complete_checkpoints(run / "checkpoints")
    assert len(checkpoints) == 2  # keep_last=2 kept the newest two, both finite
    assert checkpoints[0][0] == last - 1  # the skipped steps' weights are the last finite ones
    assert f"the newest checkpoint is {checkpoints[0][1]} (step {last - 1})" in str(raised.value)
    for _, directory in checkpoints:
        model = build_loop_model(config.model.transformer_config())
        load_model_checkpoint(model, directory)
        assert all(torch.isfinite(param).all() for param in model.parameters())
        assert max(param.abs().max() for param in model.parameters()) > 1e3  # really trained


def test_llopsd_collapse_at_lr_1e6_is_warned_once_with_the_numbers(megatron_single_process,
                                                                   tmp_path, caplog):
    config = load_config(LLOPSDConfig, CONF_DIR / "llopsd.yaml", [
        f"output_dir={tmp_path}", "rollout.max_new_tokens=6", "data.limit=8",
        "trainer.prompts_per_step=2", "trainer.micro_batch_size=1", "trainer.max_steps=6",
        "optim.lr=1e6", "optim.min_lr=0", "trainer.collapse_steps=3"])
    with caplog.at_level(logging.WARNING, logger="nemo_loop.algorithms.llopsd"):
        history = train(config)
    warnings = [r.getMessage() for r in caplog.records if "has collapsed" in r.getMessage()]
    assert len(warnings) == 1, warnings
    collapsed = [step for step, m in enumerate(history, start=1)
                 if max(m["student_entropy_per_loop"]) < 1e-3 and abs(m["loss"]) < 1e-4]
    assert len(collapsed) >= 3
    assert "stayed ≈ 0 for 3 steps in a row (step " in warnings[0]
    assert "entropy per loop [0.00e+00 0.00e+00], loss 0.00e+00" in warnings[0]
    assert "learning rate (now 9.9" in warnings[0]
