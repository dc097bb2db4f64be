"""What every task provides: prompts, a tokenizer, answer checking and teacher-context wording.

A task is the one home of everything that depends on *what* the model is asked: how a problem
becomes a prompt (chat template, tokenizer), how a response is judged against the reference, how
LLOPSD's privileged teacher contexts are worded, and — for synthetic tasks — where training and
held-out problems come from. Algorithms and evaluation take a task from their config
(``task.name``) and never branch on which one it is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from nemo_loop.data.chat import ChatTokenizer
from nemo_loop.data.prompts import BenchmarkSpec, PromptRecord
from nemo_loop.tasks.answers import Verdict

# What the teacher sees that the student does not (LLOPSD's privileged context c):
#   opsd         — the ground-truth answer (and the reference solution where the data has one);
#   sdpo         — SDPO's own context: a sibling rollout of the same prompt that the verifier
#                  marked correct (never the rollout itself), and the verifier's feedback on the
#                  rollout only when no sibling succeeded; with neither, the rollout is masked
#                  out of the loss (nemo_loop.algorithms.teacher_context chooses);
#   sdpo_verdict — the verifier's verdict on the student's own rollout;
#   opsdc        — an instruction to be concise, with no privileged answer;
#   none         — nothing: the teacher reads the student's own prompt (the plain R-loop
#                  teacher, i.e. loop distillation without privileged information).
CONTEXT_KINDS = ("opsd", "sdpo", "sdpo_verdict", "opsdc", "none")
# The context of kind ``none``: the teacher's prompt is the student's.
NO_CONTEXT = ""
# Kinds that look at the other rollouts of the same prompt: they need rollout groups (G >= 2).
GROUP_CONTEXT_KINDS = ("sdpo",)


@dataclass(frozen=True)
class Attempt:
    """A rollout as a teacher context shows it: the response text and the verifier's verdict."""

    text: str
    verdict: Verdict


@dataclass(frozen=True)
class TrainingExample:
    """One pretraining sequence: ``problem`` (+ ``context``) as the prompt, ``answer`` the target."""

    problem: str
    answer: str
    context: str | None = None


class Task(ABC):
    name: ClassVar[str]
    # The teacher contexts this task has words for.
    context_kinds: ClassVar[tuple[str, ...]] = CONTEXT_KINDS
    # Whether the task draws its own training sequences and held-out problems (pretraining).
    synthetic: ClassVar[bool] = False

    def __init__(self, config):
        self.config = config  # this task's section of the TaskConfig (task.<name>)

    def validate(self) -> None:
        """Task-specific checks of ``self.config`` (run once, at config load time)."""

    @abstractmethod
    def tokenizer(self, data_root=None) -> ChatTokenizer:
        """Problem text → prompt ids, ids → text, and the ids that end an answer."""

    @abstractmethod
    def check(self, response: str, reference: str) -> Verdict:
        """Extract the final answer from ``response`` and judge it; never raises."""

    @abstractmethod
    def teacher_context(self, kind: str, record: PromptRecord, verdict: Verdict,
                        include_solution: bool = True, sibling: Attempt | None = None
                        ) -> str | None:
        """The privileged context of ``kind`` for ``record``, given the verdict on the
        student's rollout (``sdpo_verdict``, and ``sdpo``'s feedback).

        ``sdpo``: the wording of ``sibling`` (a correct rollout of the same prompt) when one is
        given; otherwise the task's feedback on ``verdict``, or None when the task has no words
        for feedback (the rollout is then masked out). ``none``: :data:`NO_CONTEXT`. Every other
        kind always has a context.
        """

    # ----- supervised fine-tuning targets -----

    # Whether SFT targets come from the prompt set's solution field (``data.solution_field``);
    # a task whose whole response is its answer (the shell game) needs none.
    sft_needs_solutions: ClassVar[bool] = True

    def sft_target(self, record: PromptRecord) -> str | None:
        """The reference response supervised fine-tuning trains on: the record's worked
        solution, or None when it has none."""
        solution = "" if record.solution is None else str(record.solution)
        return solution if solution.strip() else None

    def check_context_kind(self, kind: str) -> None:
        if kind not in CONTEXT_KINDS:
            raise ValueError(f"teacher.context.kind must be one of {CONTEXT_KINDS}, got {kind!r}")
        if kind not in self.context_kinds:
            raise ValueError(f"task {self.name!r} has no wording for teacher context {kind!r}; "
                             f"it supports {self.context_kinds}")

    # ----- benchmarks (named held-out prompt sets under the data root) -----

    benchmarks: ClassVar[dict[str, BenchmarkSpec]] = {}

    def benchmark(self, name: str) -> BenchmarkSpec:
        if name not in self.benchmarks:
            raise ValueError(f"unknown benchmark {name!r} for task {self.name!r}; known: "
                             f"{sorted(self.benchmarks)} (or give a custom file with "
                             f"custom.path=...)")
        return self.benchmarks[name]

    # ----- synthetic tasks: problems drawn from the task itself -----

    def training_examples(self, count: int, generator: torch.Generator
                          ) -> list[TrainingExample]:
        raise ValueError(f"task {self.name!r} has no synthetic training sequences to pretrain "
                         f"on (pretraining runs on a synthetic task such as shell_game)")

    def heldout_problems(self, split: str, count: int) -> list[PromptRecord]:
        raise ValueError(f"task {self.name!r} does not generate held-out problems; use a prompt "
                         f"set file instead")

    def difficulty(self, problem: str) -> int | None:
        """A problem's difficulty level, when the task defines one (the shell game: its number
        of swaps); evaluation reports accuracy per level. None: no levels."""
        return None

    def difficulty_levels(self) -> list[int]:
        """The levels the task's problem sets are stratified over ([]: not stratified; the shell
        game with ``heldout_swaps``: its held-out game lengths)."""
        return []

    def stratified_problems(self, split: str, count_per_length: int) -> list[PromptRecord]:
        raise ValueError(f"task {self.name!r} has no difficulty-stratified problem sets")

    def problem_set(self, split: str, count: int) -> list[PromptRecord]:
        """About ``count`` problems of ``split`` for an experiment's prompt set: spread evenly
        over the difficulty levels when the task has them (all of a level where it has fewer),
        else :meth:`heldout_problems`."""
        levels = self.difficulty_levels()
        if levels:
            return self.stratified_problems(split, -(-count // len(levels)))
        return self.heldout_problems(split, count)

    def check_problem_set(self, split: str, count: int) -> None:
        """:meth:`check_count` for :meth:`problem_set`."""
        levels = self.difficulty_levels()
        self.check_count(split, -(-count // len(levels)) if levels else count)

    def max_sequence_tokens(self) -> int | None:
        """Longest prompt + answer + end of turn in tokens, when the task knows it."""
        return None

    def check_count(self, split: str, count: int) -> None:
        """Refuse a request for more distinct problems than ``split`` holds."""
