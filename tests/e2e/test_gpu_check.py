"""benchmarks/gpu_check.py --smoke: the GPU check's code at tiny sizes on CPU, every part."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_smoke_runs_every_part(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out",
                             str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text())
    failed = {name: part.get("traceback", part.get("error"))
              for name, part in report["parts"].items() if not part["ok"]}
    assert result.returncode == 0 and not failed, failed or result.stderr[-3000:]
    parts = report["parts"]
    assert set(parts) == {"parity", "train_step", "fused_loss", "generation", "llopsd_step"}
    assert parts["parity"]["within_1e-4"] and parts["parity"]["grad_scale"] > 0
    for recompute in ("recompute_none", "recompute_full"):
        step = parts["train_step"][recompute]
        assert step["tokens_per_s"] > 0 and step["flops_per_step"] > 0
        # A wiring check of the plan-vs-peak figure (the 20% check on real configs is
        # tests/unit/test_memory_plan.py): at these 2-MiB sizes small tensors weigh in.
        assert 0.7 <= step["planned_over_measured"] <= 1.3, step
    # The two runs train the same function: recompute changes memory, not the loss.
    assert parts["train_step"]["recompute_none"]["loss"] == \
        parts["train_step"]["recompute_full"]["loss"]
    assert parts["fused_loss"]["loss"] > 0 and parts["fused_loss"]["step_peak_gib"] > 0
    assert set(parts["generation"]["tokens_per_s"]) == {"1", "2", "3", "4"}
    llopsd = parts["llopsd_step"]
    assert llopsd["flops"] > 0 and llopsd["rollout_length"] > 0
    assert all(llopsd[f"time_{phase}_s"] > 0 for phase in ("generate", "teacher", "student"))
