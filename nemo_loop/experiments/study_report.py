"""A study's results: one row per cell × seed × loop budget, the means and paired differences
over seeds, a markdown report and plots.

Files in the study directory:

* ``results.jsonl`` / ``results.csv``: one row per (cell or pretrained model, seed, loop
  budget) with accuracy, training FLOPs, inference FLOPs per problem and the accuracy on the
  selection split (``selection_accuracy``, validation: what settings are chosen on); a cell ×
  seed that did not finish is one row with its state (failed/missing), its log and no accuracy;
* ``summary.json``: per cell and budget the mean and 95% CI over seeds, and the paired
  differences against the baseline cell;
* ``report.md``; ``accuracy_vs_loops.png`` (per method, CI bars), ``accuracy_vs_train_flops.png``
  (accuracy at R̃ against the cell's training compute), ``paired_differences.png`` (each
  cell's paired difference at R̃ with its CI), ``pareto.png`` (accuracy against
  inference FLOPs per problem, every cell at every budget, with the Pareto front).

A cell with a seed missing is reported as incomplete and left out of means, differences and
plots: a mean over fewer seeds would silently be another experiment.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from nemo_loop.experiments.statistics import Interval, mean_interval, paired_interval, verdict
from nemo_loop.experiments.study import METHOD_AXIS, Study, Unit
from nemo_loop.experiments.study_primary import analyse
from nemo_loop.experiments.study_primary import markdown as primary_markdown
from nemo_loop.experiments.study_primary import plot as plot_primary
from nemo_loop.experiments.study_sections import (
    gate_markdown,
    gate_summary,
    preregistration_markdown,
    tuning_choices,
    tuning_markdown,
    write_tuned,
)
from nemo_loop.experiments.study_units import DONE, read_unit

REPORT_MD, SUMMARY_JSON = "report.md", "summary.json"
RESULTS_JSONL, RESULTS_CSV = "results.jsonl", "results.csv"
PLOTS = {"loops": "accuracy_vs_loops.png", "compute": "accuracy_vs_train_flops.png",
         "pareto": "pareto.png", "paired": "paired_differences.png"}
MISSING = "missing"


def collect(study: Study) -> dict:
    """unit name → its record; units that never recorded themselves get state ``missing``
    (with the log a Slurm task would have written, when there is one)."""
    from nemo_loop.experiments.study_executors import slurm_log

    records = {}
    for unit in study.units():
        record = read_unit(study.root, unit.name)
        if record is None:
            record = {"unit": unit.name, "kind": unit.kind, "seed": unit.seed,
                      "cell": unit.cell, "state": MISSING, "log": slurm_log(study, unit.name)}
        records[unit.name] = record
    return records


def result_rows(study: Study, records: dict) -> list[dict]:
    """One row per model × seed × loop budget: the pretrained model of every shared unit, and
    every cell (a cell that is another cell's run repeats that run's rows, ``same_run_as``)."""
    rows = []
    units = [(unit, unit.cell) for unit in study.units()]
    units += [(study.cell_unit(cell.name, seed), cell.name) for seed in study.config.seeds
              for cell in study.cells if cell.name in study.same_run]
    for unit, cell_name in units:
        record = records[unit.name]
        if unit.kind == "shared":
            name, method, algorithm, axes = "pretrained", "pretrained", "pretrain", {}
        else:
            cell = study.cell(cell_name)
            name, method, axes = cell.name, cell.method, cell.axes()
            algorithm = study.algorithm_of(cell.name)
        base = {"study": study.config.name, "cell": name, "method": method,
                "algorithm": algorithm, "seed": unit.seed, "pretraining": unit.pretraining,
                **{f"axis:{axis}": value for axis, value in axes.items()},
                "same_run_as": study.same_run.get(name),
                "state": record["state"], "log": record.get("log")}
        if record["state"] != DONE:
            rows.append({**base, "loops": None, "accuracy": None})
            continue
        for loops, accuracy in record["accuracy"].items():
            rows.append({**base, "loops": int(loops), "accuracy": accuracy,
                         "num_problems": len(record["problem_ids"]),
                         "student_loops": record["student_loops"],
                         "train_flops": record["train_flops"],
                         "inference_flops_per_problem":
                             record["inference_flops_per_problem"][loops],
                         "seconds": record["seconds"],
                         **_selection_columns(record, loops)})
    return rows


def _selection_columns(record: dict, loops: str) -> dict:
    selection = record.get("selection")
    return {"selection_split": selection["split"],
            "selection_accuracy": selection["accuracy"][loops]} if selection else {}


def _complete(study: Study, records: dict, cell: str | None, pretraining: str = "") -> list:
    """The cell's records over all seeds, or None if a seed is not done."""
    found = []
    for seed in study.seeds_in_effect()[0]:
        unit = study.cell_unit(cell, seed) if cell else Unit("shared", seed, pretraining)
        record = records.get(unit.name)
        if record is None or record["state"] != DONE:
            return None
        found.append(record)
    return found


