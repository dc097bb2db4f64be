"""Where a study's units run: one after the other on this machine, or as Slurm job arrays.

Both launch the same command per unit, ``recipes/study.py unit <study dir> ...``, in its own
process tree (a crash or an OOM kill fails that unit only), and both skip units that are done,
so a killed study continues where it stopped and a rerun retries what failed. A unit holds the
lock ``locks/<unit>.lock`` while it runs (:mod:`nemo_loop.utils.run_lock`), so a second copy
of it — a rerun beside a unit that is still running — refuses at once, naming the first.

* ``local``: ``executor.parallel_units`` units at a time (the cores split between them), the
  shared units first and then the cells in order, each cell once its seed's shared unit is done;
  output to ``logs/<unit>.log``; ``executor.nproc_per_node`` > 1 launches each unit with
  torchrun. A cell whose shared unit failed is recorded as failed without running. Then the
  report. The runner owns its units: it holds the study's lock (one runner per study
  directory), each unit runs in a session of its own, SIGTERM and SIGINT to the runner are
  forwarded to every running unit's process group (no new unit starts; the runner exits once
  they have), and the kernel kills the units when the runner dies, even by SIGKILL
  (:mod:`nemo_loop.utils.processes`; torchrun's workers arrange the same with torchrun).
* ``slurm``: one job array for the pending shared units, one job array with a task per pending
  cell (``--dependency=afterok`` on the first; if a shared task fails, the cells are cancelled
  and reported missing), and a report job after both (``afterany``). The batch scripts source
  ``slurm/common.sh``: srun launch, container, NCCL settings, and checkpoint-and-requeue on the
  pre-timeout signal. They are written to ``slurm/submission-<k>/``; ``--dry-run`` prints them.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from nemo_loop.experiments.study import Study, Unit
from nemo_loop.experiments.study_units import FAILED, is_done, read_unit, record_failure
from nemo_loop.utils.processes import LAUNCHER_PID_ENV, launch_command
from nemo_loop.utils.run_lock import LOCK_FILE, hold_lock

REPO = Path(__file__).resolve().parents[2]
RECIPE = "recipes/study.py"


# ----- local -----

def unit_command(study: Study, unit: Unit, log: Path) -> list[str]:
    command = [RECIPE, "unit", str(study.root), unit.name, "--log", str(log)]
    processes = study.config.executor.nproc_per_node
    if processes > 1:
        # "--": torchrun's parser would take the unit's --log for an abbreviation of its own
        # --log-dir/--logs-specs and refuse it as ambiguous
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={processes}", "--", *command]
    return [sys.executable, *command]


def run_local(study: Study) -> dict[str, str]:
    """Every unit that is not done, ``executor.parallel_units`` at a time (shared units first:
    they unlock their seed's cells); returns unit → state. A SIGTERM or SIGINT stops it: the
    signal goes on to the running units, and once they have exited the runner does too
    (SystemExit 128 + the signal)."""
    hold_lock(study.root / LOCK_FILE, f"study directory {study.root}")
    with _UnitProcesses() as processes:
        states = _run_units(study, processes)
    if processes.signal is not None:
        name = signal.Signals(processes.signal).name
        print(f"[study {study.config.name}] stopped by {name}: rerun the same command to "
              f"continue (finished units are skipped, interrupted runs resume from their "
              f"checkpoints)", flush=True)
        raise SystemExit(128 + processes.signal)
    return states


class _UnitProcesses:
    """The running units: each leads a process group of its own (its session); SIGTERM and
    SIGINT to the runner are forwarded to every group, and on the way out any unit still
    running is killed."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.processes: list[subprocess.Popen] = []
        self.signal: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> _UnitProcesses:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._forward)
        return self

    def _forward(self, signum, frame) -> None:
        self.signal = signum
        os.write(2, f"[study] got {signal.Signals(signum).name}: passed on to the running "
                    f"units; no new unit starts\n".encode())
        for process in self.processes:
            self._signal_group(process, signum)

    @staticmethod
    def _signal_group(process: subprocess.Popen, signum: int) -> None:
        if process.returncode is None:  # not reaped yet (no waitpid here: signal handler)
            try:
                os.killpg(process.pid, signum)
            except ProcessLookupError:  # the whole group has exited
                pass

    def start(self, command: list[str], **options) -> subprocess.Popen:
        # the unit dies with this runner (and its torchrun workers with it: recipes/study.py
        # unit calls die_with_launcher)
        environment = {**options.pop("env", os.environ), LAUNCHER_PID_ENV: str(os.getpid())}
        process = subprocess.Popen(launch_command(command), env=environment,
                                   start_new_session=True, **options)
        self.processes = [p for p in self.processes if p.poll() is None] + [process]
        return process

    def __exit__(self, *exc_info) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        for process in self.processes:
            self._signal_group(process, signal.SIGKILL)
            process.wait()


