"""The embedded compression experiment: pretrain a LoopLM where loops matter, compress it.

Phases, all in one run directory (each a function a study runner can call on its own):

1. ``pretrain/``: Ouro-style pretraining of a tiny LoopLM with R loops on a synthetic task (the
   shell game, :mod:`nemo_loop.tasks.shell_game`); the model checkpoint lands here.
2. ``data/``: the training prompts (train split) and the held-out problems of
   ``evaluation_split`` (test, or validation while choosing settings).
3. ``students/<name>/``: one run per entry of ``students`` — a *method*: a registered algorithm
   (:mod:`nemo_loop.algorithms.registry`) and overrides of its config — each starting from the
   pretrained checkpoint with R̃ = ``student_loops``.
4. ``eval/<model>/``: the evaluation harness on the held-out problems at loops 1..R, greedy.
5. ``report.md``, ``accuracy_vs_loops.png``, ``experiment.json``: the table, plot, wall-clock.

The test split is scored only in phase 4; pretraining monitors the validation split.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_loop.algorithms.pretrain import PretrainConfig
from nemo_loop.algorithms.registry import Algorithm, algorithm
from nemo_loop.algorithms.training_run import checkpoint_root
from nemo_loop.config import to_dict
from nemo_loop.data.prompts import BenchmarkSpec, write_prompt_set
from nemo_loop.evaluation.config import EvalConfig
from nemo_loop.experiments.nested import dotted, flat_keys
from nemo_loop.models.looplm.config import LoopModelConfig
from nemo_loop.tasks import TaskConfig, build_task

log = logging.getLogger(__name__)
PRETRAINED = "pretrained"
OUTPUTS = ("pretrain", "data", "students", "eval", "eval-validation", "gates", "eval-gate",
           "eval-gate-validation", "report.md", "accuracy_vs_loops.png", "experiment.json")
BENCHMARK = "shell_game"
DEFAULT_ALGORITHM = "llopsd"
EVALUATION_SPLITS = ("test", "validation")


@dataclass
class StageTwoGateConfig:
    """Ouro's Stage II for every evaluated model (a study's secondary analysis): the model's
    exit gate re-fitted to its own loops (algorithm ``exit_gate``, LM frozen; its config from
    ``settings``), then the held-out sets scored with ``q_exit`` at every threshold. Empty
    ``thresholds``: no Stage II."""

    thresholds: list[float] = field(default_factory=list)  # q of q_exit
    settings: dict[str, Any] = field(default_factory=dict)  # ExitGateConfig: trainer, optim, gate

    @property
    def enabled(self) -> bool:
        return bool(self.thresholds)


@dataclass
class CompressionExperimentConfig:
    output_dir: str = "runs/compression"
    model: LoopModelConfig = field(default_factory=LoopModelConfig)
    task: TaskConfig = field(default_factory=lambda: TaskConfig(name="shell_game"))
    # The students' prompt set: distinct train-split games (full length; with
    # task.shell_game.heldout_swaps, spread evenly over the held-out lengths).
    train_prompts: int = 2048
    # Distinct held-out games scored for every model at every loop (stratified likewise).
    test_problems: int = 512
    # The split the evaluation scores: test for results, validation while choosing settings.
    evaluation_split: str = "test"
    student_loops: int = 2  # R̃ of every student
    # Set: replaces the seed fields of every phase — pretraining init and data order, each
    # student's prompt order and rollouts (a study's seed). None: each phase's own seeds.
    seed: int | None = None
    # Phase settings. Their model, task, prompt sets, R̃, seeds and paths come from this
    # experiment; a phase section that sets one of them is an error.
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    # Per registered algorithm: its settings shared by every student that uses it, nested as
    # in the algorithm's own YAML (e.g. compression.llopsd.optim.lr).
    compression: dict[str, Any] = field(default_factory=dict)
    # One run per entry: name → {algorithm: <registered name, default llopsd>, <overrides of
    # that algorithm's config, nested>}.
    students: dict[str, Any] = field(default_factory=dict)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    stage2_gate: StageTwoGateConfig = field(default_factory=StageTwoGateConfig)

    @property
    def root(self) -> Path:
        return Path(self.output_dir)

    def validate(self) -> None:
        if self.evaluation_split not in EVALUATION_SPLITS:
            raise ValueError(f"evaluation_split must be one of {EVALUATION_SPLITS}, got "
                             f"{self.evaluation_split!r}")
        self.pretrain_config().validate()
        if self.train_prompts < 1:
            raise ValueError("train_prompts must be >= 1")
        task = build_task(self.task)
        task.check_problem_set("train", self.train_prompts)
        task.check_problem_set(self.evaluation_split, self.test_problems)
        if not 1 <= self.student_loops <= self.model.num_loops:
            raise ValueError(f"student_loops (R̃={self.student_loops}) must be in [1, "
                             f"model.num_loops (R={self.model.num_loops})]")
        for name in self.compression:
            algorithm(name)  # names the registered ones
        if not self.students:
            raise ValueError("students is empty: name at least one compression run")
        for name, method in self.students.items():
            if name == PRETRAINED or not re.fullmatch(r"[\w.+=-]+", name):
                raise ValueError(f"student name {name!r} must be letters, digits and _ . + = - "
                                 f"(a directory name), and not {PRETRAINED!r}")
            if method is not None and not isinstance(method, dict):
                raise ValueError(f"students.{name} must be a mapping {{algorithm: ..., "
                                 f"<overrides of its config>}}, got {method!r}")
        # The phases' remaining checks need files the earlier phases write; run them on stand-ins
        # so that a bad setting fails now, not after pretraining.
        for name in self.students:
            self.student_config(name).validate(check_paths=False)
        self.eval_config(PRETRAINED).validate(check_paths=False)
        if self.stage2_gate.enabled:
            self.gate_config(PRETRAINED).validate(check_paths=False)
            self.gate_eval_config(PRETRAINED).validate(check_paths=False)

    # ----- the phase configs, with everything the experiment decides filled in -----

    def pretrain_config(self) -> PretrainConfig:
        trainer = self.pretrain.trainer
        if self.seed is not None:
            trainer = replace(trainer, seed=self.seed, data_seed=self.seed)
        return replace(self.pretrain, model=self.model, task=self.task, trainer=trainer,
                       test_problems=self.test_problems,
                       output_dir=str(self.root / "pretrain"))

    def student_algorithm(self, name: str) -> Algorithm:
        return algorithm((self.students[name] or {}).get("algorithm", DEFAULT_ALGORITHM))

    def student_config(self, name: str):
        """The student's algorithm config: schema defaults ← ``compression.<algorithm>`` ←
        the student's overrides ← what the experiment decides."""
        method = algorithm_settings(self.students[name])
        chosen = self.student_algorithm(name)
        shared = self.compression.get(chosen.name) or {}
        refuse_decided_keys(chosen, shared, f"compression.{chosen.name}")
        refuse_decided_keys(chosen, method, f"students.{name}")
        decided = {"model": to_dict(self.model), "task": to_dict(self.task),
                   "output_dir": str(self.root / "students" / name),
                   "trainer.init_from": str((self.root / "pretrain" / "model").resolve())}
        if chosen.prompts_key:
            decided[chosen.prompts_key] = {"path": str(self.prompt_set_path("train").resolve()),
                                           "id_field": "id"}
        if chosen.student_loops_key:
            decided[chosen.student_loops_key] = self.student_loops
        if self.seed is not None:
            decided.update({key: self.seed for key in chosen.seed_keys})
        return build_algorithm_config(chosen, [shared, method, dotted(decided)],
                                      f"students.{name}")

    def gate_config(self, model_name: str):
        """Stage II of ``model_name``: its exit gate trained with the LM frozen, into
        ``gates/<model>/`` (``stage2_gate.settings`` ← what the experiment decides)."""
        chosen = algorithm("exit_gate")
        refuse_decided_keys(chosen, self.stage2_gate.settings, "stage2_gate.settings")
        source = self.root / ("pretrain" if model_name == PRETRAINED else "students") / (
            "model" if model_name == PRETRAINED else model_name)
        decided = {"model": to_dict(self.model), "task": to_dict(self.task),
                   "output_dir": str(self.root / "gates" / model_name),
                   "trainer.init_from": str(source.resolve()),
                   # the experiment owns the directory: a rerun continues or starts over
                   "trainer.resume": True, "trainer.overwrite": True}
        if self.seed is not None:
            decided.update({key: self.seed for key in chosen.seed_keys})
        return build_algorithm_config(chosen, [self.stage2_gate.settings, dotted(decided)],
                                      "stage2_gate.settings")

    def gate_eval_config(self, model_name: str, split: str | None = None) -> EvalConfig:
        """The Stage II model scored with ``q_exit`` at ``stage2_gate.thresholds``, at the R̃
        the model is swept at (``eval-gate[-<split>]/``)."""
        base = self.eval_config(model_name, split)
        loops = self.evaluated_loops(model_name) or self.model.num_loops
        scores = "eval-gate" + ("" if (split or self.evaluation_split) == self.evaluation_split
                                else f"-{split}")
        exit_config = replace(self.evaluation.generation.exit, policy="q_exit", threshold=None)
        return replace(base, checkpoint=str(self.root / "gates" / model_name / "model"),
                       generation=replace(base.generation, exit=exit_config),
                       exit_thresholds=list(self.stage2_gate.thresholds), loop_budgets=[loops],
                       exit_loops=loops, output_dir=str(self.root / scores / model_name))

    def prompt_set_path(self, split: str) -> Path:
        return self.root / "data" / f"{split}.jsonl"

    def model_checkpoint(self, model_name: str) -> Path:
        if model_name == PRETRAINED:
            return self.root / "pretrain" / "model"
        return checkpoint_root(self.student_config(model_name))

    def evaluated_loops(self, model_name: str) -> int | None:
        """R̃ a model was trained for (None: the pretrained model, or an algorithm that trains
        all loops)."""
        if model_name == PRETRAINED or not self.student_algorithm(model_name).student_loops_key:
            return None
        return self.student_loops

    def eval_config(self, model_name: str, split: str | None = None) -> EvalConfig:
        """The harness on ``split`` (default: ``evaluation_split``, scored in ``eval/``; a study
        also scores the validation split, in ``eval-validation/``, to choose settings on)."""
        split = split or self.evaluation_split
        held_out = BenchmarkSpec(name=BENCHMARK, path=str(self.prompt_set_path(split).resolve()),
                                 id_field="id")
        scores = "eval" if split == self.evaluation_split else f"eval-{split}"
        # An adaptive exit policy sweeps a student at its own R̃ (the pretrained model at R).
        exit_loops = self.evaluated_loops(model_name) or self.model.num_loops \
            if self.evaluation.generation.exit.adaptive else None
        return replace(self.evaluation, model=self.model,
                       checkpoint=str(self.model_checkpoint(model_name)), benchmarks=[],
                       custom=held_out, task=self.task, exit_loops=exit_loops,
                       output_dir=str(self.root / scores / model_name))


