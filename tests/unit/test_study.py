"""Studies without training: statistics against hand computations, the plan (cells, units,
seeds, shared pretraining), bad input refused before anything runs, the report from hand-made
unit records (missing seeds are named, not averaged over), and failure recording."""

import json
import math
import os
import sys

import pytest

from nemo_loop.config import CONF_DIR
from nemo_loop.experiments.statistics import (
    mean_interval,
    paired_interval,
    t_quantile_975,
    verdict,
)

MINIATURE = CONF_DIR / "studies" / "miniature.yaml"


# ----- statistics -----

def test_t_quantiles_match_tables():
    # Tables of the two-sided 95% t quantile (e.g. NIST/SEMATECH 1.3.6.7.2).
    for df, value in [(1, 12.706), (2, 4.303), (9, 2.262), (30, 2.042), (40, 2.021),
                      (60, 2.000), (100, 1.984), (1000, 1.962)]:
        assert t_quantile_975(df) == pytest.approx(value, abs=1.5e-3), df
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_mean_interval_and_paired_differences_by_hand():
    interval = mean_interval([0.5, 0.6, 0.7])  # sd 0.1, n 3: 4.303 · 0.1 / √3
    assert interval.mean == pytest.approx(0.6)
    assert interval.half_width == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert str(interval) == "0.600 ± 0.248" and interval.count == 3
    single = mean_interval([0.4])
    assert math.isnan(single.half_width) and str(single) == "0.400"
    # A shared seed effect cancels in the paired differences: 0.1 every seed → no spread.
    paired = paired_interval([0.5, 0.8, 0.6], [0.4, 0.7, 0.5])
    assert paired.mean == pytest.approx(0.1) and paired.half_width == pytest.approx(0, abs=1e-12)
    assert verdict(paired) == "wins"
    assert verdict(paired_interval([0.4, 0.7, 0.5], [0.5, 0.8, 0.6])) == "loses"
    # differences of +0.1, −0.1, +0.05: the interval holds 0
    assert verdict(paired_interval([0.5, 0.6, 0.55], [0.4, 0.7, 0.5])) == "ties"
    assert verdict(paired_interval([0.5], [0.4])) == "ties"  # one seed: no interval
    with pytest.raises(ValueError, match="one baseline value each"):
        paired_interval([0.1, 0.2], [0.1])


# ----- the plan -----

def _study(tmp_path, *overrides):
    from nemo_loop.experiments.study import load_study

    return load_study(MINIATURE, [f"output_dir={tmp_path}", *overrides])


def test_cells_units_and_each_phases_seed(tmp_path):
    study = _study(tmp_path, "grid.student_loops=[2,3]", "seeds=[5,6]")
    names = [cell.name for cell in study.cells]
    assert names == ["terminal_only+student_loops=2", "terminal_only+student_loops=3",
                     "llopsd+student_loops=2", "llopsd+student_loops=3"]
    assert study.baselines["llopsd+student_loops=3"] == "terminal_only+student_loops=3"
    units = [unit.name for unit in study.units()]
    assert units[0] == "shared-seed5" and units[5] == "shared-seed6" and len(units) == 10
    cell = study.cell("llopsd+student_loops=3")
    config = study.experiment_config(cell, 6)
    # one pretraining per seed feeds every cell of that seed
    assert config.root == tmp_path / "seeds" / "6"
    assert config.pretrain_config().output_dir == str(tmp_path / "seeds" / "6" / "pretrain")
    assert config.pretrain_config().trainer.seed == 6
    assert config.pretrain_config().trainer.data_seed == 6
    student = config.student_config(cell.name)
    assert student.trainer.seed == 6 and student.rollout.student_loops == 3
    assert student.loss.mapping == "shift" and student.trainer.resume and student.trainer.overwrite
    assert student.output_dir == str(tmp_path / "seeds" / "6" / "students" / cell.name)
    assert student.trainer.init_from == str((tmp_path / "seeds" / "6" / "pretrain" / "model")
                                            .resolve())


