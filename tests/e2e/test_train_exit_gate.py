"""recipes/train_exit_gate.py on a briefly pretrained model: the gate learns, nothing else moves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _run(*args, timeout=300):
    run = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from nemo_loop.checkpointing import load_model_checkpoint, resolve_checkpoint
    from nemo_loop.models.looplm.model import build_loop_model

    resolved = resolve_checkpoint(str(directory))
    model = build_loop_model(resolved.model_config.transformer_config())
    load_model_checkpoint(model, resolved.directory)
    return {name: param.detach().clone() for name, param in model.named_parameters()}


@pytest.mark.slow
def test_gate_training_changes_the_gate_only(tmp_path, megatron_single_process):
    pretrained, gated = tmp_path / "pretrain", tmp_path / "gate"
    _run("recipes/pretrain_looplm.py", "trainer.max_steps=3", "validation_problems=16",
         "test_problems=16", f"output_dir={pretrained}")
    run = _run("recipes/train_exit_gate.py", f"trainer.init_from={pretrained}",
               "trainer.max_steps=8", "trainer.log_interval=1", "trainer.micro_batch_size=64",
               "trainer.global_batch_size=64", f"output_dir={gated}")
    assert "gate BCE" in run.stdout
    records = [json.loads(line) for line in (gated / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records[-1]["loss"] < records[0]["loss"]
    before, after = _weights(pretrained / "model"), _weights(gated / "model")
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"exit_gate.weight", "exit_gate.bias"}


def test_gate_training_needs_a_trained_model(tmp_path):
    from nemo_loop.algorithms.exit_gate import ExitGateConfig, ExitGateLossConfig
    from nemo_loop.config import CONF_DIR, load_config

    with pytest.raises(ValueError, match="trainer.init_from is required"):
        load_config(ExitGateConfig, CONF_DIR / "exit_gate.yaml")
    with pytest.raises(FileNotFoundError, match="trainer.init_from"):
        load_config(ExitGateConfig, CONF_DIR / "exit_gate.yaml",
                    [f"trainer.init_from={tmp_path}/nothing"])
    with pytest.raises(ValueError, match="gate.slope"):
        ExitGateLossConfig(slope=0).validate()