def _per_loop(records: list[dict]) -> dict[str, Interval]:
    return {loops: mean_interval([r["accuracy"][loops] for r in records])
            for loops in records[0]["accuracy"]}


def _selection(records: list[dict], baseline: list[dict] | None = None) -> dict | None:
    """Mean and CI per loop on the selection split (and the paired difference against the
    baseline's records), when every seed was scored on it."""
    if not all("selection" in r for r in records):
        return None
    scores = [r["selection"] for r in records]
    entry = {"split": scores[0]["split"],
             "accuracy": _intervals({loops: mean_interval([s["accuracy"][loops] for s in scores])
                                     for loops in scores[0]["accuracy"]})}
    if baseline and all("selection" in r for r in baseline):
        theirs = [r["selection"] for r in baseline]
        entry["difference"] = _intervals({loops: paired_interval(
            [s["accuracy"][loops] for s in scores], [t["accuracy"][loops] for t in theirs])
            for loops in scores[0]["accuracy"]})
    return entry


def summarize(study: Study, records: dict) -> dict:
    cells, references, reference_records = {}, {}, {}
    for pretraining in dict.fromkeys(study.pretraining_of(c.name) for c in study.cells):
        complete = _complete(study, records, None, pretraining)
        if complete:
            name = "pretrained" + (f" {pretraining}" if pretraining else "")
            reference_records[name] = complete
            references[name] = {
                "accuracy": _intervals(_per_loop(complete)),
                "train_flops": _mean([r["train_flops"] for r in complete]),
                "inference_flops_per_problem": _mean_costs(complete),
                "seconds": _mean([r["seconds"] for r in complete]),
                "selection": _selection(complete)}
    for cell in study.cells:
        complete = _complete(study, records, cell.name)
        entry = {"axes": cell.axes(), "method": cell.method, "complete": bool(complete),
                 "algorithm": study.algorithm_of(cell.name),
                 "same_run_as": study.same_run.get(cell.name)}
        if complete:
            entry.update(
                student_loops=complete[0]["student_loops"],
                accuracy=_intervals(_per_loop(complete)),
                train_flops=_mean([r["train_flops"] for r in complete]),
                inference_flops_per_problem=_mean_costs(complete),
                seconds=_mean([r["seconds"] for r in complete]))
        baseline = study.baselines.get(cell.name)
        paired = None
        if complete and baseline and baseline != cell.name:
            paired = _complete(study, records, baseline)
            if paired:
                entry["versus"] = {"baseline": baseline, **_paired(complete, paired)}
        if complete:
            entry["selection"] = _selection(complete, paired)
        cells[cell.name] = entry
    missing = [{"unit": name, "state": record["state"], "log": record.get("log"),
                "error": (record.get("error") or "").splitlines()[0] if record.get("error")
                else None}
               for name, record in records.items() if record["state"] != DONE]
    summary = {"study": study.config.name, "seeds": study.seeds_in_effect()[0],
               "baseline": study.config.baseline_values(), "references": references,
               "cells": cells, "missing": missing, "gate": gate_summary(study)}
    summary["primary"] = primary = analyse(
        study.config.preregistration.primary,
        {cell.name: _complete(study, records, cell.name) for cell in study.cells},
        reference_records, study.baselines,
        {cell.name: tuple(value for axis, value in cell.values if axis != METHOD_AXIS)
         for cell in study.cells},
        select_on_evaluation=study.cell_settings(study.cells[0].name).evaluation_split
        == "validation")
    for name, entry in (primary or {}).get("cells", {}).items():
        cells[name]["primary"] = entry
    summary["tuning"] = tuning_choices(study, summary, _judged_cell)
    return summary


def _judged_cell(summary: dict, name: str) -> str:
    cell = summary["cells"][name]
    return _judged_at(summary, name, len(cell["accuracy"]))


