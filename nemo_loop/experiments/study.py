"""Studies: a base experiment, grid axes × seeds, each cell an ordinary compression run.

A study (``conf/studies/*.yaml``) names a base compression experiment
(:mod:`nemo_loop.experiments.compression`) and changes it for every cell (``settings``); its
``methods`` are students (an algorithm + overrides of its config); its ``grid`` crosses axes:

* ``method``: names of ``methods``;
* any key of the experiment (``student_loops``, ``compression.llopsd.optim.lr``, ...);
* ``student.<key>``: a key of the cell's method (``student.loss.divergence``).

A cell is one point of the grid; with a seed it is one compression experiment with one student.
Every cell of a seed shares that seed's pretraining, prompt sets and pretrained-model
evaluation (a *shared unit*), so pretraining runs once per seed (once per distinct pretraining
when an axis changes it). The output directory::

    study.json                     the resolved study: fingerprint, base experiment, cells
    seeds/<seed>[-<pretraining>]/  a compression-experiment root: pretrain/, data/, eval/,
                                   students/<cell>/ and eval/<cell>/ of every cell of the seed
    units/<unit>.json              each unit's state (done/failed), log path and results
    locks/<unit>.lock              held by a running unit (nemo_loop.utils.run_lock)
    .run.lock                      held by a running local runner
    logs/<unit>.log                each unit's output (local executor; Slurm: logs/slurm/)
    results.jsonl, results.csv, summary.json, report.md, *.png  (experiments/study_report.py)

Bad input is refused before anything runs: an empty seed list, an unknown grid key (named with
its axis), an axis that changes the held-out problems (pairing needs the same test items), a
baseline that is not a cell of the grid, and an output directory holding another study.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_loop.config import CONF_DIR, load_config, read_section, to_dict
from nemo_loop.experiments.compression import EVALUATION_SPLITS, CompressionExperimentConfig
from nemo_loop.experiments.nested import differences, dotlist, dotted, flat_items, lookup
from nemo_loop.experiments.preregistration import (
    Preregistration,
    TuningConfig,
    refuse_overrides,
    section_text,
)
from nemo_loop.models.looplm.config import LoopModelConfig

STUDY_JSON = "study.json"
METHOD_AXIS = "method"
STUDENT_PREFIX = "student."
# Axes that change the held-out problems: paired differences need the same items everywhere.
HELD_OUT_KEYS = ("task", "test_problems", "evaluation_split")
# A study resumes: each run continues from its newest checkpoint, or starts over in place.
RESUMING = {"resume": True, "overwrite": True}
EXECUTORS = ("local", "slurm")


class StudyError(ValueError):
    """A study that must not start: the message names the problem."""


@dataclass
class SlurmConfig:
    partition: str | None = None
    account: str | None = None
    time: str = "04:00:00"  # per array task; a task checkpoints and requeues at the limit
    nodes: int = 1  # per unit
    ntasks_per_node: int = 1  # ranks per node (torch.distributed processes)
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    max_concurrent: int = 0  # array throttle (%N); 0: as many as the cluster runs
    signal_seconds: int = 600  # SIGUSR1 this long before the time limit: checkpoint, requeue
    extra_args: list[str] = field(default_factory=list)  # more #SBATCH options

    def validate(self) -> None:
        if min(self.nodes, self.ntasks_per_node) < 1 or self.gpus_per_node < 0 \
                or self.max_concurrent < 0 or self.signal_seconds < 0:
            raise StudyError("executor.slurm: nodes and ntasks_per_node must be >= 1, "
                             "gpus_per_node, max_concurrent and signal_seconds >= 0")


@dataclass
class ExecutorConfig:
    kind: str = "local"  # local: one unit after the other | slurm: sbatch job arrays
    nproc_per_node: int = 1  # local: processes per unit (torchrun when > 1)
    # local: units that run at once; each gets cores / parallel_units threads (OMP_NUM_THREADS
    # unless set). Tiny models barely use a second thread, so two units on two cores finish
    # about twice as fast as one after the other.
    parallel_units: int = 1
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def validate(self) -> None:
        if self.kind not in EXECUTORS:
            raise StudyError(f"executor.kind must be one of {EXECUTORS}, got {self.kind!r}")
        if self.nproc_per_node < 1 or self.parallel_units < 1:
            raise StudyError(f"executor.nproc_per_node and executor.parallel_units must be "
                             f">= 1, got {self.nproc_per_node} and {self.parallel_units}")
        self.slurm.validate()


@dataclass
class StudyConfig:
    name: str = "study"
    experiment: str = "compression.yaml"  # the base experiment: a path, or relative to conf/
    settings: dict[str, Any] = field(default_factory=dict)  # its changes, for every cell
    output_dir: str = "runs/studies/study"
    seeds: list[int] = field(default_factory=list)
    methods: dict[str, Any] = field(default_factory=dict)  # name → {algorithm, overrides}
    # axis → values. Nested keys are dotted axes: {student: {loss: {divergence: [...]}}} is the
    # axis student.loss.divergence (so grid.student.loss.divergence=[...] works on the CLI).
    grid: dict[str, Any] = field(default_factory=dict)
    # The baseline cell of paired differences: values of some axes (e.g. {method: terminal_only});
    # each cell is paired with the cell that has these values and the cell's own on other axes.
    baseline: dict[str, Any] = field(default_factory=dict)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    # Every model is also scored on this split (null: not), next to the experiment's
    # evaluation_split: settings (budgets, the mapping an ablation uses) are chosen on it, and
    # the report shows it apart. It does not change any run, so it is not part of the identity.
    selection_split: str | None = "validation"
    # Fixed before the study runs (nemo_loop/experiments/preregistration.py): hypotheses, the
    # primary analysis, the seeds and the pretraining gate. Empty: not pre-registered.
    preregistration: Preregistration = field(default_factory=Preregistration)
    # A tuning study's axes (student.<key>): its report picks each method's best value.
    tuning: TuningConfig = field(default_factory=TuningConfig)
    # An earlier study's directory: a seed it pretrained with the same settings is copied from
    # there, not pretrained again (experiments/pretrained_from.py). Not part of the identity.
    pretrained_from: str | None = None

    def axes(self) -> dict[str, list]:
        """The grid's axes, dotted, in order."""
        axes = {}
        for key, value in self.grid.items():
            if isinstance(value, dict):
                axes.update({f"{key}.{inner}": values for inner, values in
                             StudyConfig(grid=value).axes().items()})
            elif isinstance(value, list):
                axes[key] = value
            else:
                raise StudyError(f"grid axis {key!r} must be a list of values, got {value!r}")
        return axes

    def baseline_values(self) -> dict:
        return flat_items(self.baseline)

    def validate(self) -> None:
        if not re.fullmatch(r"[\w.-]+", self.name):
            raise StudyError(f"name {self.name!r}: letters, digits, '_', '.', '-' only")
        if not self.seeds:
            raise StudyError("seeds is empty: a study needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise StudyError(f"seeds has duplicates: {self.seeds}")
        grid = self.axes()
        if METHOD_AXIS not in grid:
            raise StudyError(f"grid has no '{METHOD_AXIS}' axis: name the methods to compare "
                             f"(defined under methods: {sorted(self.methods)})")
        for axis, values in grid.items():
            if not values:
                raise StudyError(f"grid axis {axis!r} has no values")
            if len(set(map(_label, values))) != len(values):
                raise StudyError(f"grid axis {axis!r} repeats a value: {values}")
        unknown = [name for name in grid[METHOD_AXIS] if name not in self.methods]
        if unknown:
            raise StudyError(f"grid.method names {unknown}, which are not under methods "
                             f"(defined: {sorted(self.methods)})")
        if "students" in self.settings:
            raise StudyError("settings.students: a study's students are its methods")
        baseline = self.baseline_values()
        for key, value in baseline.items():
            if key not in grid:
                raise StudyError(f"baseline cell {baseline} is not in the grid: {key!r} "
                                 f"is not a grid axis (axes: {list(grid)})")
            if _label(value) not in map(_label, grid[key]):
                raise StudyError(f"baseline cell {baseline} is not in the grid: {key}="
                                 f"{value!r} is not among grid.{key} {grid[key]}")
        if self.selection_split not in (None, *EVALUATION_SPLITS):
            raise StudyError(f"selection_split must be one of {EVALUATION_SPLITS} or null, got "
                             f"{self.selection_split!r}")
        self.executor.validate()


def _label(value) -> str:
    """A grid value as it appears in cell names."""
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return re.sub(r"[^\w.-]+", "_", text)


@dataclass(frozen=True)
class Cell:
    name: str
    values: tuple[tuple[str, Any], ...]  # (axis, value) in grid order

    def value(self, axis: str):
        return dict(self.values)[axis]

    @property
    def method(self) -> str:
        return self.value(METHOD_AXIS)

    def axes(self) -> dict:
        return {axis: value for axis, value in self.values}


@dataclass(frozen=True)
class Unit:
    """One process tree's work: a seed's shared phases, or one cell at one seed."""

    kind: str  # shared | cell
    seed: int
    pretraining: str  # the seed directory's suffix ("" when every cell shares one pretraining)
    cell: str | None = None

    @property
    def name(self) -> str:
        suffix = f"-{self.pretraining}" if self.pretraining else ""
        return (f"shared{suffix}-seed{self.seed}" if self.kind == "shared"
                else f"{self.cell}-seed{self.seed}")


class Study:
    """A validated study: its cells, units and each unit's experiment config."""

    def __init__(self, config: StudyConfig, experiment: dict | None = None,
                 pretrainings: dict[str, str] | None = None,
                 same_run: dict[str, str] | None = None):
        """``experiment``, ``pretrainings`` (cell → its pretraining) and ``same_run`` (cell → the
        cell whose run it is) come from study.json when a claimed study is loaded; otherwise
        they are resolved and every cell is validated, before anything runs."""
        config.validate()
        self.config = config
        self.root = Path(config.output_dir)
        # The base experiment, resolved (settings applied, students removed); a running study
        # reads it from study.json so that later edits of the YAML files cannot leak in.
        self.experiment = experiment if experiment is not None else self._resolve_experiment()
        self.cells = self._cells()
        self._check_axes()
        self._settings: dict[str, CompressionExperimentConfig] = {}
        self._pretrainings = pretrainings or {}
        # cell → the cell whose run it is (a cell the grid spells twice runs once)
        self.same_run: dict[str, str] = same_run or {}
        if pretrainings is None:
            self._pretrainings = self._pretraining_ids()  # validates every cell
            self.same_run = self._same_runs()
        self.baselines = self._baselines()
        num_loops = self.experiment["model"]["num_loops"]
        config.preregistration.validate(config.seeds, config.selection_split, num_loops)
        config.tuning.validate(list(config.axes()), self.experiment["evaluation_split"],
                               config.preregistration)
        # The pre-registration as written in the study file (the report copies it verbatim).
        self.preregistration_text: str | None = None

    # ----- the base experiment and the cells -----

    def _resolve_experiment(self) -> dict:
        path = Path(self.config.experiment)
        if not path.is_file():
            path = CONF_DIR / self.config.experiment
        primary = self.config.preregistration.primary
        settings = flat_items(self.config.settings)
        if primary.exit_policy is not None:
            # The pre-registered exit policy and thresholds are what every model is scored with.
            decided = {"evaluation.generation.exit.policy": primary.exit_policy,
                       "evaluation.exit_thresholds": list(primary.thresholds)}
            clashes = [key for key in decided if key in settings and settings[key] !=
                       decided[key]]
            if clashes:
                raise StudyError(f"settings.{clashes[0]} contradicts the pre-registration's "
                                 f"primary analysis; set it there (preregistration.primary)")
            settings.update(decided)
        base = load_config(CompressionExperimentConfig, path, dotlist(settings))
        resolved = to_dict(base)
        resolved["students"] = {}
        return resolved

    def _cells(self) -> list[Cell]:
        cells = [()]
        for axis, values in self.config.axes().items():
            cells = [cell + ((axis, value),) for cell in cells for value in values]
        named = []
        for values in cells:
            method = dict(values)[METHOD_AXIS]
            rest = [f"{axis.split('.')[-1]}={_label(value)}" for axis, value in values
                    if axis != METHOD_AXIS]
            named.append(Cell("+".join([method, *rest]), values))
        names = [cell.name for cell in named]
        if len(set(names)) != len(names):
            raise StudyError(f"two grid axes end in the same key, so cell names collide "
                             f"({names}); rename one of the axes' last keys")
        return named

    def _check_axes(self) -> None:
        for axis in self.config.axes():
            if axis == METHOD_AXIS or axis.startswith(STUDENT_PREFIX):
                continue
            if axis == "students" or axis.startswith("students."):
                raise StudyError(f"grid axis {axis!r}: vary the methods through 'method' and "
                                 f"'student.<key>' axes")
            if axis in ("seed", "output_dir"):
                raise StudyError(f"grid axis {axis!r}: the study sets it (use seeds)")
            if any(axis == key or axis.startswith(key + ".") for key in HELD_OUT_KEYS):
                raise StudyError(f"grid axis {axis!r} changes the held-out problems; paired "
                                 f"differences need the same test items in every cell: set it "
                                 f"under settings instead")
            if "." not in axis and axis not in self.experiment:
                raise StudyError(f"grid axis {axis!r}: unknown experiment key (known: "
                                 f"{sorted(self.experiment)}, plus '{METHOD_AXIS}' and "
                                 f"'{STUDENT_PREFIX}<key>')")

    def experiment_config(self, cell: Cell, seed: int) -> CompressionExperimentConfig:
        """The compression experiment of ``cell`` at ``seed``, with the cell as its one
        student, validated; an unknown key is an error naming the cell and the key."""
        layers = [self.experiment]
        for axis, value in cell.values:
            if axis != METHOD_AXIS and not axis.startswith(STUDENT_PREFIX):
                layers.append(self._axis_layer(axis, value))
        axes = ", ".join(f"{axis}={value!r}" for axis, value in cell.values)
        try:
            method = OmegaConf.merge(
                OmegaConf.create(self.config.methods[cell.method] or {}),
                *[OmegaConf.create(dotted({axis.removeprefix(STUDENT_PREFIX): value}))
                  for axis, value in cell.values if axis.startswith(STUDENT_PREFIX)],
                OmegaConf.create({"trainer": RESUMING}))
            layers.append({"seed": seed, "output_dir": str(self.seed_root(seed, cell)),
                           "students": {cell.name: OmegaConf.to_container(method)},
                           "pretrain": {"trainer": RESUMING}})
            merged = OmegaConf.structured(CompressionExperimentConfig)
            for layer in layers:
                merged = OmegaConf.merge(merged, OmegaConf.create(layer))
            config = OmegaConf.to_object(merged)
        except OmegaConfBaseException as error:
            key = getattr(error, "full_key", None)
            raise StudyError(f"cell {cell.name} ({axes}): unknown or invalid key {key!r} "
                             f"(grid axes: {list(self.config.axes())}): "
                             f"{str(error).splitlines()[0]}") from None
        try:
            config.validate()
        except (ValueError, FileNotFoundError) as error:
            raise StudyError(f"cell {cell.name} ({axes}): {error}") from None
        return config

    def _axis_layer(self, axis: str, value) -> dict:
        if axis == "model" and isinstance(value, str):
            path = Path(value) if value.endswith((".yaml", ".yml")) else \
                CONF_DIR / "model" / f"{value}.yaml"
            if not path.is_file():
                raise StudyError(f"grid axis 'model': no model config {value!r} at {path}")
            value = to_dict(read_section(path, LoopModelConfig))
        return dotted({axis: value})

    # ----- shared phases: one per seed and distinct pretraining -----

    @staticmethod
    def _shared_part(config: CompressionExperimentConfig) -> dict:
        """What a seed's shared phases depend on (not the seed, not the paths)."""
        shared = to_dict(config)
        keep = ("model", "task", "train_prompts", "test_problems", "evaluation_split",
                "pretrain", "evaluation")
        return {key: shared[key] for key in keep}

    def selection_split(self) -> str | None:
        """The extra split every model is scored on, or None (unset, or the same as the
        experiment's evaluation_split)."""
        split = self.config.selection_split
        chosen = self.cell_settings(self.cells[0].name).evaluation_split
        return None if split == chosen else split

    def cell_settings(self, name: str) -> CompressionExperimentConfig:
        """The cell's experiment at the first seed, validated, for reading its settings (its
        paths are provisional until the pretrainings are known)."""
        if name not in self._settings:
            self._settings[name] = self.experiment_config(self.cell(name), self.config.seeds[0])
        return self._settings[name]

    def algorithm_of(self, cell: str) -> str:
        return self.cell_settings(cell).student_algorithm(cell).name

    def _pretraining_ids(self) -> dict[str, str]:
        keys = {cell.name: json.dumps(self._shared_part(self.cell_settings(cell.name)),
                                      sort_keys=True, default=str) for cell in self.cells}
        if len(set(keys.values())) == 1:
            return {name: "" for name in keys}
        return {name: "p" + hashlib.sha256(key.encode()).hexdigest()[:8]
                for name, key in keys.items()}

    def pretraining_of(self, cell: str) -> str:
        return self._pretrainings[cell]

    def seed_root(self, seed: int, cell: Cell) -> Path:
        """The compression-experiment root that ``cell`` shares with the other cells of the
        same seed and pretraining."""
        pretraining = self._pretrainings.get(cell.name, "")
        return self.root / "seeds" / (f"{seed}-{pretraining}" if pretraining else str(seed))

    def shared_config(self, unit: Unit) -> CompressionExperimentConfig:
        """The shared phases' experiment: that of any cell with the unit's pretraining (only
        its model, task, prompt sets, pretraining and evaluation are read)."""
        cell = next(c for c in self.cells if self._pretrainings[c.name] == unit.pretraining)
        return self.experiment_config(cell, unit.seed)

    # ----- units -----

    def seeds_in_effect(self) -> tuple[list[int], dict[int, dict]]:
        """The seeds the study's results come from — its seeds in order, each one the
        pre-registered pretraining gate turned down replaced by the next spare seed — and the
        gate's verdict on every seed judged so far (from the shared units' records)."""
        gate = self.config.preregistration.gate
        if not gate.active:
            return list(self.config.seeds), {}
        pretrainings = list(dict.fromkeys(self._pretrainings[c.name] for c in self.cells))
        verdicts, chosen = {}, []
        for seed in [*self.config.seeds, *gate.spare_seeds]:
            if len(chosen) == len(self.config.seeds):
                break
            outcomes = [(read_unit(self.root, Unit("shared", seed, p).name) or {}).get("gate")
                        for p in pretrainings]
            judged = [outcome for outcome in outcomes if outcome is not None]
            if judged:
                verdicts[seed] = {"passed": all(o["passed"] for o in judged),
                                  "accuracy": min(o["accuracy"] for o in judged),
                                  "loops": judged[0]["loops"],
                                  "complete": len(judged) == len(outcomes)}
            if not verdicts.get(seed, {"passed": True})["passed"]:
                continue
            chosen.append(seed)
        return chosen, verdicts

    def units(self, seeds: list[int] | None = None) -> list[Unit]:
        """Seed by seed (default: the seeds in effect): the shared units, then every cell that
        is its own run (a finished seed is complete)."""
        units = []
        for seed in seeds or self.seeds_in_effect()[0]:
            for pretraining in dict.fromkeys(self._pretrainings[c.name] for c in self.cells):
                units.append(Unit("shared", seed, pretraining))
            units += [self.cell_unit(c.name, seed) for c in self.cells
                      if c.name not in self.same_run]
        return units

    def cell_unit(self, cell: str, seed: int) -> Unit:
        """The unit that holds ``cell``'s run at ``seed`` (another cell's, for a cell that is the
        same run)."""
        run = self.same_run.get(cell, cell)
        return Unit("cell", seed, self._pretrainings[run], run)

    def unit(self, name: str) -> Unit:
        """Any unit of the study, also of a seed the gate turned down or a spare seed."""
        candidates = [*self.config.seeds, *self.config.preregistration.gate.spare_seeds]
        for unit in self.units(candidates):
            if unit.name == name:
                return unit
        raise StudyError(f"no unit {name!r} in study {self.config.name}")

    def shared_unit_of(self, unit: Unit) -> Unit:
        return Unit("shared", unit.seed, unit.pretraining)

    def cell(self, name: str) -> Cell:
        return next(cell for cell in self.cells if cell.name == name)

    # ----- pairing -----

    def _baselines(self) -> dict[str, str]:
        """cell → its baseline cell (same values on every axis the baseline does not fix)."""
        baseline = self.config.baseline_values()
        if not baseline:
            return {}
        by_values = {tuple((a, _label(v)) for a, v in cell.values): cell.name
                     for cell in self.cells}
        pairs = {}
        for cell in self.cells:
            values = tuple((axis, _label(baseline.get(axis, value)))
                           for axis, value in cell.values)
            pairs[cell.name] = by_values[values]
        return pairs

    # ----- identity: refuse to mix two studies in one directory -----

    def run_identity(self, name: str, resolved: bool = False) -> dict:
        """What decides the cell's results at a given seed: its shared phases' settings and its
        student's resolved config without the paths and seeds filled in per seed. ``resolved``:
        with the algorithm's objective written out where it can (LLOPSD: φ and α at this R̃), so
        that two spellings of one run compare equal."""
        config = self.cell_settings(name)
        chosen = config.student_algorithm(name)
        student_config = config.student_config(name)
        student = (student_config.run_identity() if resolved and hasattr(student_config,
                                                                         "run_identity")
                   else to_dict(student_config))
        for key in ("output_dir", "trainer.init_from", *chosen.seed_keys,
                    *([f"{chosen.prompts_key}.path"] if chosen.prompts_key else [])):
            *parents, last = key.split(".")
            lookup(student, ".".join(parents)).pop(last)
        return {"shared": self._shared_part(config), "student": student}

    def _same_runs(self) -> dict[str, str]:
        """Cells that are one run (an axis that does not reach a method, e.g. R̃ for an algorithm
        that trains every loop; two loop mappings that coincide at this R̃) → the first of them.
        Such a run is trained and evaluated once; each cell still gets its own baseline."""
        first: dict[str, str] = {}
        same = {}
        for cell in self.cells:
            key = json.dumps(self.run_identity(cell.name, resolved=True), sort_keys=True,
                             default=str)
            if key in first:
                same[cell.name] = first[key]
            else:
                first[key] = cell.name
        return same

    def fingerprint_source(self) -> dict:
        """Everything that decides a run's result except the seed list (which may grow), and the
        pre-registration if there is one (which may not change)."""
        source = {"name": self.config.name,
                  "cells": {cell.name: self.run_identity(cell.name) for cell in self.cells}}
        if self.config.preregistration.declared:
            source["preregistration"] = to_dict(self.config.preregistration)
        return source

    def fingerprint(self) -> str:
        text = json.dumps(self.fingerprint_source(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def record(self) -> dict:
        return {"fingerprint": self.fingerprint(), "study": to_dict(self.config),
                "experiment": self.experiment, "cells": [
                    {"name": cell.name, "axes": cell.axes(),
                     "algorithm": self.algorithm_of(cell.name),
                     "pretraining": self._pretrainings[cell.name],
                     "same_run_as": self.same_run.get(cell.name)} for cell in self.cells],
                "fingerprint_source": self.fingerprint_source(),
                "preregistration_text": self.preregistration_text}

    def claim_directory(self, command: str | None = None) -> None:
        """Write study.json (with the command that runs the study), or check that the
        directory holds this same study."""
        path = self.root / STUDY_JSON
        record = {**self.record(), "command": command}
        if path.is_file():
            stored = json.loads(path.read_text())
            if stored.get("fingerprint") != record["fingerprint"]:
                changed = differences(stored.get("fingerprint_source", {}),
                                      record["fingerprint_source"])
                if any(d.startswith("preregistration") for d in changed):
                    raise StudyError(
                        f"{self.root} holds this study as it was pre-registered; a "
                        f"pre-registered field changed: "
                        f"{'; '.join(d for d in changed if d.startswith('preregistration'))}"
                        f". A pre-registration is not edited after the study started: revert "
                        f"it, or pre-register a new study in another output_dir")
                raise StudyError(
                    f"{self.root} holds a different study ({stored['study']['name']!r}); "
                    f"differences: {'; '.join(changed[:8]) or 'unknown'}. Refusing to mix "
                    f"results: choose another output_dir, or delete {self.root}")
            # Seeds may grow: record the union.
            record["study"]["seeds"] = list(dict.fromkeys(stored["study"]["seeds"]
                                                          + self.config.seeds))
            record["command"] = command or stored.get("command")
            record["preregistration_text"] = stored.get("preregistration_text")
        self.root.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1, default=str))

    @classmethod
    def load(cls, root: str | Path, seeds: list[int] | None = None) -> Study:
        """The study a directory holds, exactly as it was claimed."""
        path = Path(root) / STUDY_JSON
        if not path.is_file():
            raise StudyError(f"{root} holds no study ({STUDY_JSON} missing)")
        stored = json.loads(path.read_text())
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(StudyConfig),
                                                     stored["study"]))
        config.output_dir = str(root)
        if seeds:
            config.seeds = seeds
        study = cls(config, stored["experiment"],
                    {cell["name"]: cell["pretraining"] for cell in stored["cells"]},
                    {cell["name"]: cell["same_run_as"] for cell in stored["cells"]
                     if cell.get("same_run_as")})
        study.preregistration_text = stored.get("preregistration_text")
        return study


def load_study(path: str | Path, overrides: list[str] | None = None) -> Study:
    """A study YAML + ``key=value`` overrides → a validated :class:`Study`."""
    from nemo_loop.experiments.pretrained_from import check_pretrained_from

    refuse_overrides(list(overrides or []))
    study = Study(load_config(StudyConfig, path, overrides))
    study.preregistration_text = section_text(path)
    check_pretrained_from(study)
    return study


def read_unit(root: Path, name: str) -> dict | None:
    """A unit's record (``units/<unit>.json``), None if it has not recorded itself."""
    path = Path(root) / "units" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None
