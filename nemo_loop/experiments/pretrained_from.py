"""A study that starts from an earlier study's pretrained models (``pretrained_from``).

Pretraining is most of a seed's shared unit (10 of its 13 minutes in study 2) and is
deterministic given its settings and seed, so a study that pretrains the same model on the same
task with the same pretraining settings and seed as an earlier one — a second round, a tuning
study — copies that study's finished pretraining run into its own directory instead of redoing
it. The copy is a finished run: the shared unit's pretraining phase resumes it at its last step
and trains nothing; everything after it (prompt sets, the pretrained model's evaluations, the
gate, Stage II) runs as usual in this study.

Identity is the pretraining run's whole resolved config except its output directory: model,
task, trainer (seed and data seed included), optimizer, held-out sets. A study whose
pretraining differs from every pretraining of the earlier one is refused at load time, naming
the differences; a seed the earlier study did not pretrain (or not to the end) pretrains here,
and the unit's log says so.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from nemo_loop.config import to_dict
from nemo_loop.experiments.nested import differences
from nemo_loop.experiments.study import Study, StudyError, Unit, read_unit

# The run lock of the earlier run is not part of the run.
_NOT_COPIED = (".run.lock",)


def pretraining_identity(config) -> dict:
    """What decides a pretraining run's result: its resolved config without the path."""
    identity = to_dict(config.pretrain_config())
    identity.pop("output_dir")
    return identity


def check_pretrained_from(study: Study) -> None:
    """At load time: ``study.config.pretrained_from`` holds a study, and each of this study's
    pretrainings (at its first seed) is one of that study's; else a StudyError naming the
    differences."""
    source = _source_study(study)
    if source is None:
        return
    seed = study.config.seeds[0]
    theirs = [pretraining_identity(source.experiment_config(cell, seed))
              for cell in _one_cell_per_pretraining(source)]
    for cell in _one_cell_per_pretraining(study):
        ours = pretraining_identity(study.experiment_config(cell, seed))
        if ours not in theirs:
            changed = differences(theirs[0], ours)
            raise StudyError(
                f"pretrained_from: {source.root} pretrained differently from cell {cell.name} "
                f"of this study ({'; '.join(changed[:6])}); remove pretrained_from or make the "
                f"pretraining settings equal")


def copy_pretraining(study: Study, unit: Unit, config) -> Path | None:
    """Before a shared unit's pretraining phase: copy the earlier study's finished pretraining
    of the same settings and seed into ``config``'s pretrain directory. Returns the copied
    directory, or None when there is none to copy (the unit then pretrains)."""
    source = _source_study(study)
    if source is None:
        return None
    ours = pretraining_identity(config)
    for cell in _one_cell_per_pretraining(source):
        theirs = source.experiment_config(cell, unit.seed)
        if pretraining_identity(theirs) != ours:
            continue
        shared = Unit("shared", unit.seed, source.pretraining_of(cell.name))
        record = read_unit(source.root, shared.name) or {}
        if record.get("state") != "done":
            print(f"pretrained_from: {source.root} has no finished pretraining of seed "
                  f"{unit.seed} ({shared.name}: {record.get('state', 'not run')}); pretraining "
                  f"here", flush=True)
            return None
        origin = Path(theirs.pretrain_config().output_dir)
        target = Path(config.pretrain_config().output_dir)
        staging = target.with_name(target.name + ".copying")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(origin, staging, ignore=shutil.ignore_patterns(*_NOT_COPIED))
        shutil.rmtree(target, ignore_errors=True)  # a partial pretraining of a killed unit
        staging.rename(target)
        print(f"pretrained_from: copied {origin} (same pretraining settings, seed "
              f"{unit.seed}); the pretraining phase resumes it at its last step", flush=True)
        return origin
    print(f"pretrained_from: {source.root} has no pretraining of seed {unit.seed} with these "
          f"settings; pretraining here", flush=True)
    return None


def _source_study(study: Study) -> Study | None:
    path = study.config.pretrained_from
    if path is None:
        return None
    if Path(path).resolve() == study.root.resolve():
        raise StudyError(f"pretrained_from names this study's own output_dir ({path})")
    return Study.load(path)


def _one_cell_per_pretraining(study: Study) -> list:
    """The first cell of each of the study's pretrainings."""
    first = {}
    for cell in study.cells:
        first.setdefault(study.pretraining_of(cell.name), cell)
    return list(first.values())