def _run_units(study: Study, processes: _UnitProcesses) -> dict[str, str]:
    units = study.units()
    states: dict[str, str] = {}
    pending = []
    for index, unit in enumerate(units, start=1):
        if is_done(study.root, unit.name):
            states[unit.name] = "done (skipped)"
            print(f"{_prefix(study, index, units)}: done earlier, skipped", flush=True)
        else:
            pending.append((index, unit))
    pending.sort(key=lambda item: item[1].kind != "shared")  # stable: otherwise in order
    workers = study.config.executor.parallel_units
    running: dict[str, tuple[subprocess.Popen, float, str]] = {}
    while (pending and processes.signal is None) or running:
        finished = [name for name, (process, _, _) in running.items()
                    if process.poll() is not None]
        for name in finished:
            process, started, prefix = running.pop(name)
            states[name] = _finish(study, study.unit(name), process.returncode, started, prefix)
        if finished and study.config.preregistration.gate.active:
            units = _follow_the_gate(study, units, pending, states, running)
        for item in list(pending):
            index, unit = item
            if len(running) >= workers or processes.signal is not None:
                break
            waiting = _shared_state(study, unit, states)
            if waiting == "running":
                continue
            pending.remove(item)
            prefix = _prefix(study, index, units)
            if waiting == FAILED:
                shared = study.shared_unit_of(unit)
                shared_log = (read_unit(study.root, shared.name) or {}).get("log")
                record_failure(study, unit, shared_log, f"not run: its shared unit "
                               f"{shared.name} did not finish (log: {shared_log})")
                states[unit.name] = FAILED
                print(f"{prefix}: not run, shared unit {shared.name} failed", flush=True)
                continue
            running[unit.name] = (_start(study, unit, prefix, workers, processes),
                                  time.perf_counter(), prefix)
        time.sleep(0.2 if running else 0)
    # a seed the pretraining gate replaced: its cells are neither run nor reported
    current = {unit.name for unit in study.units()}
    return {unit.name: states.get(unit.name, "not run") for unit in units
            if unit.name in states or unit.name in current}


def _follow_the_gate(study: Study, units: list[Unit], pending: list, states: dict,
                     running: dict) -> list[Unit]:
    """After a shared unit finished, the pretraining gate may have replaced its seed: drop the
    pending units of seeds no longer in effect and queue the replacement seed's units (shared
    first). Returns the updated unit list."""
    current = study.units()
    wanted = {unit.name for unit in current}
    for item in [item for item in pending if item[1].name not in wanted]:
        pending.remove(item)
        print(f"[study {study.config.name}] {item[1].name}: not run, seed {item[1].seed} did "
              f"not pass the pretraining gate", flush=True)
    known = set(states) | set(running) | {unit.name for _, unit in pending}
    added = [(len(units) + index, unit) for index, unit in enumerate(
        [unit for unit in current if unit.name not in known and not is_done(study.root,
                                                                            unit.name)],
        start=1)]
    pending.extend(added)
    pending.sort(key=lambda item: item[1].kind != "shared")
    return units + [unit for _, unit in added]


