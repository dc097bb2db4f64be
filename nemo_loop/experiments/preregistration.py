"""What a study fixes before it runs: its pre-registration, the pretraining gate, and tuning.

    preregistration:                 # written before the first unit runs, never edited after
      written: "2026-12-07"
      question: ...
      hypotheses: {H1: ..., H2: ...}
      primary: {description: ..., ...}   # the metric, the comparison, how settings are chosen
      secondary: [...]
      seeds: [1, 2, 3, 4, 5]         # the study's seeds, in order
      gate: {min_accuracy: 0.8, spare_seeds: [6, 7, 8]}
      falsified_if: ...

The runner copies the section into the report as written in the YAML file, refuses a study
directory whose study was pre-registered differently (the section is part of the study's
fingerprint) and refuses command-line overrides of it: a pre-registration is what the file says.

**The pretraining gate** (``gate.min_accuracy``): a seed whose pretrained model scores below it
at ``gate.loops`` loops (default R) on the selection split — validation, never test — is
replaced by the next of ``gate.spare_seeds``; its cells are not run, and the report lists the
replaced seeds with their scores. A gate is fixed in advance because a seed that failed to learn
the task says nothing about post-training methods, and deciding that after seeing the results
would be a choice made on them.

**Tuning** (``tuning.axes``): a study on the validation split whose grid varies a method setting
(``student.optim.lr``) gives every method the same budget; its report picks, per method, the
value with the best mean score over seeds and writes it as the overrides of the main study
(``tuned.yaml``, and printed). A tuning study that scores the test split is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

SECTION = "preregistration"
TUNING_METRICS = ("accuracy_at_student_loops", "primary")


class PreregistrationError(ValueError):
    """A pre-registration that is incomplete, inconsistent, or changed after the fact."""


@dataclass
class PretrainingGate:
    min_accuracy: float | None = None  # None: no gate
    loops: int | None = None  # the loop count it is read at (None: R)
    spare_seeds: list[int] = field(default_factory=list)  # replacements, used in order

    @property
    def active(self) -> bool:
        return self.min_accuracy is not None

    def validate(self, seeds: list[int], selection_split: str | None, num_loops: int) -> None:
        if not self.active:
            if self.spare_seeds or self.loops is not None:
                raise PreregistrationError("preregistration.gate sets loops or spare_seeds but "
                                           "no min_accuracy")
            return
        if not 0.0 < self.min_accuracy <= 1.0:
            raise PreregistrationError(f"preregistration.gate.min_accuracy must be in (0, 1], "
                                       f"got {self.min_accuracy}")
        if self.loops is not None and not 1 <= self.loops <= num_loops:
            raise PreregistrationError(f"preregistration.gate.loops must be in [1, R="
                                       f"{num_loops}], got {self.loops}")
        if selection_split != "validation":
            raise PreregistrationError(
                f"preregistration.gate reads the pretrained model's validation score, but the "
                f"study's selection_split is {selection_split!r}; set selection_split: "
                f"validation")
        reused = sorted(set(self.spare_seeds) & set(seeds))
        if reused or len(set(self.spare_seeds)) != len(self.spare_seeds):
            raise PreregistrationError(f"preregistration.gate.spare_seeds must be distinct and "
                                       f"not among the seeds {seeds}, got {self.spare_seeds}")

    def outcome(self, accuracy_per_loop: dict[str, float], num_loops: int) -> dict:
        """What the gate says of one pretrained model (its selection-split accuracy per loop)."""
        loops = self.loops or num_loops
        accuracy = accuracy_per_loop[str(loops)]
        return {"loops": loops, "accuracy": accuracy, "min_accuracy": self.min_accuracy,
                "passed": accuracy >= self.min_accuracy}


@dataclass
class PrimaryMetric:
    """The primary analysis. ``description`` says it in words; the other fields are what the
    report computes (an exit policy over thresholds at a mean-loops budget, chosen on the
    selection split; without an exit policy: accuracy at the cell's R̃)."""

    description: str = ""
    exit_policy: str | None = None  # the evaluation's generation.exit.policy (set from here)
    thresholds: list[float] = field(default_factory=list)  # its exit_thresholds (likewise)
    budget_loops: float | None = None
    # Budgets whose matched-budget accuracies are averaged into one number for the whole curve
    # (a secondary analysis); empty: the budget alone.
    curve_budgets: list[float] = field(default_factory=list)

    def validate(self) -> None:
        if self.exit_policy is None:
            if self.thresholds or self.budget_loops is not None or self.curve_budgets:
                raise PreregistrationError("preregistration.primary: thresholds, budget_loops "
                                           "and curve_budgets need an exit_policy")
            return
        if any(not (math.isfinite(b) and b >= 1) for b in self.curve_budgets):
            raise PreregistrationError(f"preregistration.primary.curve_budgets must be mean "
                                       f"loop counts >= 1, got {self.curve_budgets}")
        if not self.thresholds:
            raise PreregistrationError("preregistration.primary.thresholds is empty: the exit "
                                       "policy's thresholds to choose from")
        if self.budget_loops is None or not (math.isfinite(self.budget_loops)
                                             and self.budget_loops >= 1):
            raise PreregistrationError(f"preregistration.primary.budget_loops must be a mean "
                                       f"loop count >= 1, got {self.budget_loops}")


@dataclass
class Preregistration:
    written: str = ""  # the date it was written; empty: the study is not pre-registered
    question: str = ""
    hypotheses: dict[str, str] = field(default_factory=dict)
    primary: PrimaryMetric = field(default_factory=PrimaryMetric)
    secondary: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    gate: PretrainingGate = field(default_factory=PretrainingGate)
    falsified_if: str = ""

    @property
    def declared(self) -> bool:
        return bool(self.written)

    def validate(self, seeds: list[int], selection_split: str | None, num_loops: int) -> None:
        if not self.declared:
            if self != Preregistration():
                raise PreregistrationError("preregistration has content but no 'written' date: "
                                           "a pre-registration says when it was fixed")
            return
        missing = [name for name in ("question", "hypotheses", "falsified_if")
                   if not getattr(self, name)]
        if not self.primary.description:
            missing.append("primary.description")
        if missing:
            raise PreregistrationError(f"preregistration is incomplete: {', '.join(missing)} "
                                       f"must be written before the study runs")
        if list(self.seeds) != list(seeds):
            raise PreregistrationError(
                f"the study's seeds {seeds} differ from the pre-registered seeds "
                f"{list(self.seeds)}; a pre-registered study runs the seeds it declared (and "
                f"the gate's spare seeds in its place)")
        self.primary.validate()
        self.gate.validate(seeds, selection_split, num_loops)


@dataclass
class TuningConfig:
    axes: list[str] = field(default_factory=list)  # grid axes tuned per method (student.<key>)
    metric: str = "accuracy_at_student_loops"  # | primary (the pre-registration's metric)

    def validate(self, grid_axes: list[str], evaluation_split: str,
                 preregistration: Preregistration) -> None:
        if not self.axes:
            return
        for axis in self.axes:
            if axis not in grid_axes:
                raise PreregistrationError(f"tuning.axes names {axis!r}, which is not a grid "
                                           f"axis (axes: {grid_axes})")
            if not axis.startswith("student."):
                raise PreregistrationError(f"tuning.axes: {axis!r} is not a method setting "
                                           f"(student.<key>); only those are chosen per method")
        if evaluation_split != "validation":
            raise PreregistrationError(
                f"a tuning study chooses settings, so it must score the validation split; its "
                f"evaluation_split is {evaluation_split!r} (set settings.evaluation_split: "
                f"validation)")
        if self.metric not in TUNING_METRICS:
            raise PreregistrationError(f"tuning.metric must be one of {TUNING_METRICS}, got "
                                       f"{self.metric!r}")
        if self.metric == "primary" and preregistration.primary.exit_policy is None:
            raise PreregistrationError("tuning.metric primary needs preregistration.primary "
                                       "with an exit_policy")


def section_text(path: str | Path) -> str | None:
    """The ``preregistration:`` block of a study YAML exactly as written (its base files are
    searched when it has none), or None."""
    from nemo_loop.config import CONF_DIR

    path = Path(path)
    lines = path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(SECTION + ":")), None)
    if start is None:
        base = next((line.split(":", 1)[1].strip() for line in lines
                     if line.startswith("base:")), None)
        if base is None:
            return None
        candidates = [path.parent / base, CONF_DIR / base]
        return section_text(next((c for c in candidates if c.is_file()), candidates[0]))
    end = start + 1
    while end < len(lines) and (not lines[end] or lines[end][0] in " #"):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    return "\n".join(lines[start:end])


def refuse_overrides(overrides: list[str]) -> None:
    touched = [item.split("=", 1)[0] for item in overrides
               if item.split("=", 1)[0] == SECTION
               or item.split("=", 1)[0].startswith(SECTION + ".")]
    if touched:
        raise PreregistrationError(f"{', '.join(touched)}: a pre-registration is what the study "
                                   f"file says; it cannot be overridden on the command line")
