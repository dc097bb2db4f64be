"""The study runner end to end on its CI miniature (conf/studies/miniature.yaml: 2 cells × 2
seeds, a few steps each): one pretraining per seed, FLOPs logged, the report's paired
difference equal to one computed from the evaluation's own samples, a rerun that skips what is
done, and a different study refused in the same directory."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
CELLS = ["terminal_only", "llopsd"]


def _study(*arguments, timeout=1500):
    return subprocess.run([sys.executable, "recipes/study.py", "--config",
                           "conf/studies/miniature.yaml", *arguments], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _accuracy(samples: Path, loops: int) -> float:
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    chosen = [row["correct"] for row in rows if row["num_loops"] == loops]
    return sum(chosen) / len(chosen)


@pytest.fixture(scope="module")
def miniature(tmp_path_factory) -> Path:
    """The miniature study, run once for the tests of this module that read it."""
    root = tmp_path_factory.mktemp("miniature")
    run = _study(f"output_dir={root}")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return root


@pytest.mark.slow
def test_miniature_study_runs_resumes_and_refuses_another_study(miniature):
    tmp_path = miniature
    units = {path.stem: json.loads(path.read_text()) for path in (tmp_path / "units").iterdir()}
    assert sorted(units) == sorted(f"{name}-seed{seed}" for seed in (1, 2)
                                   for name in ["shared", *CELLS])
    assert all(record["state"] == "done" for record in units.values())

    for seed in (1, 2):
        root = tmp_path / "seeds" / str(seed)
        for cell in CELLS:  # both cells of a seed start from that seed's one pretraining
            config = OmegaConf.load(root / "students" / cell / "config.yaml")
            assert config.trainer.init_from == str((root / "pretrain" / "model").resolve())
            assert config.trainer.seed == seed and config.rollout.student_loops == 2
            steps = [json.loads(line) for line in
                     (root / "students" / cell / "metrics.jsonl").read_text().splitlines()]
            assert all(s["flops"] > 0 and s["achieved_flops_per_s_per_device"] > 0
                       for s in steps)
    # the seed changes the pretraining (init and data order)
    first_losses = [json.loads((tmp_path / "seeds" / str(seed) / "pretrain" / "metrics.jsonl")
                               .read_text().splitlines()[0])["loss"] for seed in (1, 2)]
    assert first_losses[0] != first_losses[1]

    summary = json.loads((tmp_path / "summary.json").read_text())
    versus = summary["cells"]["llopsd"]["versus"]
    assert versus["baseline"] == "terminal_only" and summary["missing"] == []
    # Δ at 2 loops from the harness's own per-sample verdicts, seed by seed
    differences = [
        _accuracy(tmp_path / "seeds" / str(seed) / "eval" / "llopsd" / "samples.jsonl", 2)
        - _accuracy(tmp_path / "seeds" / str(seed) / "eval" / "terminal_only" / "samples.jsonl",
                    2) for seed in (1, 2)]
    assert versus["difference"]["2"]["mean"] == pytest.approx(sum(differences) / 2)
    assert versus["difference"]["2"]["seeds"] == 2
    # Every model is also scored on the validation split (settings are chosen on it): other
    # games than the test split's, and its paired difference from its own samples.
    for seed in (1, 2):
        data = tmp_path / "seeds" / str(seed) / "data"
        games = {split: {json.loads(line)["problem"] for line in
                         (data / f"{split}.jsonl").read_text().splitlines()}
                 for split in ("validation", "test")}
        assert len(games["validation"]) == 24 and not games["validation"] & games["test"]
        assert units[f"llopsd-seed{seed}"]["selection"]["split"] == "validation"
    validation = [
        _accuracy(tmp_path / "seeds" / str(seed) / "eval-validation" / "llopsd" / "samples.jsonl",
                  2)
        - _accuracy(tmp_path / "seeds" / str(seed) / "eval-validation" / "terminal_only"
                    / "samples.jsonl", 2) for seed in (1, 2)]
    selection = summary["cells"]["llopsd"]["selection"]
    assert selection["difference"]["2"]["mean"] == pytest.approx(sum(validation) / 2)
    assert "## The validation split" in (tmp_path / "report.md").read_text()
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert all(row["selection_split"] == "validation" for row in rows)
    assert len(rows) == (2 + 4) * 4  # (pretrained + cells) × seeds, × 4 loop budgets
    report = (tmp_path / "report.md").read_text()
    assert "| llopsd | terminal_only |" in report and "## Missing" not in report
    for plot in ("accuracy_vs_loops.png", "accuracy_vs_train_flops.png", "pareto.png",
                 "paired_differences.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"

    # A killed study continues: only the unit without a record runs again.
    (tmp_path / "units" / "llopsd-seed2.json").unlink()
    rerun = _study(f"output_dir={tmp_path}")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert rerun.stdout.count("done earlier, skipped") == 5
    assert "llopsd-seed2: running" in rerun.stdout
    resumed = json.loads((tmp_path / "summary.json").read_text())["cells"]["llopsd"]
    # resumed from its final checkpoint: the same numbers
    assert (resumed["accuracy"], resumed["versus"]) == (summary["cells"]["llopsd"]["accuracy"],
                                                       versus)

    refused = _study(f"output_dir={tmp_path}", "settings.compression.llopsd.optim.lr=0.1")
    assert refused.returncode != 0 and "holds a different study" in refused.stderr
    assert "optim.lr" in refused.stderr


@pytest.mark.slow
def test_a_study_starts_from_an_earlier_studys_pretraining(miniature, tmp_path):
    """pretrained_from: seed 1, which the earlier study pretrained with the same settings, is
    copied (the same weights, no step trained again, the same pretrained accuracy); other
    pretraining settings are refused."""
    later = tmp_path / "later"
    run = _study(f"output_dir={later}", f"pretrained_from={miniature}", "seeds=[1]",
                 "grid.method=[terminal_only]")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    shared = json.loads((later / "units" / "shared-seed1.json").read_text())
    earlier = json.loads((miniature / "units" / "shared-seed1.json").read_text())
    assert shared["pretrained_from"] == str(miniature / "seeds" / "1" / "pretrain")
    copied, original = later / "seeds" / "1" / "pretrain", miniature / "seeds" / "1" / "pretrain"
    assert ((copied / "model" / "__0_0.distcp").read_bytes()
            == (original / "model" / "__0_0.distcp").read_bytes())
    assert (copied / "metrics.jsonl").read_text() == (original / "metrics.jsonl").read_text()
    assert shared["accuracy"] == earlier["accuracy"]
    assert shared["train_flops"] == earlier["train_flops"]
    assert "pretrained_from: copied" in (later / "logs" / "shared-seed1.log").read_text()

    refused = _study(f"output_dir={tmp_path / 'other'}", f"pretrained_from={miniature}",
                     "settings.pretrain.optim.lr=0.5", "--dry-run")
    assert refused.returncode != 0 and "pretrained differently" in refused.stderr
    assert "optim.lr" in refused.stderr


@pytest.mark.slow
def test_units_die_with_a_sigkilled_runner_and_a_second_copy_is_refused(tmp_path):
    """Issue 23: the runner's unit (torchrun and its two workers, the hardest case: torchrun
    puts its workers in sessions of their own) dies with the runner even when the runner is
    SIGKILLed; while it runs, a second copy of the unit refuses naming it."""
    import os
    import signal
    import time

    import psutil

    from nemo_loop.utils.run_lock import holder_pid
    from tests.processes import alive, survivors

    runner = subprocess.Popen(
        [sys.executable, "recipes/study.py", "--config", "conf/studies/miniature.yaml",
         f"output_dir={tmp_path}", "seeds=[1]", "executor.nproc_per_node=2",
         "settings.pretrain.trainer.max_steps=100000",
         "settings.pretrain.trainer.micro_batch_size=16"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "locks" / "shared-seed1.lock"
    descendants: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while holder_pid(lock) is None or not (tmp_path / "seeds" / "1" / "pretrain" /
                                               "metrics.jsonl").is_file():
            assert runner.poll() is None, runner.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the unit did not start training"
            time.sleep(0.5)
        descendants = [p.pid for p in psutil.Process(runner.pid).children(recursive=True)]
        unit = holder_pid(lock)
        assert unit in descendants and len(descendants) >= 3  # torchrun + 2 workers

        second = subprocess.run([sys.executable, "recipes/study.py", "unit", str(tmp_path),
                                 "shared-seed1"], cwd=ROOT, capture_output=True, text=True,
                                timeout=300)
        assert second.returncode != 0
        assert f"unit shared-seed1 of study {tmp_path} is in use by another run: PID {unit}" \
            in second.stderr, second.stderr[-3000:]
        assert not (tmp_path / "units" / "shared-seed1.json").exists()  # recorded nothing

        os.kill(runner.pid, signal.SIGKILL)
        runner.wait()
        remaining = survivors(descendants, grace_s=5.0)
        assert remaining == [], f"units outlived the SIGKILLed runner: {remaining}"
    finally:
        if runner.poll() is None:
            runner.kill()
        for pid in alive(descendants):  # clean up by PID before failing
            psutil.Process(pid).kill()


def _exit_curve(samples: Path) -> dict[float, tuple[float, float]]:
    """threshold → (accuracy, mean exit loop) of the confidence-exit rows of an evaluation."""
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    curve = {}
    for threshold in {row["exit_threshold"] for row in rows
                      if row["exit_policy"] == "confidence"}:
        chosen = [row for row in rows if row["exit_policy"] == "confidence"
                  and row["exit_threshold"] == threshold]
        # one answer token per problem (max_new_tokens 1): its exit loop
        assert all(len(row["exit_loops"]) == 1 for row in chosen)
        curve[threshold] = (sum(row["correct"] for row in chosen) / len(chosen),
                            sum(row["exit_loops"][0] for row in chosen) / len(chosen))
    return curve


@pytest.mark.slow
def test_adaptive_exit_miniature_scores_the_preregistered_primary_metric(tmp_path):
    """Study 2's pipeline (conf/studies/adaptive_exit_miniature.yaml): the matched-budget
    accuracy of the report equals one recomputed from the evaluations' own samples (threshold
    chosen on validation within the budget, test scored there), students train on games
    disjoint from the held-out ones, and Stage II's q_exit curves are scored."""
    result = subprocess.run([sys.executable, "recipes/study.py", "--config",
                             "conf/studies/adaptive_exit_miniature.yaml",
                             f"output_dir={tmp_path}"], cwd=ROOT, capture_output=True,
                            text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    primary = summary["primary"]
    budget = primary["budget_loops"]
    data = tmp_path / "seeds" / "1" / "data"
    held_out = {json.loads(line)["problem"] for split in ("validation", "test")
                for line in (data / f"{split}.jsonl").read_text().splitlines()}
    train = [json.loads(line)["problem"] for line in (data / "train.jsonl").read_text()
             .splitlines()]
    assert train and not held_out & set(train)
    assert {len(problem.split()) - 4 for problem in train} == {4, 5, 6, 7, 8}
    chosen = {}
    for cell in ("terminal_only", "shift_uniform"):
        seed_dir = tmp_path / "seeds" / "1"
        selection = _exit_curve(seed_dir / "eval-validation" / cell / "samples.jsonl")
        evaluation = _exit_curve(seed_dir / "eval" / cell / "samples.jsonl")
        within = [t for t, (_, loops) in selection.items() if loops <= budget]
        assert within, selection
        best = max(within, key=lambda t: (selection[t][0], -selection[t][1]))
        chosen[cell] = evaluation[best][0]
        entry = primary["cells"][cell]
        assert entry["accuracy"]["mean"] == pytest.approx(chosen[cell])
        assert entry["thresholds"] == [best]
        assert set(entry["by_level"]) == {"4", "5", "6", "7", "8"}
        assert "gate" in entry  # q_exit after Stage II, scored
    versus = primary["cells"]["shift_uniform"]["versus"]
    assert versus["baseline"] == "terminal_only"
    assert versus["accuracy"]["difference"]["mean"] == pytest.approx(
        chosen["shift_uniform"] - chosen["terminal_only"])
    assert primary["contrasts"]["terminal_only"]["shift_uniform"]["difference"]["mean"] == \
        pytest.approx(chosen["terminal_only"] - chosen["shift_uniform"])
    report = (tmp_path / "report.md").read_text()
    assert "## Primary analysis: accuracy at a matched budget" in report
    assert (tmp_path / "accuracy_vs_mean_loops.png").exists()
