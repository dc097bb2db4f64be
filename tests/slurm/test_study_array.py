"""The study runner's Slurm executor on the local 8-node cluster (tests/slurm/cluster.sh): the
CI miniature study (2 cells × 2 seeds) submitted as job arrays — the seeds' shared units, then
one array task per cell, then the report — through slurm/common.sh, on the host
(CONTAINER_IMAGE=none) with the test's interpreter."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
TIMEOUT_S = 1500


def _tasks(env, job_id) -> list[dict]:
    """One dict per job (or array task) of ``job_id``."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True,
                         text=True, check=True).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line]


def _wait_for(env, job_id, study_dir) -> list[dict]:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        tasks = _tasks(env, job_id)
        if tasks and all(task["JobState"] in FINAL_STATES for task in tasks):
            return tasks
        time.sleep(3)
    subprocess.run(["scancel", job_id], env=env)
    logs = "".join(p.read_text()[-2000:] for p in sorted(study_dir.glob("logs/slurm/*")))
    pytest.fail(f"job {job_id} not finished in {TIMEOUT_S} s: {_tasks(env, job_id)}\n{logs}")


@pytest.mark.slurm
def test_miniature_study_runs_as_job_arrays(slurm_cluster, tmp_path):
    env = {**slurm_cluster, "CONTAINER_IMAGE": "none", "PYTHON": sys.executable}
    submit = subprocess.run(
        [sys.executable, "recipes/study.py", "--config", "conf/studies/miniature.yaml",
         f"output_dir={tmp_path}", "executor.kind=slurm", "executor.slurm.max_concurrent=2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    submission = tmp_path / "slurm" / "submission-1"
    submitted = json.loads((submission / "submitted.json").read_text())
    jobs = submitted["jobs"]
    assert set(jobs) == {"shared", "cells", "report"}
    assert submitted["units"]["shared"] == ["shared-seed1", "shared-seed2"]
    assert submitted["units"]["cells"] == ["terminal_only-seed1", "llopsd-seed1",
                                           "terminal_only-seed2", "llopsd-seed2"]

    report = _wait_for(env, jobs["report"], tmp_path)
    assert report[0]["JobState"] == "COMPLETED", report
    # One array, a task per cell, each completed, none started before the shared array ended.
    cells = _tasks(env, jobs["cells"])
    assert sorted(int(task["ArrayTaskId"]) for task in cells) == [0, 1, 2, 3]
    assert {task["ArrayJobId"] for task in cells} == {jobs["cells"]}
    assert all((task["JobState"], task["ExitCode"]) == ("COMPLETED", "0:0") for task in cells)
    shared = _tasks(env, jobs["shared"])
    assert max(task["EndTime"] for task in shared) <= min(task["StartTime"] for task in cells)

    for index, name in enumerate(submitted["units"]["cells"]):
        record = json.loads((tmp_path / "units" / f"{name}.json").read_text())
        log = tmp_path / "logs" / "slurm" / f"miniature-cells-{jobs['cells']}_{index}.out"
        assert record["state"] == "done" and record["log"] == str(log.resolve())
        output = log.read_text()
        assert "[slurm-task]" in output and f"evaluate: {record['cell']}" in output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["missing"] == [] and summary["cells"]["llopsd"]["versus"]["difference"]
    assert (tmp_path / "report.md").is_file()

    scripts = sorted(submission.glob("*.sbatch"))
    assert len(scripts) == 3
    checked = subprocess.run(["shellcheck", "-x", *map(str, scripts)], cwd=REPO,
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
