"""A study's pre-registration (copied verbatim, never changed after the start), the
pretraining gate's seed replacement, and a tuning study's choice — from hand-made unit records
and a fake unit command, without training anything."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MINIATURE = ROOT / "conf" / "studies" / "miniature.yaml"
PREREGISTRATION = """\
preregistration:
  written: "2026-12-07"
  question: Does LLOPSD beat terminal-only?   # as asked
  hypotheses:
    H1: LLOPSD's 2-loop accuracy exceeds terminal-only's.
  primary:
    description: accuracy at R̃ on the test split, paired Δ vs terminal-only, 95% t-interval
  secondary: [accuracy at every loop budget]
  seeds: [1, 2]
  gate: {min_accuracy: 0.8, spare_seeds: [3, 4]}
  falsified_if: the interval of Δ lies below 0
"""


def _write(tmp_path: Path, body: str = PREREGISTRATION, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"base: {MINIATURE}\noutput_dir: {tmp_path / 'out'}\n{body}")
    return path


def _load(path: Path, *overrides):
    from nemo_loop.experiments.study import load_study

    return load_study(path, list(overrides))


def test_a_preregistration_is_copied_verbatim_and_cannot_change(tmp_path):
    from nemo_loop.experiments import study_report
    from nemo_loop.experiments.study import Study, StudyError

    study = _load(_write(tmp_path))
    assert study.preregistration_text == PREREGISTRATION.rstrip()
    study.claim_directory("the command")
    report = study_report.markdown(Study.load(study.root), study_report.summarize(
        study, study_report.collect(study)), None)
    assert "```yaml\n" + PREREGISTRATION.rstrip() + "\n```" in report

    changed = PREREGISTRATION.replace("min_accuracy: 0.8", "min_accuracy: 0.5")
    with pytest.raises(StudyError, match=r"pre-registered field changed: "
                                         r"preregistration\.gate\.min_accuracy: 0\.8 → 0\.5"):
        _load(_write(tmp_path, changed, "edited.yaml")).claim_directory()
    # a comment-only edit is not a change of what was registered
    _load(_write(tmp_path, PREREGISTRATION.replace("# as asked", ""), "same.yaml")
          ).claim_directory()
    # the same study without a pre-registration is another study, too
    with pytest.raises(StudyError, match="preregistration removed"):
        _load(_write(tmp_path, "", "none.yaml")).claim_directory()


@pytest.mark.parametrize("body, overrides, message", [
    (PREREGISTRATION, ["preregistration.gate.min_accuracy=0.1"], "cannot be overridden"),
    (PREREGISTRATION, ["seeds=[1,2,5]"], r"differ from the pre-registered seeds \[1, 2\]"),
    (PREREGISTRATION.replace("  falsified_if: the interval of Δ lies below 0\n", ""), [],
     "incomplete: falsified_if"),
    (PREREGISTRATION.replace('  written: "2026-12-07"\n', ""), [], "no 'written' date"),
    (PREREGISTRATION.replace("spare_seeds: [3, 4]", "spare_seeds: [2, 3]"), [],
     "not among the seeds"),
    (PREREGISTRATION, ["selection_split=null"], "set selection_split: validation"),
    (PREREGISTRATION.replace("  secondary:", "  primary_extra: 1\n  secondary:"), [],
     "primary_extra"),
])
def test_bad_preregistrations_are_refused_at_load_time(tmp_path, body, overrides, message):
    with pytest.raises(ValueError, match=message):
        _load(_write(tmp_path, body), *overrides)


def _shared_record(study, seed: int, validation_at_4: float) -> None:
    from nemo_loop.experiments.study import Unit
    from nemo_loop.experiments.study_units import DONE, describe, write_unit

    gate = study.config.preregistration.gate.outcome(
        {str(r): validation_at_4 for r in range(1, 5)}, 4)
    unit = Unit("shared", seed, "")
    write_unit(study.root, unit.name, {**describe(study, unit), "state": DONE, "gate": gate})


def test_the_gate_replaces_a_seed_by_the_next_spare(tmp_path):
    study = _load(_write(tmp_path))
    assert study.seeds_in_effect() == ([1, 2], {})
    _shared_record(study, 1, 0.95)
    _shared_record(study, 2, 0.40)
    seeds, verdicts = study.seeds_in_effect()
    assert seeds == [1, 3] and not verdicts[2]["passed"] and verdicts[1]["passed"]
    assert [u.name for u in study.units()][:4] == ["shared-seed1", "terminal_only-seed1",
                                                   "llopsd-seed1", "shared-seed3"]
    _shared_record(study, 3, 0.10)
    assert study.seeds_in_effect()[0] == [1, 4]
    _shared_record(study, 4, 0.10)
    assert study.seeds_in_effect()[0] == [1]  # out of spares: the report shows one seed


def test_the_local_executor_follows_the_gate(tmp_path, monkeypatch):
    """Seed 2's pretraining fails the gate: its cells never start, spare seed 3 runs in its
    place, and the report lists the replacement."""
    from nemo_loop.experiments import study_executors, study_report

    study = _load(_write(tmp_path))
    study.claim_directory()
    script = textwrap.dedent("""\
        import json, sys; from pathlib import Path
        root, name = Path(sys.argv[1]), sys.argv[2]
        record = {"state": "done", "unit": name}
        if name.startswith("shared"):
            score = 0.3 if name.endswith("seed2") else 0.9
            record["gate"] = {"loops": 4, "accuracy": score, "min_accuracy": 0.8,
                              "passed": score >= 0.8}
        (root / "units" / f"{name}.json").write_text(json.dumps(record))
        """)
    monkeypatch.setattr(study_executors, "unit_command", lambda study, unit, log: [
        sys.executable, "-c", script, str(study.root), unit.name])
    (study.root / "units").mkdir(parents=True)
    states = study_executors.run_local(study)
    assert sorted(states) == sorted(["shared-seed1", "terminal_only-seed1", "llopsd-seed1",
                                     "shared-seed2", "shared-seed3", "terminal_only-seed3",
                                     "llopsd-seed3"])
    assert not (study.root / "units" / "llopsd-seed2.json").exists()
    gate = study_report.gate_summary(study)
    assert gate["replaced"] == [2] and gate["seeds_in_effect"] == [1, 3]
    lines = study_report.gate_markdown(gate)
    assert "| 2 | 0.300 at 4 loops | replaced |" in lines
    assert "Seeds in effect: [1, 3]; replaced: [2]." in lines


def test_a_cell_of_a_gated_seed_is_excluded_not_run(tmp_path, monkeypatch,
                                                    megatron_single_process):
    """The Slurm path: a cell task of a seed the gate turned down records itself as excluded."""
    from nemo_loop.experiments import study_units
    from nemo_loop.experiments.study import Unit

    study = _load(_write(tmp_path))
    study.claim_directory()
    _shared_record(study, 2, 0.1)
    monkeypatch.setattr(study_units, "_cell", lambda *args: pytest.fail("a gated cell ran"))
    record = study_units.run_unit(study, Unit("cell", 2, "", "llopsd"))
    assert record["state"] == study_units.EXCLUDED
    assert study_units.read_unit(study.root, "llopsd-seed2")["gate"]["accuracy"] == 0.1


def _cell_record(study, cell: str, seed: int, accuracy_at_2: float) -> None:
    from nemo_loop.experiments.study_units import DONE, describe, write_unit

    unit = study.cell_unit(cell, seed)
    accuracy = {str(r): accuracy_at_2 if r == 2 else 0.5 for r in range(1, 5)}
    write_unit(study.root, unit.name, {
        **describe(study, unit), "state": DONE, "seconds": 1.0, "train_flops": 1.0,
        "student_loops": 2, "num_loops": 4, "problem_ids": ["0"],
        "correct": {r: [a] for r, a in accuracy.items()}, "accuracy": accuracy,
        "inference_flops_per_problem": {r: 1.0 for r in accuracy}})


def test_a_tuning_study_chooses_per_method_on_validation(tmp_path):
    from nemo_loop.experiments import study_report
    from nemo_loop.experiments.study import load_study

    overrides = [f"output_dir={tmp_path}", "settings.evaluation_split=validation",
                 "grid.student.optim.lr=[1e-4,3e-4]", "tuning.axes=[student.optim.lr]"]
    study = load_study(MINIATURE, overrides)
    study.claim_directory()
    scores = {("terminal_only", 1e-4): (0.5, 0.6), ("terminal_only", 3e-4): (0.7, 0.7),
              ("llopsd", 1e-4): (0.8, 0.6), ("llopsd", 3e-4): (0.6, 0.6)}
    for (method, lr), per_seed in scores.items():
        for seed, score in zip((1, 2), per_seed):
            _cell_record(study, f"{method}+lr={lr}", seed, score)
    summary = study_report.write(study)
    assert summary["tuning"]["terminal_only"]["chosen"] == {"student.optim.lr": 3e-4}
    assert summary["tuning"]["llopsd"]["chosen"] == {"student.optim.lr": 1e-4}
    assert summary["tuning"]["llopsd"]["score"] == pytest.approx(0.7)
    tuned = (tmp_path / "tuned.yaml").read_text()
    assert "llopsd:\n    optim:\n      lr: 0.0001" in tuned
    report = (tmp_path / "report.md").read_text()
    assert "methods.terminal_only.optim.lr=0.0003" in report
    assert "methods.llopsd.optim.lr=0.0001" in report
    with pytest.raises(ValueError, match="must score the validation split"):
        load_study(MINIATURE, overrides[:1] + overrides[2:])
    with pytest.raises(ValueError, match="not a grid axis"):
        load_study(MINIATURE, [*overrides, "tuning.axes=[student.optim.min_lr]"])
    assert json.loads((tmp_path / "summary.json").read_text())["tuning"]["llopsd"]["scores"]