def _paired(cell: list[dict], baseline: list[dict]) -> dict:
    for mine, theirs in zip(cell, baseline):
        if mine["problem_ids"] != theirs["problem_ids"]:
            raise ValueError(f"seed {mine['seed']}: {mine['unit']} and {theirs['unit']} were "
                             f"scored on different problems; paired differences need the same")
    differences = {loops: paired_interval([r["accuracy"][loops] for r in cell],
                                          [r["accuracy"][loops] for r in baseline])
                   for loops in cell[0]["accuracy"]}
    return {"difference": _intervals(differences),
            "verdict": {loops: verdict(interval) for loops, interval in differences.items()}}


def _intervals(values: dict[str, Interval]) -> dict:
    return {key: {"mean": i.mean, "half_width": i.half_width, "seeds": i.count}
            for key, i in values.items()}


def _mean_costs(records: list[dict]) -> dict:
    return {loops: _mean([r["inference_flops_per_problem"][loops] for r in records])
            for loops in records[0]["inference_flops_per_problem"]}


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# ----- markdown -----

def _cell_text(value: dict) -> str:
    return str(Interval(value["mean"], value["half_width"], value["seeds"]))


def _flops(value: float | None) -> str:
    return "–" if value is None else f"{value:.2e}"


def markdown(study: Study, summary: dict, command: str | None) -> str:
    seeds = summary["seeds"]
    num_loops = study.cell_settings(study.cells[0].name).model.num_loops
    loops = [str(r) for r in range(1, num_loops + 1)]
    header = ["cell", "algorithm", "R̃", *[f"{r} loop{'s' if r != '1' else ''}" for r in loops],
              "train FLOPs", "s / seed"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name, reference in summary["references"].items():
        lines.append("| " + " | ".join([f"*{name}*", "pretrain", "–", *[
            _cell_text(reference["accuracy"][r]) for r in loops],
            _flops(reference["train_flops"]), f"{reference['seconds']:.0f}"]) + " |")
    for name, cell in summary["cells"].items():
        if not cell["complete"]:
            lines.append(f"| {name} | {cell['algorithm']} | " + " | ".join(
                ["incomplete"] * (len(header) - 2)) + " |")
            continue
        row = [name, cell["algorithm"], str(cell["student_loops"] or "–"),
               *[_cell_text(cell["accuracy"][r]) for r in loops], _flops(cell["train_flops"]),
               f"{cell['seconds']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    paired = [(name, cell) for name, cell in summary["cells"].items() if "versus" in cell]
    sections = [f"# Study `{study.config.name}`", "",
                f"{len(study.cells)} cells × {len(seeds)} seeds {seeds}; greedy accuracy on "
                f"the held-out problems, mean ± 95% CI half-width over seeds (t-interval); "
                f"training FLOPs of the cell's own run (the shared pretraining is the "
                f"*pretrained* row).", ""]
    if command:
        sections += ["Command:", "", f"```bash\n{command}\n```", ""]
    sections += preregistration_markdown(study) + gate_markdown(summary["gate"])
    sections += tuning_markdown(study, summary["tuning"])
    sections += primary_markdown(summary["primary"], {
        name: cell.get("student_loops") for name, cell in summary["cells"].items()})
    sections += ["## Accuracy per loop budget", "", *lines, "",
                 f"![accuracy vs loops]({PLOTS['loops']})", ""]
    if paired:
        sections += ["## Paired differences against the baseline", "",
                     f"Baseline: the cell with {summary['baseline']} and the same values on the "
                     f"other axes. Δ = cell − baseline on the same test items, seed by seed; "
                     f"mean ± 95% CI over {len(seeds)} seeds; *wins*/*loses* when the interval "
                     f"excludes 0, else *ties* — read at the cell's R̃ (a method that trains "
                     f"every loop: at its baseline's R̃).", "",
                     "| cell | baseline | " + " | ".join(f"Δ at {r}" for r in loops)
                     + " | at R̃ |", "|---" * (len(loops) + 3) + "|"]
        for name, cell in paired:
            versus = cell["versus"]
            at = _judged_at(summary, name, num_loops)
            sections.append("| " + " | ".join(
                [name, versus["baseline"], *[_cell_text(versus["difference"][r]) for r in loops],
                 versus["verdict"][at]]) + " |")
        sections += ["", f"![paired differences]({PLOTS['paired']})",
                     f"![accuracy vs training compute]({PLOTS['compute']})",
                     f"![accuracy vs inference cost]({PLOTS['pareto']})", ""]
    sections += _selection_markdown(summary, loops)
    same = [(name, cell["same_run_as"]) for name, cell in summary["cells"].items()
            if cell.get("same_run_as")]
    if same:
        sections += ["## Cells that are one run", "",
                     "These cells resolve to the same run as another cell (the same loop "
                     "mapping and weights at this R̃, or an axis that does not reach the "
                     "method): it was trained and evaluated once, and its numbers appear under "
                     "both names, each paired with its own baseline.", ""]
        sections += [f"- `{name}` = `{run}`" for name, run in same] + [""]
    if summary["missing"]:
        sections += ["## Missing or failed units", "",
                     "Cells with a missing seed are not averaged over fewer seeds; rerun the "
                     "study (finished units are skipped) to complete them.", ""]
        sections += [f"- `{m['unit']}`: {m['state']}" + (f", log `{m['log']}`" if m["log"] else "")
                     + (f" — {m['error']}" if m["error"] else "") for m in summary["missing"]]
        sections.append("")
    return "\n".join(sections)


def _judged_at(summary: dict, name: str, num_loops: int) -> str:
    """The loop budget a cell's verdict is read at: its R̃; for a method that trains every loop
    (no R̃), its baseline's R̃ (the budget it is compared at); else all R loops."""
    cell = summary["cells"].get(name, {})
    baseline = summary["cells"].get(cell.get("versus", {}).get("baseline"), {})
    return str(cell.get("student_loops") or baseline.get("student_loops") or num_loops)


def _selection_markdown(summary: dict, loops: list[str]) -> list[str]:
    """The selection-split table: what settings are chosen on (never the test numbers)."""
    rows = [(name, entry["selection"]) for name, entry in
            [*summary["references"].items(), *summary["cells"].items()]
            if entry.get("selection")]
    if not rows:
        return []
    split = rows[0][1]["split"]
    lines = [f"## The {split} split (for choosing settings)", "",
             f"Every model scored on {split} problems as well: settings (budgets, the mapping "
             f"the divergence ablations use) are chosen on these numbers, not on the table "
             f"above. Δ at R̃: the paired difference against the baseline where the cell is "
             f"judged (its R̃).", "",
             "| cell | " + " | ".join(f"{r} loop{'s' if r != '1' else ''}" for r in loops)
             + " | Δ at R̃ |", "|---" * (len(loops) + 2) + "|"]
    for name, selection in rows:
        at = _judged_at(summary, name, int(loops[-1]))
        difference = selection.get("difference", {}).get(at)
        lines.append("| " + " | ".join([name, *[_cell_text(selection["accuracy"][r])
                                                 for r in loops],
                                         _cell_text(difference) if difference else "–"]) + " |")
    return [*lines, ""]


# ----- files -----

def write(study: Study, command: str | None = None) -> dict:
    """Collect every unit's record and write the results, summary, report and plots."""
    records = collect(study)
    rows = result_rows(study, records)
    summary = summarize(study, records)
    root = study.root
    with (root / RESULTS_JSONL).open("w") as handle:
        handle.writelines(json.dumps(row, default=float) + "\n" for row in rows)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with (root / RESULTS_CSV).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    (root / SUMMARY_JSON).write_text(json.dumps(summary, indent=1, default=float))
    write_tuned(root, summary["tuning"])
    plot_all(root, study, summary)
    (root / REPORT_MD).write_text(markdown(study, summary, command))
    return summary


def plot_all(root: Path, study: Study, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    complete = {name: cell for name, cell in summary["cells"].items() if cell["complete"]}
    others = [axis for axis in study.config.axes() if axis != "method"]
    panels = sorted({tuple(str(cell["axes"][a]) for a in others) for cell in complete.values()})
    figure, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 4),
                                squeeze=False)
    methods = list(dict.fromkeys(cell["method"] for cell in complete.values()))
    for panel, ax in zip(panels, axes[0]):
        for name, reference in summary["references"].items():
            _errorbar(ax, reference["accuracy"], name, linestyle="--", color="black")
        for name, cell in complete.items():
            if tuple(str(cell["axes"][a]) for a in others) == panel:
                _errorbar(ax, cell["accuracy"], cell["method"],
                          **_style(methods.index(cell["method"])))
        ax.set_title(", ".join(f"{a.split('.')[-1]}={v}" for a, v in zip(others, panel)) or
                     study.config.name)
        ax.set_xlabel("loops at inference")
        ax.set_xticks(range(1, study.cell_settings(study.cells[0].name).model.num_loops + 1))
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
    _legend(axes[0][-1], fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    _save(figure, root / PLOTS["loops"])
    _plot_paired(root, summary)
    panel_titles = {name: ", ".join(f"{a.split('.')[-1]}={cell['axes'][a]}" for a in others)
                    for name, cell in complete.items()}
    plot_primary(root, summary["primary"], panel_titles,
                 {name: entry["accuracy"] for name, entry in
                  [*summary["references"].items(), *complete.items()]},
                 {name: cell["method"] for name, cell in complete.items()})

    figure, ax = plt.subplots(figsize=(6, 4))
    costs = []
    for name, cell in complete.items():
        at = str(cell["student_loops"] or len(cell["accuracy"]))
        if cell["train_flops"]:
            value = cell["accuracy"][at]
            ax.errorbar([cell["train_flops"]], [value["mean"]],
                        yerr=[_half(value)], marker="o", capsize=3, label=name)
            costs.append(cell["train_flops"])
    _compute_axis(ax, costs)
    ax.set_xlabel("training FLOPs of the cell (post-training)")
    ax.set_ylabel("accuracy at the cell's R̃")
    _legend(ax, fontsize=6)
    _save(figure, root / PLOTS["compute"])

    figure, ax = plt.subplots(figsize=(6, 4))
    points = []
    for name, cell in [*summary["references"].items(), *complete.items()]:
        costs = cell["inference_flops_per_problem"]
        xs = [costs[r] for r in cell["accuracy"] if r in costs]
        ys = [cell["accuracy"][r]["mean"] for r in cell["accuracy"] if r in costs]
        ax.plot(xs, ys, marker="o", linestyle=":", label=name)
        points += list(zip(xs, ys))
    front = pareto_front(points)
    if front:
        ax.plot(*zip(*front), color="black", linewidth=2, label="Pareto front")
    _compute_axis(ax, [cost for cost, _ in points])
    ax.set_xlabel("inference FLOPs per problem")
    ax.set_ylabel("accuracy")
    _legend(ax, fontsize=6)
    _save(figure, root / PLOTS["pareto"])


def _plot_paired(root: Path, summary: dict) -> None:
    """Each cell's paired difference to its baseline at the budget it is judged at, with its
    95% CI: the study's verdicts in one picture."""
    import matplotlib.pyplot as plt

    rows = [(name, cell["versus"]["difference"][_judged_at(summary, name, len(cell["accuracy"]))])
            for name, cell in summary["cells"].items()
            if cell["complete"] and "versus" in cell]
    if not rows:
        return
    figure, ax = plt.subplots(figsize=(7, 0.3 * len(rows) + 1.2))
    for index, (name, difference) in enumerate(reversed(rows)):
        low = difference["mean"] - _half(difference)
        high = difference["mean"] + _half(difference)
        color = "tab:green" if low > 0 else "tab:red" if high < 0 else "tab:gray"
        ax.errorbar([difference["mean"]], [index], xerr=[_half(difference)], marker="o",
                    capsize=3, color=color)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [name for name, _ in reversed(rows)], fontsize=7)
    ax.set_xlabel(f"paired Δ accuracy vs baseline at R̃ (95% CI, {len(summary['seeds'])} seeds)")
    _save(figure, root / PLOTS["paired"])


def _style(index: int) -> dict:
    """A distinct colour and marker per method (tab10 alone repeats after 10 lines)."""
    import matplotlib

    return {"color": matplotlib.colormaps["tab20"](index % 20), "marker": "osD^"[index % 4]}


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both cost (lower) and accuracy (higher)."""
    front, best = [], -math.inf
    for cost, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if accuracy > best:
            front.append((cost, accuracy))
            best = accuracy
    return front


def _compute_axis(ax, values: list[float]) -> None:
    """Log scale when the costs span more than a decade; else linear in scientific notation
    (a log axis over a narrow range has unreadable ticks)."""
    if values and max(values) > 10 * min(values) > 0:
        ax.set_xscale("log")
    else:
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0), useOffset=False)


def _half(value: dict) -> float:
    return 0.0 if math.isnan(value["half_width"]) else value["half_width"]


def _errorbar(ax, accuracy: dict, label: str, **style) -> None:
    loops = sorted(accuracy, key=int)
    ax.errorbar([int(r) for r in loops], [accuracy[r]["mean"] for r in loops],
                yerr=[_half(accuracy[r]) for r in loops], capsize=3, label=label,
                **{"marker": "o", **style})


def _legend(ax, **options) -> None:
    """A legend, when the axes have labelled lines (a report before any unit finished has
    none, and matplotlib would warn)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**options)


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