def _prefix(study: Study, index: int, units: list[Unit]) -> str:
    return f"[study {study.config.name}] {index}/{len(units)} {units[index - 1].name}"


def _shared_state(study: Study, unit: Unit, states: dict[str, str]) -> str | None:
    """For a cell: ``running`` while its shared unit has not finished, FAILED if it failed,
    None when it may start (shared units: always)."""
    if unit.kind != "cell":
        return None
    shared = study.shared_unit_of(unit)
    if is_done(study.root, shared.name):
        return None
    return FAILED if shared.name in states else "running"


def _start(study: Study, unit: Unit, prefix: str, workers: int,
           processes: _UnitProcesses) -> subprocess.Popen:
    log = study.root / "logs" / f"{unit.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"{prefix}: running, log {log}", flush=True)
    environment = dict(os.environ)
    if workers > 1 and "OMP_NUM_THREADS" not in environment:
        # Units side by side share the cores; oversubscribed threads only slow them down.
        environment["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    with log.open("a") as output:
        return processes.start(unit_command(study, unit, log), cwd=REPO, stdout=output,
                               stderr=subprocess.STDOUT, env=environment)


def _finish(study: Study, unit: Unit, returncode: int, started: float, prefix: str) -> str:
    record = read_unit(study.root, unit.name)
    log = study.root / "logs" / f"{unit.name}.log"
    if returncode and (record is None or record["state"] != FAILED):
        # killed before it could record itself (signal, out of memory)
        record_failure(study, unit, str(log), f"exit code {returncode}")
    state = (read_unit(study.root, unit.name) or {}).get("state", FAILED)
    print(f"{prefix}: {state} in {time.perf_counter() - started:.0f} s"
          + (f" (see {log})" if state == FAILED else ""), flush=True)
    return state


# ----- Slurm -----

def _sbatch_header(study: Study, job_name: str, log_pattern: str, array: bool) -> list[str]:
    slurm = study.config.executor.slurm
    lines = ["#!/usr/bin/env bash", f"#SBATCH --job-name={job_name}"]
    if array:
        lines += [f"#SBATCH --nodes={slurm.nodes}",
                  f"#SBATCH --ntasks-per-node={slurm.ntasks_per_node}"]
        if slurm.gpus_per_node:
            lines.append(f"#SBATCH --gpus-per-node={slurm.gpus_per_node}")
        lines += ["#SBATCH --requeue", f"#SBATCH --signal=USR1@{slurm.signal_seconds}"]
    else:
        lines += ["#SBATCH --nodes=1", "#SBATCH --ntasks=1"]
    if slurm.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={slurm.cpus_per_task}")
    lines.append(f"#SBATCH --time={slurm.time}")
    for option in ("partition", "account"):
        if getattr(slurm, option):
            lines.append(f"#SBATCH --{option}={getattr(slurm, option)}")
    lines += [f"#SBATCH --output={log_pattern}", "#SBATCH --open-mode=append"]
    lines += [f"#SBATCH {option}" for option in slurm.extra_args]
    return lines


def _script(study: Study, stage: str, units_file: Path | None) -> str:
    logs = study.root.resolve() / "logs" / "slurm"
    root = shlex.quote(str(study.root.resolve()))
    job_name = f"{study.config.name}-{stage}"
    if units_file is None:  # the report
        header = _sbatch_header(study, job_name, f"{logs}/%x-%j.out", array=False)
        what = "the study's report, after every unit"
        command = f'launch "$PYTHON" {RECIPE} report {root}'
    else:
        header = _sbatch_header(study, job_name, f"{logs}/%x-%A_%a.out", array=True)
        what = f"one array task per {stage} unit, listed in {units_file.name}"
        log = f'{logs}/${{SLURM_JOB_NAME}}-${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}.out'
        command = (f'launch_requeueable "$PYTHON" {RECIPE} unit {root} --units-file '
                   f'{shlex.quote(str(units_file.resolve()))} --index '
                   f'"$SLURM_ARRAY_TASK_ID" --log "{log}"')
    return "\n".join(header + [
        f"# Study {study.config.name}: {what}.",
        f"# Written by {RECIPE}; environment knobs (CONTAINER_IMAGE=none, PYTHON, ...):",
        "# slurm/common.sh.",
        "set -euo pipefail",
        f"REPO_DIR={shlex.quote(str(REPO))}",
        "# shellcheck source=slurm/common.sh",
        'source "$REPO_DIR/slurm/common.sh"',
        'cd "$REPO_DIR"',
        command, ""])


def _next_submission_dir(study: Study) -> Path:
    base = study.root / "slurm"
    count = len(list(base.glob("submission-*"))) if base.is_dir() else 0
    return base / f"submission-{count + 1}"


def submit_slurm(study: Study, dry_run: bool = False, env: dict | None = None) -> dict:
    """Submit the pending units (or print what would be submitted); returns the job ids and
    the scripts by stage."""
    pending = [unit for unit in study.units() if not is_done(study.root, unit.name)]
    stages = {"shared": [u for u in pending if u.kind == "shared"],
              "cells": [u for u in pending if u.kind == "cell"]}
    directory = _next_submission_dir(study)
    throttle = study.config.executor.slurm.max_concurrent
    submitted: dict = {"directory": str(directory), "jobs": {}, "scripts": {}, "units": {}}
    dependency: list[str] = []
    for stage in ("shared", "cells", "report"):
        units = stages.get(stage)
        if units == []:
            continue
        units_file = None if units is None else directory / f"{stage}-units.json"
        script = _script(study, stage, units_file)
        options = []
        if units is not None:
            options.append(f"--array=0-{len(units) - 1}" + (f"%{throttle}" if throttle else ""))
            submitted["units"][stage] = [unit.name for unit in units]
        if dependency:
            kind = "afterany" if stage == "report" else "afterok"
            options.append(f"--dependency={kind}:{':'.join(dependency)}")
            if kind == "afterok":
                options.append("--kill-on-invalid-dep=yes")
        path = directory / f"{stage}.sbatch"
        submitted["scripts"][stage] = script
        if dry_run:
            print(f"# ---- {path} ----\n{script}\n# submit: sbatch --parsable "
                  f"{' '.join(options)} {path}\n", flush=True)
            dependency.append(f"<{stage} job id>")
            continue
        directory.mkdir(parents=True, exist_ok=True)
        (study.root / "logs" / "slurm").mkdir(parents=True, exist_ok=True)
        if units_file is not None:
            units_file.write_text(json.dumps([unit.name for unit in units], indent=1))
        path.write_text(script)
        result = subprocess.run(["sbatch", "--parsable", *options, str(path)], cwd=REPO,
                                env=env, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"sbatch {path} failed ({result.returncode}): {result.stderr}")
        job_id = result.stdout.strip().split(";")[0]
        submitted["jobs"][stage] = job_id
        dependency.append(job_id)
        print(f"[study {study.config.name}] submitted {stage}: job {job_id}"
              + (f" ({len(units)} array tasks)" if units else ""), flush=True)
    if not dry_run:
        (directory / "submitted.json").write_text(json.dumps(
            {key: submitted[key] for key in ("jobs", "units")}, indent=1))
    return submitted


def slurm_log(study: Study, unit_name: str) -> str | None:
    """Where the newest submission's array task for ``unit_name`` writes its output."""
    base = study.root / "slurm"
    for directory in sorted(base.glob("submission-*"),
                            key=lambda p: int(p.name.split("-")[1]), reverse=True):
        path = directory / "submitted.json"
        if not path.is_file():
            continue
        submitted = json.loads(path.read_text())
        for stage, names in submitted["units"].items():
            if unit_name in names and stage in submitted["jobs"]:
                return str(study.root.resolve() / "logs" / "slurm" / (
                    f"{study.config.name}-{stage}-{submitted['jobs'][stage]}_"
                    f"{names.index(unit_name)}.out"))
    return None
