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
         "trainer.log_interval=4", f"output_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "CE per loop L1=" in run.stdout and "L4=" in run.stdout
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 4, 8, 12]
    assert all(len(r["ce_per_loop"]) == 4 for r in records)
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
