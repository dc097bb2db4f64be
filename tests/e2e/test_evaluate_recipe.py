"""End-to-end evaluation of a (random) tiny LoopLM on 10 MATH500 problems at two loop budgets,
with the real Ouro tokenizer: every output exists and holds the numbers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"


@pytest.mark.skipif(not (DATA / "math500").is_dir(), reason=f"no benchmark data at {DATA}")
def test_evaluate_recipe_writes_results_table_and_plots(tmp_path):
    run = subprocess.run(
        [sys.executable, "recipes/evaluate.py", "benchmarks=[math500]", "limit=10",
         "n_samples=2", "loop_budgets=[1,2]", "model.num_loops=2", "model.vocab_size=49152",
         "model.max_sequence_length=1024", "sampling.max_new_tokens=8",
         f"data_root={DATA}", f"output_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "RANDOMLY INITIALISED" in run.stderr

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["checkpoint"]["random_init"] is True
    assert results["config"]["n_samples"] == 2
    assert results["stop_token_ids"] == [0, 2]  # <|endoftext|>, <|im_end|>
    math500 = results["benchmarks"]["math500"]
    assert math500["num_problems_loaded"] == 10 and math500["skipped_prompt_too_long"] == []
    assert set(math500["budgets"]) == {"1", "2"}
    for loops, metrics in math500["budgets"].items():
        assert metrics["num_problems"] == 10
        assert set(metrics["pass@k"]) == {"1", "2"}
        assert 0.0 <= metrics["avg@n"] <= 1.0
        assert len(metrics["entropy_per_loop"]) == int(loops)
        assert all(0.0 < h < 11.0 for h in metrics["entropy_per_loop"])  # ≤ ln 49152
        assert metrics["seconds_per_sequence"] > 0 and metrics["tokens_per_s"] > 0
        assert metrics["speedup_reference_loops"] == 2
    assert math500["budgets"]["2"]["speedup"] == 1.0

    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 10 * 2 * 2
    assert all(1 <= s["num_tokens"] <= 8 for s in samples)

    table = (tmp_path / "results.md").read_text()
    avg = math500["budgets"]["1"]["avg@n"]
    assert f"| math500 | 1 | 10 | {avg:.3f} |" in table
    assert "pass@2" in table and "speedup" in table
    for png in ("accuracy_vs_loops.png", "pass_at_k_math500.png", "entropy_per_loop_math500.png"):
        data = (tmp_path / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == [1, 2]
    assert logged[0]["math500/avg@n"] == avg
