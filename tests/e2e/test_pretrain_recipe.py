import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_pretrain_recipe_runs_and_learns(tmp_path):
    run = subprocess.run(
        [sys.executable, "recipes/pretrain_looplm.py", "trainer.max_steps=12",
         "trainer.log_interval=4", "trainer.eval_interval=8", "optim.warmup_steps=0",
         "validation_problems=32", "test_problems=64", f"output_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "CE per loop L1=" in run.stdout and "L4=" in run.stdout
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    # one record per step: held-out scores join the record of the step they follow
    assert [r["step"] for r in records] == [1, 4, 8, 12]
    assert all("loss" in r for r in records)
    assert "validation_accuracy_per_loop" in records[2]
    final = records[-1]
    for split in ("validation", "test"):
        accuracy = final[f"{split}_accuracy_per_loop"]
        assert len(accuracy) == 4 and all(0.0 <= a <= 1.0 for a in accuracy)
    assert "test accuracy per loop: L1=" in run.stdout
    assert (tmp_path / "model" / "metadata.json").is_file()
    assert "model:" in (tmp_path / "config.yaml").read_text()
    assert all(len(r["ce_per_loop"]) == 4 for r in records)
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
