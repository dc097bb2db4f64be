"""slurm/llopsd_8node.sh, unchanged, on a local 8-node Slurm cluster (tests/slurm/cluster.sh).

Only sbatch command-line options shrink the job (fewer nodes and tasks, logs in a temp dir) and
CONTAINER_IMAGE=none + PYTHON run it on the host with the test's interpreter; the arguments are
config overrides for a tiny CPU run. Job state comes from ``scontrol show job`` (there is no
slurmdbd, so no sacct; the cluster keeps finished jobs for MinJobAge=3600 s).
"""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = "slurm/llopsd_8node.sh"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
TINY_RUN = ["trainer.prompts_per_step=4", "trainer.micro_batch_size=1",
            "rollout.max_new_tokens=4", "data.limit=8", "trainer.log_interval=1"]
JOB_TIMEOUT_S = 900


def _submit(env, tmp_path, sbatch_options, overrides):
    env = {**env, "CONTAINER_IMAGE": "none", "PYTHON": sys.executable}
    result = subprocess.run(
        ["sbatch", "--parsable", f"--output={tmp_path}/%x-%j.out",
         f"--error={tmp_path}/%x-%j.err", *sbatch_options, SCRIPT,
         f"output_dir={tmp_path / 'run'}", *TINY_RUN, *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return result.stdout.strip().split(";")[0]


def _job(env, job_id) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True,
                         text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _logs(tmp_path, job_id) -> str:
    return "".join(p.read_text() for p in sorted(tmp_path.glob(f"*-{job_id}.*")))


def _wait(env, job_id, tmp_path, done, what, timeout_s=JOB_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = _job(env, job_id)
        if done(job):
            return job
        time.sleep(2)
    subprocess.run(["scancel", job_id], env=env)
    pytest.fail(f"job {job_id}: {what} not reached in {timeout_s} s: {job}\n"
                f"{_logs(tmp_path, job_id)[-5000:]}")


def _skip_requeue_delay(env, job) -> bool:
    """Slurm holds a requeued job for 2 minutes (BeginTime); the test lets it start now."""
    if job["JobState"] == "PENDING" and job["Reason"] == "BeginTime" and job["Restarts"] != "0":
        subprocess.run(["scontrol", "update", f"JobId={job['JobId']}", "StartTime=now"],
                       env=env, check=True)
    return False


def _finished(env, job_id, tmp_path) -> dict:
    return _wait(env, job_id, tmp_path, lambda job: job["JobState"] in FINAL_STATES, "the end")


def _metric_steps(tmp_path) -> list[int]:
    metrics = tmp_path / "run" / "metrics.jsonl"
    if not metrics.is_file():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line]


def _task_lines(logs) -> list[dict]:
    return [dict(re.findall(r"(\w+)=(\S+)", line))
            for line in logs.splitlines() if line.startswith("[slurm-task]")]


@pytest.mark.slurm
def test_8node_script_trains_on_2_nodes_x_2_tasks(slurm_cluster, tmp_path):
    job_id = _submit(slurm_cluster, tmp_path, ["--nodes=2", "--ntasks-per-node=2"],
                     ["parallel.tensor_parallel=2", "trainer.max_steps=2"])
    job = _finished(slurm_cluster, job_id, tmp_path)
    logs = _logs(tmp_path, job_id)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), logs[-5000:]
    assert job["NumNodes"] == "2" and job["Restarts"] == "0"
    # The memory plan ran once, for the job's 4 ranks, before the ranks started.
    assert logs.count("memory plan: llopsd, model tiny_chat") == 1, logs[-5000:]
    assert "TP 2 × PP 1 × DP 2 = 4 ranks" in logs
    assert logs.index("peak per rank") < logs.index("[slurm-task]")

    # Every task saw its Slurm ids as torch.distributed's variables (block distribution).
    seen = sorted((int(t["RANK"]), int(t["LOCAL_RANK"]), int(t["NODE_RANK"]),
                   int(t["WORLD_SIZE"]), t["node"], t["MASTER_ADDR"]) for t in _task_lines(logs))
    assert seen == [(0, 0, 0, 4, "node1", "127.0.0.1"), (1, 1, 0, 4, "node1", "127.0.0.1"),
                    (2, 0, 1, 4, "node2", "127.0.0.1"), (3, 1, 1, 4, "node2", "127.0.0.1")]
    # TP=2 × DP=2 trained (a world of the wrong size fails the layout check), logged and saved.
    assert _metric_steps(tmp_path) == [1, 2]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest_checkpointed_step.txt").read_text() == "2"
    assert (checkpoints / "step_0000002" / "trainer_state.json").is_file()


@pytest.mark.slurm
def test_pre_timeout_signal_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    max_steps = 10  # margin: under load the signal can land several steps after step 1
    job_id = _submit(slurm_cluster, tmp_path, ["--nodes=2", "--ntasks-per-node=1"],
                     ["parallel.tensor_parallel=2", f"trainer.max_steps={max_steps}"])
    _wait(slurm_cluster, job_id, tmp_path, lambda job: _metric_steps(tmp_path)
          or job["JobState"] in FINAL_STATES, "the first logged step")
    # What `#SBATCH --signal=USR1@600` sends at the time: SIGUSR1 to every task of the job's steps.
    subprocess.run(["scancel", "--signal=USR1", job_id], env=slurm_cluster, check=True)
    job = _wait(slurm_cluster, job_id, tmp_path,
                lambda job: _skip_requeue_delay(slurm_cluster, job)
                or (job["JobState"] in FINAL_STATES and job["Restarts"] != "0"),
                "the end of the requeued run")
    logs = _logs(tmp_path, job_id)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), \
        logs[-5000:]
    assert "got SIGUSR1: saving a checkpoint" in logs
    assert f"requeueing job {job_id}" in logs

    checkpoints = tmp_path / "run" / "checkpoints"
    saved = sorted(int(p.name.split("_")[1]) for p in checkpoints.glob("step_*"))
    assert len(saved) == 2 and 1 <= saved[0] < max_steps and saved[1] == max_steps, saved
    # The requeued run started at the preemption checkpoint: steps 1..k, then k+1..max, once each.
    assert _metric_steps(tmp_path) == list(range(1, max_steps + 1))
    assert "(restart 1)" in logs
    assert (checkpoints / "latest_checkpointed_step.txt").read_text() == str(max_steps)
