import pytest

from nemo_loop.experiments import report


def _summary(llopsd_at_2: float, terminal_at_2: float, count: int = 512) -> dict:
    return {
        "accuracy_per_loop": {"pretrained": [0.3, 0.4, 0.8, 1.0],
                              "llopsd": [0.3, llopsd_at_2, 0.8, 0.9],
                              "terminal_only": [0.3, terminal_at_2, 0.8, 0.9]},
        "student_loops": 2, "num_loops": 4, "test_problems": count,
        "phase_seconds": {"pretrain": 100.0, "total": 120.0},
    }


@pytest.mark.parametrize("llopsd_at_2, terminal_at_2, outcome", [
    (0.70, 0.50, "LLOPSD beat terminal-only"),
    (0.50, 0.70, "LLOPSD did worse than terminal-only"),
    (0.52, 0.50, "LLOPSD did not clearly beat (within noise of) terminal-only"),
])
def test_verdict_compares_at_the_student_loop_count(llopsd_at_2, terminal_at_2, outcome):
    text = report.verdict(_summary(llopsd_at_2, terminal_at_2))
    assert outcome in text
    assert "pretrained model scores 0.400" in text and "it scores 1.000" in text
    closed = round(100 * (llopsd_at_2 - 0.4) / 0.6)
    assert f"llopsd: {llopsd_at_2:.3f} at R̃ = 2, {closed}% of the gap" in text


def test_accuracy_table_has_one_row_per_model_with_standard_errors():
    table = report.accuracy_table(_summary(0.6, 0.5, count=100))
    lines = table.splitlines()
    assert lines[0] == "| model | 1 loop | 2 loops | 3 loops | 4 loops |"
    assert lines[3] == ("| llopsd | 0.300 ± 0.046 | 0.600 ± 0.049 | 0.800 ± 0.040 | "
                        "0.900 ± 0.030 |")
    assert len(lines) == 5


def test_rerun_clears_only_the_experiments_own_outputs(tmp_path, megatron_single_process):
    from nemo_loop.experiments.compression import clear_previous_outputs

    for name in ("pretrain", "students", "eval"):
        (tmp_path / name / "nested").mkdir(parents=True)
    (tmp_path / "report.md").write_text("stale")
    (tmp_path / "notes.txt").write_text("the user's")
    clear_previous_outputs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
