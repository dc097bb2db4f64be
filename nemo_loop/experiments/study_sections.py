"""The report sections of what a study fixed in advance: its pre-registration (verbatim), the
pretraining gate's verdict on every seed, and a tuning study's chosen settings.

A tuning study's choice is the value of its tuned axes with the best mean score over seeds, per
method, on the split it scores (validation: a tuning study on the test split is refused at load
time). It is written as ``tuned.yaml`` — the ``methods:`` overrides of the main study — and
printed as command-line overrides.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from nemo_loop.experiments.nested import dotlist, dotted
from nemo_loop.experiments.study import Study

TUNED_YAML = "tuned.yaml"


# ----- the pretraining gate -----

def gate_summary(study: Study) -> dict | None:
    """The gate's settings, its verdict on every seed judged so far and the seeds in effect."""
    gate = study.config.preregistration.gate
    if not gate.active:
        return None
    seeds, verdicts = study.seeds_in_effect()
    return {"min_accuracy": gate.min_accuracy, "loops": gate.loops, "seeds_in_effect": seeds,
            "verdicts": {str(seed): verdict for seed, verdict in verdicts.items()},
            "replaced": [seed for seed, verdict in verdicts.items() if not verdict["passed"]]}


def gate_markdown(summary: dict | None) -> list[str]:
    if summary is None:
        return []
    lines = ["## Pretraining gate", "",
             f"Pre-registered: a seed whose pretrained model scores below "
             f"{summary['min_accuracy']} on the validation split at "
             f"{summary['loops'] or 'R'} loops is replaced by the next spare seed, and its cells "
             f"are not run.", "", "| seed | validation accuracy | verdict |", "|---|---|---|"]
    for seed, verdict in summary["verdicts"].items():
        lines.append(f"| {seed} | {verdict['accuracy']:.3f} at {verdict['loops']} loops | "
                     f"{'passed' if verdict['passed'] else 'replaced'} |")
    replaced = summary["replaced"]
    lines += ["", f"Seeds in effect: {summary['seeds_in_effect']}"
              + (f"; replaced: {replaced}." if replaced else "; none replaced."), ""]
    return lines


# ----- the pre-registration -----

def preregistration_markdown(study: Study) -> list[str]:
    registration = study.config.preregistration
    if not registration.declared:
        return []
    text = study.preregistration_text or OmegaConf.to_yaml(
        OmegaConf.create({"preregistration": OmegaConf.structured(registration)}))
    return ["## Pre-registration", "",
            f"Written {registration.written}, before the study ran, and copied here verbatim "
            f"from the study file (the runner refuses a changed pre-registration in this "
            f"directory):", "", "```yaml", text.rstrip(), "```", ""]


# ----- tuning -----

def tuning_choices(study: Study, summary: dict, judged_at) -> dict | None:
    """Per method: the mean score over seeds of every combination of the tuned axes' values
    (averaged over the other axes' cells), and the best one. ``judged_at(summary, cell)`` is the
    loop budget a cell's accuracy is read at."""
    tuning = study.config.tuning
    if not tuning.axes:
        return None
    scores: dict[str, dict[str, list[float]]] = {}
    for name, cell in summary["cells"].items():
        if not cell["complete"]:
            continue
        values = json.dumps({axis: cell["axes"][axis] for axis in tuning.axes}, sort_keys=True)
        if tuning.metric == "primary":
            score = cell["primary"]["accuracy"]["mean"]
        else:
            score = cell["accuracy"][judged_at(summary, name)]["mean"]
        scores.setdefault(cell["method"], {}).setdefault(values, []).append(score)
    choices = {}
    for method, by_values in scores.items():
        table = {values: sum(found) / len(found) for values, found in by_values.items()}
        best = max(table, key=table.get)  # the first of equal scores, in grid order
        choices[method] = {"chosen": json.loads(best), "score": table[best],
                           "scores": [{"values": json.loads(v), "score": s}
                                      for v, s in table.items()]}
    return choices


def tuned_overrides(choices: dict) -> list[str]:
    """The chosen values as overrides of the main study's ``methods`` section."""
    overrides = {}
    for method, choice in choices.items():
        for axis, value in choice["chosen"].items():
            overrides[f"methods.{method}.{axis.removeprefix('student.')}"] = value
    return dotlist(overrides)


def write_tuned(root: Path, choices: dict | None) -> None:
    if not choices:
        return
    values = {}
    for method, choice in choices.items():
        for axis, value in choice["chosen"].items():
            values[f"{method}.{axis.removeprefix('student.')}"] = value
    (root / TUNED_YAML).write_text(
        "# Chosen on the validation split by the tuning study in this directory; merge under\n"
        "# the main study's methods (or paste the overrides in report.md).\n"
        + OmegaConf.to_yaml(OmegaConf.create({"methods": dotted(values)})))


def tuning_markdown(study: Study, choices: dict | None) -> list[str]:
    if not choices:
        return []
    tuning = study.config.tuning
    metric = ("the pre-registered primary metric" if tuning.metric == "primary"
              else "accuracy at the cell's R̃")
    lines = ["## Tuning: the chosen settings", "",
             f"Per method, the value of {', '.join(f'`{a}`' for a in tuning.axes)} with the best "
             f"mean {metric} over seeds on the {study.experiment['evaluation_split']} split "
             f"(every method got the same grid and seeds). Written to `{TUNED_YAML}`; as "
             f"overrides of the main study:", "", "```", *tuned_overrides(choices), "```", "",
             "| method | " + " | ".join(f"{axis}" for axis in tuning.axes) + " | score | "
             "chosen |", "|---" * (len(tuning.axes) + 3) + "|"]
    for method, choice in choices.items():
        for entry in choice["scores"]:
            picked = "✓" if entry["values"] == choice["chosen"] else ""
            lines.append("| " + " | ".join([method, *[str(entry["values"][a])
                                                      for a in tuning.axes],
                                            f"{entry['score']:.3f}", picked]) + " |")
    return [*lines, ""]