def test_an_axis_on_pretraining_gives_each_value_its_own_pretraining(tmp_path):
    study = _study(tmp_path, "grid.pretrain.trainer.max_steps=[4,6]")
    roots = {cell.name: study.experiment_config(cell, 1).root for cell in study.cells}
    assert len(set(roots.values())) == 2
    assert [u.name for u in study.units()].count("shared-" + study.pretraining_of(
        study.cells[0].name) + "-seed1") == 1
    assert sum(unit.kind == "shared" for unit in study.units()) == 4  # 2 pretrainings × 2 seeds


def test_student_axes_reach_the_cells_method(tmp_path):
    study = _study(tmp_path, "grid.student.loss.divergence=[forward_kl,jsd]")
    cell = study.cell("llopsd+divergence=jsd")
    assert study.experiment_config(cell, 1).student_config(cell.name).loss.divergence == "jsd"


@pytest.mark.parametrize("overrides, message", [
    (["seeds=[]"], "seeds is empty"),
    (["grid.compression.llopsd.optim.lrr=[1e-3]"], r"cell .*optim\.lrr"),
    (["grid.nonsense=[1]"], "grid axis 'nonsense': unknown experiment key"),
    (["grid.student.loss.divergencee=[jsd]"], "divergencee"),
    (["grid.student.loss.divergence=[zigzag]"], "zigzag"),
    (["grid.test_problems=[8,16]"], "changes the held-out problems"),
    (["grid.task.shell_game.num_swaps=[4]"], "changes the held-out problems"),
    (["baseline.method=sft"], r"baseline cell .* is not in the grid: method='sft' is not among"),
    (["baseline.student_loops=2"], r"is not in the grid: 'student_loops' is not a grid axis"),
    (["grid.method=[llopsd,grpo]"], r"grid.method names \['grpo'\]"),
    (["grid.student_loops=[]"], "grid axis 'student_loops' has no values"),
    (["methods.llopsd.rollout.student_loops=3"], "which the experiment decides"),
    (["executor.kind=cloud"], "executor.kind"),
])
def test_bad_studies_are_named_errors_before_anything_runs(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _study(tmp_path, *overrides)
    assert not tmp_path.joinpath("study.json").exists()


def test_a_directory_holds_one_study_and_seeds_may_grow(tmp_path):
    from nemo_loop.experiments.study import Study, StudyError

    _study(tmp_path).claim_directory("the command")
    _study(tmp_path, "seeds=[1,2,3]").claim_directory()  # more seeds: the same study
    stored = json.loads((tmp_path / "study.json").read_text())
    assert stored["study"]["seeds"] == [1, 2, 3] and stored["command"] == "the command"
    assert Study.load(tmp_path).fingerprint() == stored["fingerprint"]
    with pytest.raises(StudyError, match=r"holds a different study.*optim.*lr"):
        _study(tmp_path, "settings.compression.llopsd.optim.lr=0.1").claim_directory()


# ----- the report, from hand-made unit records -----

def _record(study, unit, accuracies, ids=("0", "1")):
    from nemo_loop.experiments.study_units import DONE, describe, write_unit

    correct = {str(r): [a] * len(ids) for r, a in enumerate(accuracies, start=1)}
    write_unit(study.root, unit.name, {
        **describe(study, unit), "state": DONE, "log": f"logs/{unit.name}.log", "seconds": 10.0,
        "train_flops": 1e9, "student_loops": 2 if unit.kind == "cell" else None,
        "num_loops": 4, "problem_ids": list(ids), "correct": correct,
        "accuracy": {r: values[0] for r, values in correct.items()},
        "inference_flops_per_problem": {str(r): 1e6 * r for r in range(1, 5)}})


def test_cells_with_the_same_resolved_objective_run_once(tmp_path):
    """At R̃ = 3 of R = 4, linear and shift are both φ = [2, 3, 4]; at R̃ = 2 they differ. R̃
    does not reach LoopRPT. Each such run is trained once and reported under both cells, each
    paired with its own baseline."""
    from nemo_loop.experiments import study_report
    from nemo_loop.experiments.study import Study

    study = _study(tmp_path, "seeds=[1,2]", "grid.student_loops=[2,3]",
                   "methods.linear={algorithm: llopsd, loss: {mapping: linear, weighting: "
                   "uniform}}", "methods.rpt={algorithm: looprpt}",
                   "grid.method=[terminal_only,llopsd,linear,rpt]")
    assert study.same_run == {"linear+student_loops=3": "llopsd+student_loops=3",
                              "rpt+student_loops=3": "rpt+student_loops=2"}
    names = [unit.name for unit in study.units()]
    assert "linear+student_loops=2-seed1" in names
    assert "linear+student_loops=3-seed1" not in names and "rpt+student_loops=3-seed2" not in names
    # a different divergence is a different run even with the same φ and α
    assert _study(tmp_path / "other", "grid.student_loops=[3]",
                  "methods.linear={algorithm: llopsd, loss: {mapping: linear, divergence: jsd}}",
                  "grid.method=[terminal_only,llopsd,linear]").same_run == {}

    study.claim_directory()
    assert Study.load(tmp_path).same_run == study.same_run
    units = {unit.name: unit for unit in study.units()}
    for seed, base in ((1, 0.4), (2, 0.5)):
        _record(study, units[f"shared-seed{seed}"], [0.3, 0.35, 0.8, 0.99])
        for loops in (2, 3):
            _record(study, units[f"terminal_only+student_loops={loops}-seed{seed}"],
                    [0.3, base, base + 0.1 * (loops - 2), 0.9])
            _record(study, units[f"llopsd+student_loops={loops}-seed{seed}"],
                    [0.3, base + 0.05, base + 0.2, 0.9])
        _record(study, units[f"linear+student_loops=2-seed{seed}"], [0.3, base, 0.8, 0.9])
        _record(study, units[f"rpt+student_loops=2-seed{seed}"], [0.3, base, 0.6, 0.9])
    summary = study_report.write(study)
    same = summary["cells"]["linear+student_loops=3"]
    assert same["complete"] and same["same_run_as"] == "llopsd+student_loops=3"
    assert same["accuracy"] == summary["cells"]["llopsd+student_loops=3"]["accuracy"]
    rpt = summary["cells"]["rpt+student_loops=3"]["versus"]
    assert rpt["baseline"] == "terminal_only+student_loops=3"
    assert rpt["difference"]["3"]["mean"] == pytest.approx(0.6 - (0.45 + 0.1))
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    repeated = [row for row in rows if row["cell"] == "linear+student_loops=3"]
    assert len(repeated) == 2 * 4 and {row["same_run_as"] for row in repeated} == {
        "llopsd+student_loops=3"}
    assert "`linear+student_loops=3` = `llopsd+student_loops=3`" in (
        tmp_path / "report.md").read_text()


def test_report_means_paired_differences_and_missing_seeds(tmp_path):
    from nemo_loop.experiments import study_report

    study = _study(tmp_path, "seeds=[1,2,3]", "grid.student_loops=[2,3]")
    study.claim_directory()
    units = {unit.name: unit for unit in study.units()}
    baseline = {1: 0.40, 2: 0.50, 3: 0.45}
    for seed in (1, 2, 3):
        _record(study, units[f"shared-seed{seed}"], [0.3, 0.35, 0.8, 0.99])
        for loops in (2, 3):
            _record(study, units[f"terminal_only+student_loops={loops}-seed{seed}"],
                    [0.3, baseline[seed], 0.8, 0.9])
        _record(study, units[f"llopsd+student_loops=2-seed{seed}"],
                [0.3, baseline[seed] + 0.05, 0.8, 0.9])
    # llopsd at R̃ = 3 lacks seed 3: seed 1 done, seed 2 failed
    _record(study, units["llopsd+student_loops=3-seed1"], [0.3, 0.6, 0.8, 0.9])
    from nemo_loop.experiments.study_units import record_failure
    record_failure(study, units["llopsd+student_loops=3-seed2"], "logs/x.log", "boom")

    summary = study_report.write(study)
    cell = summary["cells"]["llopsd+student_loops=2"]
    assert cell["complete"] and cell["accuracy"]["2"]["mean"] == pytest.approx(0.5)
    expected = mean_interval([0.40, 0.50, 0.45])
    assert summary["cells"]["terminal_only+student_loops=2"]["accuracy"]["2"]["half_width"] \
        == pytest.approx(expected.half_width)
    versus = cell["versus"]
    assert versus["baseline"] == "terminal_only+student_loops=2"
    assert versus["difference"]["2"]["mean"] == pytest.approx(0.05)
    assert versus["difference"]["2"]["half_width"] == pytest.approx(0, abs=1e-9)
    assert versus["difference"]["2"]["seeds"] == 3 and versus["verdict"]["2"] == "wins"
    assert versus["verdict"]["1"] == "ties"
    incomplete = summary["cells"]["llopsd+student_loops=3"]
    assert not incomplete["complete"] and "accuracy" not in incomplete
    missing = {m["unit"]: m for m in summary["missing"]}
    assert missing["llopsd+student_loops=3-seed2"]["state"] == "failed"
    assert missing["llopsd+student_loops=3-seed2"]["log"] == "logs/x.log"
    assert missing["llopsd+student_loops=3-seed3"]["state"] == "missing"

    report = (tmp_path / "report.md").read_text()
    assert "| llopsd+student_loops=3 | llopsd | incomplete |" in report
    assert "`llopsd+student_loops=3-seed2`: failed, log `logs/x.log` — boom" in report
    row = next(line for line in report.splitlines()
               if line.startswith("| llopsd+student_loops=2 | terminal_only"))
    assert "0.050 ± 0.000" in row and row.endswith("| wins |")
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 4 + 3 * 3 * 4 + 4 + 1 + 1  # pretrained, full cells, seed 1, 2 gaps
    assert {row["state"] for row in rows if row["accuracy"] is None} == {"failed", "missing"}
    assert (tmp_path / "results.csv").read_text().startswith("study,cell,method")
    for plot in study_report.PLOTS.values():
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"


def test_pareto_front():
    from nemo_loop.experiments.study_report import pareto_front

    points = [(1, 0.3), (2, 0.5), (2, 0.4), (3, 0.45), (4, 0.9), (5, 0.9)]
    assert pareto_front(points) == [(1, 0.3), (2, 0.5), (4, 0.9)]


def test_local_executor_records_a_crashed_unit_and_skips_its_seeds_cells(tmp_path,
                                                                         monkeypatch):
    from nemo_loop.experiments import study_executors
    from nemo_loop.experiments.study_units import read_unit

    study = _study(tmp_path, "seeds=[1]")
    study.claim_directory()
    monkeypatch.setattr(study_executors, "unit_command",
                        lambda study, unit, log: [sys.executable, "-c",
                                                  "print('dying'); raise SystemExit(3)"])
    states = study_executors.run_local(study)
    assert states == {"shared-seed1": "failed", "terminal_only-seed1": "failed",
                      "llopsd-seed1": "failed"}
    shared = read_unit(tmp_path, "shared-seed1")
    assert shared["error"] == "exit code 3" and shared["log"].endswith("logs/shared-seed1.log")
    assert "dying" in (tmp_path / "logs" / "shared-seed1.log").read_text()
    cell = read_unit(tmp_path, "llopsd-seed1")
    assert "shared unit shared-seed1 did not finish" in cell["error"]


def test_local_executor_runs_units_side_by_side_after_their_shared_unit(tmp_path, monkeypatch):
    """parallel_units=2: both seeds' pretrainings at once, never more than two units, every
    cell only after its seed's shared unit finished, and the cores split between the units."""
    from nemo_loop.experiments import study_executors

    study = _study(tmp_path, "seeds=[1,2]", "executor.parallel_units=2")
    study.claim_directory()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(study_executors.os, "cpu_count", lambda: 4)
    script = ("import json, os, sys, time; from pathlib import Path\n"
              "root, name = Path(sys.argv[1]), sys.argv[2]; began = time.time()\n"
              "time.sleep(0.6)\n"
              "(root / 'units' / f'{name}.json').write_text(json.dumps({'state': 'done', "
              "'began': began, 'ended': time.time(), "
              "'threads': os.environ['OMP_NUM_THREADS']}))\n")
    monkeypatch.setattr(study_executors, "unit_command", lambda study, unit, log: [
        sys.executable, "-c", script, str(study.root), unit.name])
    (tmp_path / "units").mkdir()
    states = study_executors.run_local(study)
    assert set(states.values()) == {"done"} and len(states) == 6
    records = {path.stem: json.loads(path.read_text())
               for path in (tmp_path / "units").iterdir()}
    assert {record["threads"] for record in records.values()} == {"2"}
    shared = [records[f"shared-seed{seed}"] for seed in (1, 2)]
    assert shared[1]["began"] < shared[0]["ended"]  # the two pretrainings overlapped
    for seed in (1, 2):
        for cell in ("terminal_only", "llopsd"):
            assert records[f"{cell}-seed{seed}"]["began"] >= \
                records[f"shared-seed{seed}"]["ended"]
    moments = sorted([(r["began"], 1) for r in records.values()]
                     + [(r["ended"], -1) for r in records.values()])
    running = [sum(step for _, step in moments[:i + 1]) for i in range(len(moments))]
    assert max(running) == 2


def test_a_cell_without_student_loops_is_judged_at_its_baselines():
    """LoopRPT trains every loop (no R̃): its verdict against terminal-only at R̃ = 2 is read at
    2 loops, not at R = 4."""
    from nemo_loop.experiments.study_report import _judged_at

    summary = {"cells": {"terminal_only": {"student_loops": 2},
                         "looprpt": {"student_loops": None,
                                     "versus": {"baseline": "terminal_only"}},
                         "alone": {"student_loops": None}}}
    assert _judged_at(summary, "terminal_only", 4) == "2"
    assert _judged_at(summary, "looprpt", 4) == "2"
    assert _judged_at(summary, "alone", 4) == "4"


def _committed_tuned_lrs() -> dict:
    """Method → learning rate, as study 2's tuning study chose them (its committed tuned.yaml)."""
    from omegaconf import OmegaConf

    chosen = OmegaConf.load(CONF_DIR.parent / "docs" / "studies" / "adaptive_exit_tuning" /
                            "tuned.yaml").methods
    return {name: method.optim.lr for name, method in chosen.items()}


@pytest.mark.parametrize("name", ["shell_game", "shell_game_looprpt", "adaptive_exit",
                                  "adaptive_exit_tuning", "adaptive_exit_round2"])
def test_the_committed_studies_load(name, tmp_path):
    """The §5.1 study and its LoopRPT companion (docs/studies/shell_game.md) and study 2's two
    rounds with their tuning study (docs/studies/adaptive_exit.md) stay runnable: every cell
    resolves to a valid run, LoopRPT pairs with terminal-only at R̃ = 2, study 2's pre-registered
    exit policy reaches every evaluation, its tuning study scores validation only (every method
    of the second round, no Stage II), and the second round runs LoopRPT once per seed."""
    from nemo_loop.experiments.study import load_study

    study = load_study(CONF_DIR / "studies" / f"{name}.yaml", [f"output_dir={tmp_path}"])
    cells = [cell.name for cell in study.cells]
    if name.startswith("adaptive_exit"):
        settings = study.cell_settings(cells[0])
        assert settings.evaluation.generation.exit.policy == "confidence"
        assert len(settings.evaluation.exit_thresholds) == 20
        if name == "adaptive_exit_tuning":
            assert len(cells) == 21 and settings.evaluation_split == "validation"
            assert settings.student_loops == 3 and not settings.stage2_gate.enabled
            # every method it tuned has its choice in the committed tuned.yaml (which the
            # second round's learning rates are checked against below)
            assert {cell.method for cell in study.cells} == set(_committed_tuned_lrs())
            return
        assert study.selection_split() == "validation" and settings.stage2_gate.enabled
        assert study.config.seeds == [1, 2, 3, 4, 5]
        if name == "adaptive_exit":
            assert len(cells) == 5 and settings.student_loops == 3
        else:
            assert len(cells) == 14 and study.same_run == {
                "looprpt+student_loops=4": "looprpt+student_loops=3"}
            assert study.baselines["shift_uniform+student_loops=4"] == \
                "terminal_only+student_loops=4"
            # the second round runs every tuned method at the learning rate chosen for it
            assert {name: method["optim"]["lr"] for name, method in
                    study.config.methods.items()} == _committed_tuned_lrs()
        return
    assert study.config.seeds == [1, 2, 3, 4, 5]
    if name == "shell_game":
        assert len(cells) == 26 and study.selection_split() == "validation"
        assert study.config.executor.parallel_units == 2
    else:
        assert study.baselines["looprpt+student_loops=2"] == "terminal_only+student_loops=2"
        assert study.algorithm_of("looprpt+student_loops=2") == "looprpt"


def test_the_runner_forwards_sigterm_to_its_units_and_stops(tmp_path, monkeypatch):
    """SIGTERM to the runner reaches the running unit's process group (the unit runs in a
    session of its own, out of reach of a signal to the runner's group); no other unit
    starts, and the runner exits with 128 + SIGTERM once the unit has."""
    import signal
    import threading

    from nemo_loop.experiments import study_executors

    study = _study(tmp_path, "seeds=[1]")
    study.claim_directory()
    script = ("import os, signal, sys, time; from pathlib import Path\n"
              "out = Path(sys.argv[1]) / (sys.argv[2] + '.got')\n"
              "def stop(signum, frame):\n"
              "    name = signal.Signals(signum).name\n"
              "    out.write_text(f'{name} {os.getpgid(0)} {os.getsid(0)}')\n"
              "    sys.exit(85)\n"
              "signal.signal(signal.SIGTERM, stop)\n"
              "(Path(sys.argv[1]) / (sys.argv[2] + '.started')).write_text(str(os.getpid()))\n"
              "time.sleep(60)\n")
    monkeypatch.setattr(study_executors, "unit_command", lambda study, unit, log: [
        sys.executable, "-c", script, str(tmp_path), unit.name])
    got_here = []
    previous = signal.signal(signal.SIGTERM, lambda *args: got_here.append(args))

    def terminate_once_started():
        started = tmp_path / "shared-seed1.started"
        for _ in range(300):
            if started.exists():
                break
            threading.Event().wait(0.1)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_once_started)
    killer.start()
    try:
        with pytest.raises(SystemExit) as raised:
            study_executors.run_local(study)
    finally:
        killer.join()
        restored = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, previous)
    assert raised.value.code == 128 + signal.SIGTERM and got_here == []
    unit_pid = int((tmp_path / "shared-seed1.started").read_text())
    name, group, session = (tmp_path / "shared-seed1.got").read_text().split()
    assert name == "SIGTERM" and int(group) == int(session) == unit_pid  # its own session
    assert not list(tmp_path.glob("*-seed1.started"))[1:]  # no cell started
    assert restored is not None and restored != signal.SIG_DFL