# ----- methods: an algorithm name + overrides of its config -----

def algorithm_settings(method: dict) -> dict:
    """A student entry without its ``algorithm`` key: the overrides of the algorithm's config."""
    return {key: value for key, value in (method or {}).items() if key != "algorithm"}


def refuse_decided_keys(chosen: Algorithm, settings: dict, where: str) -> None:
    for key in flat_keys(settings):
        for decided in chosen.decided_keys():
            if key == decided or key.startswith(decided + "."):
                raise ValueError(f"{where} sets {key!r}, which the experiment decides for every "
                                 f"student (model, task, prompt set, student_loops, initial "
                                 f"weights, output_dir); set it on the experiment")


def build_algorithm_config(chosen: Algorithm, layers: list[dict], where: str):
    """Schema defaults ← ``layers``; an unknown key or a wrong type is an error naming it."""
    schema = chosen.config_class()
    try:
        merged = OmegaConf.structured(schema)
        for layer in layers:
            merged = OmegaConf.merge(merged, OmegaConf.create(layer))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        reason = str(error).splitlines()[0]
        raise ValueError(f"{where}: invalid {schema.__name__} (algorithm {chosen.name!r})"
                         + (f" at {key!r}" if key else "") + f": {reason}") from None


# ----- running it -----

class PhaseClock:
    """Wall-clock seconds of each phase, in order."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def run(self, name: str, function, *args):
        print(f"\n=== {name} ===", flush=True)
        started = time.perf_counter()
        result = function(*args)
        self.seconds[name] = time.perf_counter() - started
        print(f"=== {name}: {self.seconds[name]:.1f} s ===", flush=True)
        return result


def pretrain_phase(config: CompressionExperimentConfig) -> list[dict]:
    from nemo_loop.algorithms import pretrain

    return pretrain.pretrain(config.pretrain_config())


def train_student(config: CompressionExperimentConfig, name: str) -> Path:
    """Train the student ``name`` (resuming when its trainer says so); its checkpoint root."""
    student = config.student_config(name)
    config.student_algorithm(name).train_function()(student)
    return checkpoint_root(student)


def evaluate_model(config: CompressionExperimentConfig, name: str,
                   split: str | None = None) -> list[float]:
    """The harness on the held-out problems (of ``split``, default ``evaluation_split``) at
    loops 1..R; greedy accuracy per loop."""
    from nemo_loop.evaluation.harness import evaluate

    return accuracy_per_loop(evaluate(config.eval_config(name, split)))


def stage_two(config: CompressionExperimentConfig, name: str, splits: list[str]) -> None:
    """Stage II for model ``name``: train its exit gate, then score ``q_exit`` on ``splits``."""
    from nemo_loop.algorithms.exit_gate import train as train_gate
    from nemo_loop.evaluation.harness import evaluate

    train_gate(config.gate_config(name))
    for split in splits:
        evaluate(config.gate_eval_config(name, split))


def run_experiment(config: CompressionExperimentConfig) -> dict:
    """All phases; returns what ``experiment.json`` holds (rank 0 writes the files)."""
    from nemo_loop.experiments import report

    started = time.perf_counter()
    clear_previous_outputs(config.root)
    clock = PhaseClock()
    pretrain_history = clock.run("pretrain", pretrain_phase, config)
    clock.run("write prompt sets", write_prompt_sets, config)
    for name in config.students:
        clock.run(f"compress: {name}", train_student, config, name)
    accuracies = {name: clock.run(f"evaluate: {name}", evaluate_model, config, name)
                  for name in [PRETRAINED, *config.students]}
    summary = {
        "config": to_dict(config),
        "students": {name: {"algorithm": config.student_algorithm(name).name,
                            "config": to_dict(config.student_config(name))}
                     for name in config.students},
        "accuracy_per_loop": accuracies,
        "pretrain_final": pretrain_history[-1],
        "student_loops": config.student_loops,
        "num_loops": config.model.num_loops,
        "test_problems": config.test_problems,
        "evaluation_split": config.evaluation_split,
        "phase_seconds": clock.seconds,
    }
    summary["phase_seconds"]["total"] = time.perf_counter() - started
    if torch.distributed.get_rank() == 0:
        report.write(config.root, summary)
    return summary


def clear_previous_outputs(root: Path) -> None:
    """A rerun into the same directory starts over: stale checkpoints would otherwise be
    resumed from and stale results reported. Only the experiment's own outputs are removed."""
    if torch.distributed.get_rank() == 0:
        stale = [root / name for name in OUTPUTS if (root / name).exists()]
        if stale:
            log.warning("%s: replacing the outputs of an earlier run (%s)", root,
                        ", ".join(path.name for path in stale))
        for path in stale:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    torch.distributed.barrier()


def write_prompt_sets(config: CompressionExperimentConfig, also: tuple[str, ...] = ()) -> None:
    """The training prompts and the held-out problems of ``evaluation_split`` (and of the
    splits in ``also``: a study's validation split), ``test_problems`` of each — stratified by
    difficulty when the task is (:meth:`~nemo_loop.tasks.base.Task.problem_set`)."""
    if torch.distributed.get_rank() == 0:
        task = build_task(config.task)
        write_prompt_set(config.prompt_set_path("train"), task.problem_set(
            "train", config.train_prompts))
        for split in dict.fromkeys([config.evaluation_split, *also]):
            task.check_problem_set(split, config.test_problems)
            write_prompt_set(config.prompt_set_path(split), task.problem_set(
                split, config.test_problems))
    torch.distributed.barrier()


def accuracy_per_loop(results: dict) -> list[float]:
    """Greedy accuracy (avg@1) at each evaluated loop count, in loop order."""
    budgets = results["benchmarks"][BENCHMARK]["budgets"]
    return [budgets[key]["avg@n"] for key in sorted(budgets, key=int)]

