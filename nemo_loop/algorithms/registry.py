"""Every training algorithm by name: its config class, its train function, and where in its
config the fields live that an experiment decides for it.

An experiment (``nemo_loop.experiments``) runs a *method* = an algorithm name + overrides of
that algorithm's config. It fills in what it owns — the model, the task, the training prompt
set, the initial weights, the output directory, R̃ and the seeds — through the keys named here,
so a new algorithm becomes usable in experiments and studies with one entry below.
Modules are imported on first use: naming an algorithm costs nothing.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Algorithm:
    name: str
    config: str  # "module:ConfigClass"; the class has validate(..., check_paths=...)
    train: str  # "module:function", train(config) -> list of per-step metrics
    # Dotted key of R̃ (the loops it trains and is evaluated for); None: it trains all R loops.
    student_loops_key: str | None = "rollout.student_loops"
    # Keys every study seed is written to (prompt order, rollouts, initialisation).
    seed_keys: tuple[str, ...] = ("trainer.seed",)
    # The training prompt set (a PromptSetConfig); None: the algorithm draws its own data.
    prompts_key: str | None = "data"
    # Its script under recipes/ (without .py) when not `name`; its default config is
    # conf/<name>.yaml.
    recipe: str | None = None

    def config_class(self) -> type:
        return _attribute(self.config)

    def train_function(self):
        return _attribute(self.train)

    @property
    def recipe_name(self) -> str:
        return self.recipe or self.name

    def decided_keys(self) -> tuple[str, ...]:
        """Keys of this algorithm's config that an experiment sets: a method must not. (An
        experiment's seed, when it has one, replaces ``seed_keys`` whatever a method says.)"""
        keys = ["model", "task", "output_dir", "trainer.init_from"]
        keys += [key for key in (self.student_loops_key, self.prompts_key) if key]
        return tuple(keys)


def _attribute(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


ALGORITHMS: dict[str, Algorithm] = {algorithm.name: algorithm for algorithm in (
    Algorithm("llopsd", "nemo_loop.algorithms.llopsd:LLOPSDConfig",
              "nemo_loop.algorithms.llopsd:train"),
    Algorithm("grpo", "nemo_loop.algorithms.grpo:GRPOConfig", "nemo_loop.algorithms.grpo:train"),
    Algorithm("rltt", "nemo_loop.algorithms.rltt:RLTTConfig", "nemo_loop.algorithms.rltt:train"),
    Algorithm("oisd", "nemo_loop.algorithms.oisd:OISDConfig", "nemo_loop.algorithms.oisd:train"),
    Algorithm("sft", "nemo_loop.algorithms.sft:SFTConfig", "nemo_loop.algorithms.sft:train",
              student_loops_key="trainer.student_loops"),
    # A pretraining-phase method: it trains all R loops on the task's own sequences (or a text
    # corpus, data.source=text) and is evaluated at every loop budget.
    Algorithm("looprpt", "nemo_loop.algorithms.looprpt:LoopRPTConfig",
              "nemo_loop.algorithms.looprpt:train", student_loops_key=None,
              seed_keys=("trainer.seed", "trainer.data_seed"), prompts_key=None),
    # Ouro's Stage II: the exit gate of trainer.init_from's model, re-fitted with the LM frozen
    # (a study runs it after a student, with init_from = that student's checkpoint).
    Algorithm("exit_gate", "nemo_loop.algorithms.exit_gate:ExitGateConfig",
              "nemo_loop.algorithms.exit_gate:train", student_loops_key=None,
              seed_keys=("trainer.seed", "trainer.data_seed"), prompts_key=None,
              recipe="train_exit_gate"),
    # Ouro's pretraining objective on all R loops (the recipe that makes the initial models).
    Algorithm("pretrain", "nemo_loop.algorithms.pretrain:PretrainConfig",
              "nemo_loop.algorithms.pretrain:pretrain", student_loops_key=None,
              seed_keys=("trainer.seed", "trainer.data_seed"), prompts_key=None,
              recipe="pretrain_looplm"),
)}


def algorithm(name: str) -> Algorithm:
    """An algorithm by its name or by its recipe's name (``pretrain_looplm``)."""
    for entry in ALGORITHMS.values():
        if name in (entry.name, entry.recipe_name):
            return entry
    raise ValueError(f"unknown algorithm {name!r}; registered: {sorted(ALGORITHMS)} "
                     f"(nemo_loop/algorithms/registry.py)")