def test_a_second_copy_of_a_running_unit_refuses_and_records_nothing(
        megatron_single_process, tmp_path):
    from nemo_loop.experiments.study import StudyError
    from nemo_loop.experiments.study_units import run_unit, unit_lock_path, unit_path
    from nemo_loop.utils.run_lock import hold_lock

    study = _study(tmp_path, "seeds=[1]")
    study.claim_directory()
    lock = unit_lock_path(tmp_path, "shared-seed1")
    lock.parent.mkdir(parents=True)
    holder = _process_holding(lock)
    try:
        with pytest.raises(StudyError, match=rf"unit shared-seed1 of study {tmp_path} is in use "
                                             rf"by another run: PID {holder.pid}"):
            run_unit(study, study.unit("shared-seed1"))
    finally:
        holder.kill()
        holder.wait()
    assert not unit_path(tmp_path, "shared-seed1").exists()
    hold_lock(lock, "unit")  # released by the kernel when its holder died


def _process_holding(lock):
    """A process that holds ``lock`` (nemo_loop.utils.run_lock) until it is killed."""
    import subprocess
    import time

    from nemo_loop.utils.run_lock import holder_pid

    process = subprocess.Popen([sys.executable, "-c",
                                "import sys, time; from nemo_loop.utils.run_lock import "
                                "hold_lock; hold_lock(sys.argv[1], 'x'); time.sleep(120)",
                                str(lock)])
    for _ in range(200):
        if holder_pid(lock) == process.pid:
            return process
        time.sleep(0.05)
    process.kill()
    raise AssertionError("the lock holder did not start")
