"""One unit of a study, in this process: a seed's shared phases, or one cell at one seed.

A unit runs the phases of :mod:`nemo_loop.experiments.compression` (every training run resumes
from its newest checkpoint, so a killed or requeued unit continues) and records itself in
``units/<unit>.json``: ``state`` (done or failed), the log path, the error of a failure, the
wall-clock per phase and its results — per loop budget the accuracy, every held-out problem's
correctness (what paired differences pair on), the inference FLOPs per problem — and the
training FLOPs of the run it trained.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

import torch

from nemo_loop.experiments.compression import (
    PRETRAINED,
    CompressionExperimentConfig,
    PhaseClock,
    evaluate_model,
    pretrain_phase,
    stage_two,
    train_student,
    write_prompt_sets,
)
from nemo_loop.experiments.exit_results import exit_curve
from nemo_loop.experiments.pretrained_from import copy_pretraining
from nemo_loop.experiments.study import Study, StudyError, Unit, read_unit
from nemo_loop.utils.collective import run_collectively
from nemo_loop.utils.flops import LoopShape, generation_flops
from nemo_loop.utils.run_lock import hold_lock

UNITS_DIR = "units"
LOCKS_DIR = "locks"  # apart from units/, whose every file is a unit record
DONE, FAILED = "done", "failed"
# A cell of a seed the pre-registered pretraining gate turned down: not run (a spare seed
# takes the seed's place).
EXCLUDED = "excluded"


def unit_path(root: Path, name: str) -> Path:
    return Path(root) / UNITS_DIR / f"{name}.json"


def unit_lock_path(root: Path, name: str) -> Path:
    return Path(root) / LOCKS_DIR / f"{name}.lock"


def is_done(root: Path, name: str) -> bool:
    record = read_unit(root, name)
    return record is not None and record["state"] == DONE


def write_unit(root: Path, name: str, record: dict) -> None:
    """Atomically (a reader never sees half a record)."""
    path = unit_path(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(f".tmp{os.getpid()}")
    staging.write_text(json.dumps(record, indent=1, default=float))
    staging.replace(path)


def describe(study: Study, unit: Unit) -> dict:
    record = {"unit": unit.name, "kind": unit.kind, "seed": unit.seed,
              "pretraining": unit.pretraining, "cell": unit.cell}
    if unit.cell is not None:
        cell = study.cell(unit.cell)
        record.update(method=cell.method, axes=cell.axes(),
                      algorithm=study.algorithm_of(cell.name))
    return record


def record_failure(study: Study, unit: Unit, log: str | None, error: str) -> None:
    write_unit(study.root, unit.name, {**describe(study, unit), "state": FAILED, "log": log,
                                       "error": error})


def run_unit(study: Study, unit: Unit, log: str | None = None) -> dict:
    """Run ``unit`` (collective when distributed); rank 0 records it. A failure is recorded
    with its log path and re-raised; a preemption (SystemExit 85) is not a failure. First,
    rank 0 takes the unit's lock for the rest of the process: a second copy of a unit that
    is still running refuses (on every rank) naming it, and records nothing."""
    rank = torch.distributed.get_rank()
    lock = unit_lock_path(study.root, unit.name)
    lock.parent.mkdir(parents=True, exist_ok=True)
    run_collectively(lambda: hold_lock(lock, f"unit {unit.name} of study {study.root}"),
                     str, StudyError, rank_zero_only=True)
    started = time.perf_counter()
    try:
        if unit.kind == "shared":
            result = _shared(study, unit)
        else:
            shared = study.shared_unit_of(unit)
            if not is_done(study.root, shared.name):
                raise StudyError(f"the shared unit {shared.name} (pretraining, prompt sets) has "
                                 f"not finished: {read_unit(study.root, shared.name)}")
            gate = read_unit(study.root, shared.name).get("gate")
            if gate is not None and not gate["passed"]:
                return _exclude(study, unit, log, gate)
            result = _cell(study, unit)
    except Exception as error:
        if rank == 0:
            record_failure(study, unit, log, f"{type(error).__name__}: {error}\n"
                                             f"{traceback.format_exc(limit=8)}")
        raise
    record = {**describe(study, unit), "state": DONE, "log": log,
              "seconds": time.perf_counter() - started, **result}
    if rank == 0:
        write_unit(study.root, unit.name, record)
    return record


def _exclude(study: Study, unit: Unit, log: str | None, gate: dict) -> dict:
    """A cell of a seed the pretraining gate turned down is recorded as excluded, not run."""
    record = {**describe(study, unit), "state": EXCLUDED, "log": log, "gate": gate}
    if torch.distributed.get_rank() == 0:
        write_unit(study.root, unit.name, record)
        print(f"{unit.name}: not run, seed {unit.seed}'s pretrained model scored "
              f"{gate['accuracy']:.3f} < {gate['min_accuracy']} at {gate['loops']} loops "
              f"(the pre-registered pretraining gate)", flush=True)
    return record


def _shared(study: Study, unit: Unit) -> dict:
    config = study.shared_config(unit)
    clock = PhaseClock()
    selection = study.selection_split()
    # rank 0 copies; the collective is the barrier before every rank resumes the copy
    copied = run_collectively(lambda: copy_pretraining(study, unit, config), str, StudyError,
                              rank_zero_only=True)
    clock.run("pretrain", pretrain_phase, config)
    clock.run("write prompt sets", write_prompt_sets, config, (selection,) if selection else ())
    clock.run("evaluate: pretrained", evaluate_model, config, PRETRAINED)
    result = _selection(clock, config, PRETRAINED, selection)
    result.update(_stage_two(clock, config, PRETRAINED, selection))
    evaluation = evaluation_result(config, PRETRAINED)
    gate = study.config.preregistration.gate
    if gate.active:
        # validation: the selection split, or the evaluation split itself (a tuning study)
        scores = result["selection"] if selection else evaluation
        result["gate"] = gate.outcome(scores["accuracy"], config.model.num_loops)
        verdict = "passed" if result["gate"]["passed"] else "FAILED: the seed is replaced"
        print(f"pretraining gate: {result['gate']['accuracy']:.3f} at {result['gate']['loops']} "
              f"loops on validation (minimum {gate.min_accuracy}) — {verdict}", flush=True)
    pretraining = config.pretrain_config()
    return {"phase_seconds": clock.seconds,
            "train_flops": run_flops(Path(pretraining.output_dir),
                                     pretraining.trainer.max_steps),
            "pretrained_from": str(copied) if copied else None, **evaluation, **result}


def _cell(study: Study, unit: Unit) -> dict:
    cell = study.cell(unit.cell)
    config = study.experiment_config(cell, unit.seed)
    clock = PhaseClock()
    clock.run(f"train: {cell.name}", train_student, config, cell.name)
    clock.run(f"evaluate: {cell.name}", evaluate_model, config, cell.name)
    result = _selection(clock, config, cell.name, study.selection_split())
    result.update(_stage_two(clock, config, cell.name, study.selection_split()))
    student = config.student_config(cell.name)
    return {"phase_seconds": clock.seconds,
            "train_flops": run_flops(Path(student.output_dir), student.trainer.max_steps),
            **evaluation_result(config, cell.name), **result}


def _selection(clock: PhaseClock, config: CompressionExperimentConfig, model_name: str,
               split: str | None) -> dict:
    """The model on the selection split (the study's ``selection_split``), recorded apart."""
    if split is None:
        return {}
    clock.run(f"evaluate on {split}: {model_name}", evaluate_model, config, model_name, split)
    scores = evaluation_result(config, model_name, split)
    return {"selection": {key: scores[key] for key in ("problem_ids", "accuracy", "exit",
                                                       "levels")} | {"split": split}}


def _stage_two(clock: PhaseClock, config: CompressionExperimentConfig, model_name: str,
               selection: str | None) -> dict:
    """Stage II (``stage2_gate``): the model's gate re-fitted, its q_exit curves recorded."""
    if not config.stage2_gate.enabled:
        return {}
    splits = list(dict.fromkeys([config.evaluation_split, *([selection] if selection else [])]))
    clock.run(f"stage II: {model_name}", stage_two, config, model_name, splits)
    return {"gate_exit": {("evaluation" if split == config.evaluation_split else "selection"):
                          _samples_curve(config.gate_eval_config(model_name, split))
                          for split in splits}}


def run_flops(output_dir: Path, max_steps: int) -> float | None:
    """A run's training FLOPs: the mean of the logged steps' ``flops`` × its steps (steps are
    logged every ``log_interval``; their FLOPs vary only with rollout lengths)."""
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    logged = [record["flops"] for record in map(json.loads, path.read_text().splitlines())
              if record.get("flops") is not None]  # null: not finite (utils/logging.py)
    return sum(logged) / len(logged) * max_steps if logged else None


def evaluation_result(config: CompressionExperimentConfig, model_name: str,
                      split: str | None = None) -> dict:
    """Per loop budget: accuracy, per-problem correctness (mean over samples, in the prompt
    set's order) and model FLOPs per problem (prefill + decoding at that budget), on ``split``
    (default: the experiment's evaluation_split)."""
    from nemo_loop.tasks import build_task

    eval_config = config.eval_config(model_name, split)
    problems = _problems(eval_config)
    task = build_task(config.task)
    tokenizer = task.tokenizer()
    prompt_tokens = {p.id: len(tokenizer.encode_prompt(p.problem)) for p in problems}
    shape = LoopShape.of(config.model)
    samples = _samples(eval_config)
    correct: dict[int, dict[str, list[float]]] = {}
    flops: dict[int, list[int]] = {}
    for sample in samples:
        if sample.get("exit_policy", "static") != "static":
            continue  # the adaptive sweep: exit_curve below
        loops = sample["num_loops"]
        correct.setdefault(loops, {}).setdefault(sample["problem_id"], []).append(
            float(sample["correct"]))
        flops.setdefault(loops, []).append(generation_flops(
            shape, prompt_tokens[sample["problem_id"]], sample["num_tokens"], loops))
    ids = [p.id for p in problems]
    per_problem = {str(loops): [sum(by_id[i]) / len(by_id[i]) for i in ids]
                   for loops, by_id in sorted(correct.items())}
    return {
        "model": model_name, "num_loops": config.model.num_loops,
        "student_loops": config.evaluated_loops(model_name), "problem_ids": ids,
        "correct": per_problem,
        "accuracy": {loops: sum(values) / len(values) for loops, values in per_problem.items()},
        "inference_flops_per_problem": {str(loops): sum(values) / len(values)
                                        for loops, values in sorted(flops.items())},
        "exit": exit_curve(samples, ids),
        "levels": {p.id: task.difficulty(p.problem) for p in problems
                   if task.difficulty(p.problem) is not None},
    }


def _problems(eval_config) -> list:
    from nemo_loop.data.prompts import PromptSetConfig, load_prompt_set

    return load_prompt_set(PromptSetConfig(path=eval_config.custom.path, id_field="id"))


def _samples(eval_config) -> list[dict]:
    from nemo_loop.evaluation.report import SAMPLES_JSONL

    return [json.loads(line) for line in
            (Path(eval_config.output_dir) / SAMPLES_JSONL).read_text().splitlines()]


def _samples_curve(eval_config) -> dict | None:
    return exit_curve(_samples(eval_config), [p.id for p in _problems(eval_config)])
