"""Studies: grids of compression runs × seeds, on this machine or as Slurm job arrays, with
means, paired differences against a baseline cell, FLOPs, a report and plots.

    python recipes/study.py [--config conf/studies/shell_game.yaml] [--dry-run] [key=value ...]
    python recipes/study.py --config conf/studies/miniature.yaml executor.kind=slurm
    python recipes/study.py report runs/studies/shell_game   # aggregate what has finished
    python recipes/study.py status runs/studies/shell_game   # each unit's state and log

A rerun of the same study continues it: finished units are skipped, failed ones retried; more
seeds may be added (``seeds=[1,2,3,4]``); any other change is refused (choose a new output_dir).
``--dry-run`` checks everything, prints the cells and units (and the Slurm batch scripts) and
runs nothing. The executors launch one process tree per unit with

    python recipes/study.py unit <study dir> <unit> [--log PATH]
    python recipes/study.py unit <study dir> --units-file F --index I [--log PATH]   (arrays)
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from nemo_loop.config import CONF_DIR

DEFAULT_STUDY = CONF_DIR / "studies" / "shell_game.yaml"
COMMANDS = ("run", "report", "status", "unit")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    {"run": run, "report": report, "status": status, "unit": unit}[command](argv)


def run(argv: list[str]) -> None:
    from nemo_loop.experiments import study_executors, study_report
    from nemo_loop.experiments.study import load_study

    parser = argparse.ArgumentParser(prog="study.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_STUDY))
    parser.add_argument("--dry-run", action="store_true",
                        help="check the study and print its units (and Slurm scripts); run "
                             "nothing")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the study config")
    args = parser.parse_args(argv)
    study = load_study(args.config, args.overrides)
    executor = study.config.executor.kind
    units = study.units()
    print(f"study {study.config.name}: {len(study.cells)} cells × {len(study.config.seeds)} "
          f"seeds = {len(units)} units ({executor}) → {study.root}", flush=True)
    if args.dry_run:
        for item in units:
            print(f"  {item.name}")
        if executor == "slurm":
            study_executors.submit_slurm(study, dry_run=True)
        return
    command = " ".join(shlex.quote(part) for part in
                       [sys.executable.split("/")[-1], "recipes/study.py", *argv])
    study.claim_directory(command)
    if executor == "slurm":
        jobs = study_executors.submit_slurm(study)["jobs"]
        print(f"submitted {jobs}; the report job writes {study.root / study_report.REPORT_MD}")
        return
    states = study_executors.run_local(study)
    study_report.write(study, command)
    print(f"\nreport: {study.root / study_report.REPORT_MD}")
    failed = [name for name, state in states.items() if state == "failed"]
    if failed:
        sys.exit(f"{len(failed)} units failed (see the report's last section): {failed}")


def _stored_command(root: Path) -> str | None:
    from nemo_loop.experiments.study import STUDY_JSON

    return json.loads((root / STUDY_JSON).read_text()).get("command")


def report(argv: list[str]) -> None:
    from nemo_loop.experiments import study_report
    from nemo_loop.experiments.study import Study

    parser = argparse.ArgumentParser(prog="study.py report")
    parser.add_argument("study_dir")
    args = parser.parse_args(argv)
    study = Study.load(args.study_dir)
    summary = study_report.write(study, _stored_command(study.root))
    print(f"report: {study.root / study_report.REPORT_MD} ({len(summary['missing'])} units "
          f"missing or failed)")


def status(argv: list[str]) -> None:
    from nemo_loop.experiments import study_report
    from nemo_loop.experiments.study import Study

    parser = argparse.ArgumentParser(prog="study.py status")
    parser.add_argument("study_dir")
    args = parser.parse_args(argv)
    study = Study.load(args.study_dir)
    for name, record in study_report.collect(study).items():
        print(f"{record['state']:8s} {name}  {record.get('log') or ''}")


def unit(argv: list[str]) -> None:
    from nemo_loop.utils.processes import die_with_launcher

    die_with_launcher()  # a local runner's unit (or its torchrun's worker) dies with the runner
    from nemo_loop.experiments.study import Study
    from nemo_loop.experiments.study_units import run_unit
    from nemo_loop.utils.distributed import init_distributed

    parser = argparse.ArgumentParser(prog="study.py unit")
    parser.add_argument("study_dir")
    parser.add_argument("unit", nargs="?", help="the unit's name")
    parser.add_argument("--units-file", help="a JSON list of unit names (a job array's)")
    parser.add_argument("--index", type=int, help="the entry of --units-file to run")
    parser.add_argument("--log", help="where this unit's output goes (recorded with it)")
    args = parser.parse_args(argv)
    if (args.unit is None) == (args.units_file is None or args.index is None):
        parser.error("give a unit name, or --units-file and --index")
    name = args.unit or json.loads(Path(args.units_file).read_text())[args.index]
    study = Study.load(args.study_dir)
    init_distributed()
    run_unit(study, study.unit(name), args.log)


if __name__ == "__main__":
    main()
