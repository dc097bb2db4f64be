"""The embedded compression experiment: pretrain a LoopLM where loops matter, compress it.

Phases, all in one run directory:

1. ``pretrain/``: Ouro-style pretraining of a tiny LoopLM with R loops on the shell game
   (:mod:`nemo_loop.data.shell_game`); the task's tokenizer and a model checkpoint land here.
2. ``data/``: the LLOPSD training prompts (train split) and the held-out test problems.
3. ``students/<name>/``: one LLOPSD run per entry of ``students`` (a loss configuration), each
   starting from the pretrained checkpoint with R̃ student loops and the OPSD answer context.
4. ``eval/<model>/``: the evaluation harness on the test split at loops 1..R, greedy.
5. ``report.md``, ``accuracy_vs_loops.png``, ``experiment.json``: the table, plot, wall-clock.

The test split is scored only in phase 4; pretraining monitors the validation split.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from nemo_loop.algorithms.llopsd import LLOPSDConfig
from nemo_loop.algorithms.pretrain import PretrainConfig
from nemo_loop.data import shell_game
from nemo_loop.data.prompts import PromptSetConfig
from nemo_loop.data.shell_game import ShellGameConfig
from nemo_loop.evaluation.benchmarks import BenchmarkSpec
from nemo_loop.evaluation.config import EvalConfig
from nemo_loop.losses import LoopDistillConfig
from nemo_loop.models.looplm.config import LoopModelConfig

log = logging.getLogger(__name__)
PRETRAINED = "pretrained"
OUTPUTS = ("pretrain", "data", "students", "eval", "report.md", "accuracy_vs_loops.png",
           "experiment.json")
BENCHMARK = "shell_game"


@dataclass
class CompressionExperimentConfig:
    output_dir: str = "runs/compression"
    model: LoopModelConfig = field(default_factory=LoopModelConfig)
    data: ShellGameConfig = field(default_factory=ShellGameConfig)
    train_prompts: int = 2048  # LLOPSD prompt set (distinct full-length train-split games)
    test_problems: int = 512  # distinct held-out games scored for every model at every loop
    # Phase settings. Their model, data, prompt, paths and answer checker come from this
    # experiment, and the teacher context is OPSD in the task's words (``hint <answer>``: the
    # task vocabulary has no words for the other contexts); whatever a phase says there is
    # replaced.
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    compression: LLOPSDConfig = field(default_factory=LLOPSDConfig)
    # One compression run per entry: name → loss (φ, α, D). Everything else is shared.
    students: dict[str, LoopDistillConfig] = field(default_factory=dict)
    evaluation: EvalConfig = field(default_factory=EvalConfig)

    @property
    def root(self) -> Path:
        return Path(self.output_dir)

    def validate(self) -> None:
        self.data.validate()
        self.pretrain_config().validate()
        if self.train_prompts < 1:
            raise ValueError("train_prompts must be >= 1")
        shell_game.check_count(self.data, "train", self.train_prompts)
        if not self.students:
            raise ValueError("students is empty: name at least one compression run")
        for name in self.students:
            if name == PRETRAINED or not name.replace("_", "").isalnum():
                raise ValueError(f"student name {name!r} must be alphanumeric/underscores and "
                                 f"not {PRETRAINED!r}")
        # The phases' remaining checks need files the earlier phases write; run them on stand-ins
        # so that a bad setting fails now, not after pretraining.
        for name in self.students:
            self.student_config(name).validate(check_paths=False)
        self.eval_config(PRETRAINED, None).validate(check_paths=False)

    # ----- the phase configs, with everything the experiment decides filled in -----

    def pretrain_config(self) -> PretrainConfig:
        return replace(self.pretrain, model=self.model, data=self.data,
                       test_problems=self.test_problems,
                       output_dir=str(self.root / "pretrain"))

    def tokenizer_dir(self) -> Path:
        return self.root / "pretrain" / "tokenizer"

    def student_config(self, name: str) -> LLOPSDConfig:
        base = self.compression
        context = replace(base.teacher.context, kind="opsd",
                          answer_template=shell_game.HINT_TEMPLATE)
        return replace(
            base, model=self.model, loss=self.students[name],
            teacher=replace(base.teacher, context=context),
            data=PromptSetConfig(path=str((self.root / "data" / "train.jsonl").resolve()),
                                 id_field="id"),
            prompt=shell_game.chat_config(self.tokenizer_dir()), answer_checker="exact",
            trainer=replace(base.trainer,
                            init_from=str((self.root / "pretrain" / "model").resolve())),
            output_dir=str(self.root / "students" / name))

    def eval_config(self, model_name: str, checkpoint: Path | None) -> EvalConfig:
        test = BenchmarkSpec(name=BENCHMARK, path=str((self.root / "data" / "test.jsonl")
                                                      .resolve()), id_field="id")
        return replace(self.evaluation, model=self.model,
                       checkpoint=None if checkpoint is None else str(checkpoint),
                       benchmarks=[], custom=test, prompt=shell_game.chat_config(
                           self.tokenizer_dir()), answer_checker="exact",
                       output_dir=str(self.root / "eval" / model_name))


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


def run_experiment(config: CompressionExperimentConfig) -> dict:
    """All phases; returns what ``experiment.json`` holds (rank 0 writes the files)."""
    from nemo_loop.algorithms import llopsd, pretrain
    from nemo_loop.evaluation.answers import verifier_for
    from nemo_loop.evaluation.harness import evaluate
    from nemo_loop.experiments import report

    started = time.perf_counter()
    clear_previous_outputs(config.root)
    clock = PhaseClock()
    pretrain_history = clock.run("pretrain", pretrain.pretrain, config.pretrain_config())
    clock.run("write prompt sets", write_prompt_sets, config)
    checkpoints = {PRETRAINED: config.root / "pretrain" / "model"}
    for name in config.students:
        student = config.student_config(name)
        clock.run(f"compress: {name}", llopsd.train, student, verifier_for("exact"))
        checkpoints[name] = student.checkpoint_root()
    accuracies = {}
    for name, checkpoint in checkpoints.items():
        results = clock.run(f"evaluate: {name}", evaluate, config.eval_config(name, checkpoint))
        accuracies[name] = accuracy_per_loop(results)
    summary = {
        "config": _config_dict(config),
        "accuracy_per_loop": accuracies,
        "pretrain_final": pretrain_history[-1],
        "student_loops": config.compression.rollout.student_loops,
        "num_loops": config.model.num_loops,
        "test_problems": config.test_problems,
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


def write_prompt_sets(config: CompressionExperimentConfig) -> None:
    if torch.distributed.get_rank() == 0:
        data_dir = config.root / "data"
        shell_game.write_prompt_set(data_dir / "train.jsonl", shell_game.problems(
            config.data, "train", config.train_prompts))
        shell_game.write_prompt_set(data_dir / "test.jsonl", shell_game.problems(
            config.data, "test", config.test_problems))
    torch.distributed.barrier()


def accuracy_per_loop(results: dict) -> list[float]:
    """Greedy accuracy (avg@1) at each evaluated loop count, in loop order."""
    budgets = results["benchmarks"][BENCHMARK]["budgets"]
    return [budgets[key]["avg@n"] for key in sorted(budgets, key=int)]


def _config_dict(config: CompressionExperimentConfig) -> dict:
    from nemo_loop.config import to_dict

    return to_dict(config)
