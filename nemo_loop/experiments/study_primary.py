"""A pre-registered study's primary and secondary analyses of adaptive exit, from its units'
exit curves (:mod:`nemo_loop.experiments.exit_results`), and their report section and plot.

Per cell and seed: the **matched-budget accuracy** (threshold chosen on the selection split as
the most accurate within ``preregistration.primary.budget_loops`` mean loops, the evaluation
split scored there), the **curve mean** (that accuracy averaged over ``curve_budgets``), the
accuracy per difficulty level at the chosen threshold, and the same matched-budget accuracy
for ``q_exit`` after Stage II when the study ran it. Means and 95% t-intervals over seeds, and
paired differences against the cell's baseline (the pretrained model: against every baseline
cell, at each one's budget).
"""

from __future__ import annotations

import math
from pathlib import Path

from nemo_loop.experiments.exit_results import (
    accuracy_by_level,
    budget_curve_mean,
    matched_budget,
    summary,
)
from nemo_loop.experiments.statistics import mean_interval, paired_interval, verdict

CURVE_PLOT = "accuracy_vs_mean_loops.png"


def _interval(values: list[float]) -> dict:
    interval = mean_interval(values)
    return {"mean": interval.mean, "half_width": interval.half_width, "seeds": interval.count}


def _versus(mine: list[float], theirs: list[float]) -> dict:
    difference = paired_interval(mine, theirs)
    return {"difference": {"mean": difference.mean, "half_width": difference.half_width,
                           "seeds": difference.count}, "verdict": verdict(difference)}


def per_seed(record: dict, primary, select_on_evaluation: bool = False) -> dict | None:
    """One unit's primary and secondary numbers (None: it has no exit curves). The threshold is
    chosen on the selection split's curve; ``select_on_evaluation``: on the evaluated split's
    own (a tuning study, whose evaluated split is validation)."""
    evaluation = record.get("exit")
    selection = (record.get("selection") or {}).get("exit") or (
        evaluation if select_on_evaluation else None)
    if not selection or not evaluation:
        return None
    chosen = matched_budget(selection, evaluation, primary.budget_loops)
    values = {"accuracy": chosen["accuracy"], "mean_loops": chosen["mean_loops"],
              "threshold": chosen["threshold"], "within_budget": chosen["within_budget"],
              "curve_mean": budget_curve_mean(selection, evaluation,
                                              primary.curve_budgets or [primary.budget_loops]),
              "by_level": accuracy_by_level(evaluation, chosen["index"], record["problem_ids"],
                                            record.get("levels") or {}),
              "curve": summary(evaluation)}
    gate = record.get("gate_exit") or {}
    gate_selection = gate.get("selection") or (gate.get("evaluation") if select_on_evaluation
                                               else None)
    if gate_selection and gate.get("evaluation"):
        gated = matched_budget(gate_selection, gate["evaluation"], primary.budget_loops)
        values["gate"] = {"accuracy": gated["accuracy"], "mean_loops": gated["mean_loops"]}
    return values


def _entry(seeds: list[dict]) -> dict:
    entry = {key: _interval([s[key] for s in seeds])
             for key in ("accuracy", "mean_loops", "curve_mean")}
    entry["thresholds"] = [s["threshold"] for s in seeds]
    entry["within_budget"] = all(s["within_budget"] for s in seeds)
    levels = seeds[0]["by_level"]
    entry["by_level"] = {level: _interval([s["by_level"][level] for s in seeds])
                         for level in levels}
    entry["curve"] = [{"threshold": point["threshold"],
                       "mean_loops": sum(s["curve"][i]["mean_loops"] for s in seeds) / len(seeds),
                       "accuracy": _interval([s["curve"][i]["accuracy"] for s in seeds])}
                      for i, point in enumerate(seeds[0]["curve"])]
    if all("gate" in s for s in seeds):
        entry["gate"] = {key: _interval([s["gate"][key] for s in seeds])
                         for key in ("accuracy", "mean_loops")}
    return entry


def _comparison(mine: list[dict], theirs: list[dict]) -> dict:
    compared = {"accuracy": _versus([s["accuracy"] for s in mine],
                                    [s["accuracy"] for s in theirs]),
                "curve_mean": _versus([s["curve_mean"] for s in mine],
                                      [s["curve_mean"] for s in theirs]),
                "by_level": {level: _versus([s["by_level"][level] for s in mine],
                                            [s["by_level"][level] for s in theirs])
                             for level in mine[0]["by_level"]}}
    if all("gate" in s for s in mine + theirs):
        compared["gate"] = _versus([s["gate"]["accuracy"] for s in mine],
                                   [s["gate"]["accuracy"] for s in theirs])
    return compared


def analyse(primary, cells: dict[str, list[dict] | None], references: dict[str, list[dict]],
            baselines: dict[str, str], groups: dict[str, tuple],
            select_on_evaluation: bool = False) -> dict | None:
    """``cells``: each cell's records over the seeds in effect (None: incomplete);
    ``references``: the pretrained model's records per pretraining; ``baselines``: cell → its
    baseline cell; ``groups``: cell → its values on the axes other than the method (cells of
    one group are contrasted pairwise); ``select_on_evaluation``: see :func:`per_seed`. None
    when the study pre-registered no exit policy."""
    if primary.exit_policy is None:
        return None
    numbers = {name: [per_seed(record, primary, select_on_evaluation) for record in records]
               for name, records in cells.items() if records}
    numbers = {name: seeds for name, seeds in numbers.items() if all(seeds)}
    result = {"budget_loops": primary.budget_loops, "curve_budgets": primary.curve_budgets,
              "cells": {}, "references": {}}
    for name, seeds in numbers.items():
        entry = _entry(seeds)
        baseline = baselines.get(name)
        if baseline and baseline != name and baseline in numbers:
            entry["versus"] = {"baseline": baseline, **_comparison(seeds, numbers[baseline])}
        result["cells"][name] = entry
    result["contrasts"] = {
        name: {other: _versus([s["accuracy"] for s in seeds],
                              [s["accuracy"] for s in numbers[other]])
               for other in numbers if other != name and groups.get(other) == groups.get(name)}
        for name, seeds in numbers.items()}
    for name, records in references.items():
        seeds = [per_seed(record, primary, select_on_evaluation) for record in records]
        if not all(seeds):
            continue
        entry = _entry(seeds)
        entry["versus"] = {base: _comparison(seeds, numbers[base])
                           for base in dict.fromkeys(baselines.values()) if base in numbers}
        result["references"][name] = entry
    return result


# ----- markdown -----

def _text(value: dict | None) -> str:
    if value is None:
        return "–"
    if math.isnan(value["half_width"]):
        return f"{value['mean']:.3f}"
    return f"{value['mean']:.3f} ± {value['half_width']:.3f}"


def markdown(analysis: dict | None, student_loops: dict[str, int | None]) -> list[str]:
    if not analysis:
        return []
    budget = analysis["budget_loops"]
    lines = ["## Primary analysis: accuracy at a matched budget", "",
             f"Per model and seed, the exit threshold is chosen on the validation split as the "
             f"most accurate one with at most {budget} mean loops per answer; the test split is "
             f"scored at that threshold. Mean ± 95% CI over seeds; Δ is paired (same seeds, "
             f"same test games) against the baseline; *wins*/*loses* when its interval excludes "
             f"0. The curve mean averages the matched-budget accuracy over the budgets "
             f"{analysis['curve_budgets']}.", "",
             "| model | R̃ | accuracy | mean loops | Δ accuracy | verdict | curve mean | "
             "Δ curve mean | verdict |", "|---" * 9 + "|"]
    for name, entry in analysis["references"].items():
        for base, compared in entry["versus"].items():
            lines.append(_row(f"*{name}* vs {base}", "R", entry, compared))
    for name, entry in analysis["cells"].items():
        lines.append(_row(name, str(student_loops.get(name) or "–"), entry,
                          entry.get("versus")))
    over = [name for name, entry in analysis["cells"].items() if not entry["within_budget"]]
    if over:
        lines += ["", f"No threshold within the budget on validation (the fewest-loops one was "
                      f"used) for some seed of: {', '.join(over)}."]
    lines += ["", f"![accuracy vs mean loops]({CURVE_PLOT})", ""]
    lines += _contrasts_markdown(analysis) + _levels_markdown(analysis)
    return lines + _gate_markdown(analysis)


def _contrasts_markdown(analysis: dict) -> list[str]:
    """Every pair of methods at the same values of the other axes (the pre-registration's
    comparisons against every baseline): Δ matched-budget accuracy, row − column."""
    contrasts = analysis.get("contrasts") or {}
    if not any(contrasts.values()):
        return []
    lines = ["### Every paired difference at the matched budget (row − column)", "",
             "Δ accuracy, mean ± 95% CI over seeds; **bold**: the interval excludes 0.", ""]
    for name, row in contrasts.items():
        if not row:
            continue
        cells = []
        for other, compared in row.items():
            text = f"{other}: {_text(compared['difference'])}"
            cells.append(f"**{text}**" if compared["verdict"] != "ties" else text)
        lines.append(f"* {name} − " + "; ".join(cells))
    return [*lines, ""]


def _row(name: str, loops: str, entry: dict, compared: dict | None) -> str:
    accuracy = compared["accuracy"] if compared else None
    curve = compared["curve_mean"] if compared else None
    return "| " + " | ".join([
        name, loops, _text(entry["accuracy"]), _text(entry["mean_loops"]),
        _text(accuracy["difference"]) if accuracy else "–",
        accuracy["verdict"] if accuracy else "–", _text(entry["curve_mean"]),
        _text(curve["difference"]) if curve else "–", curve["verdict"] if curve else "–"]) \
        + " |"


def _levels_markdown(analysis: dict) -> list[str]:
    entries = [*analysis["references"].items(), *analysis["cells"].items()]
    levels = list(entries[0][1]["by_level"]) if entries else []
    if not levels:
        return []
    lines = ["### Accuracy per difficulty level at the chosen threshold", "",
             "Per cell: accuracy, then (Δ against its baseline, paired over seeds).", "",
             "| model | " + " | ".join(f"k = {level}" for level in levels) + " |",
             "|---" * (len(levels) + 1) + "|"]
    for name, entry in entries:
        against = (entry.get("versus") or {}).get("by_level") or {}
        lines.append("| " + " | ".join([name, *[_level_text(entry, against, level)
                                                for level in levels]]) + " |")
    return [*lines, ""]


def _level_text(entry: dict, against: dict, level) -> str:
    text = _text(entry["by_level"].get(level))
    if level in against:
        text += f" (Δ {_text(against[level]['difference'])})"
    return text


def _gate_markdown(analysis: dict) -> list[str]:
    rows = [(name, entry) for name, entry in [*analysis["references"].items(),
                                              *analysis["cells"].items()] if "gate" in entry]
    if not rows:
        return []
    lines = ["### q_exit after Stage II gate training, at the same budget", "",
             "| model | accuracy | mean loops | Δ accuracy | verdict |", "|---" * 5 + "|"]
    for name, entry in rows:
        versus = entry.get("versus") or {}
        compared = versus.get("gate") if "baseline" in versus else None
        lines.append("| " + " | ".join([
            name, _text(entry["gate"]["accuracy"]), _text(entry["gate"]["mean_loops"]),
            _text(compared["difference"]) if compared else "–",
            compared["verdict"] if compared else "–"]) + " |")
    return [*lines, ""]


# ----- the plot -----

def plot(root: Path, analysis: dict | None, panels: dict[str, str],
         static: dict[str, dict], methods: dict[str, str] | None = None) -> None:
    """Accuracy vs mean loops: per model, its adaptive curve (mean over seeds, 95% CI band) and
    its static budgets as markers; one panel per value of ``panels`` (cell → panel title). A
    method (``methods``: cell → method) has one colour and marker in every panel."""
    if not analysis:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = list(dict.fromkeys(panels.values())) or [""]
    figure, axes = plt.subplots(1, len(titles), figsize=(5.5 * len(titles), 4.2), squeeze=False)
    # tab10: ten colours far enough apart to tell lines apart (tab20's pairs were not)
    colours = matplotlib.colormaps["tab10"]
    markers = "osD^v<>ph*"
    methods = methods or {}
    order = list(dict.fromkeys(methods.get(name, name) for name in analysis["cells"]))
    names = [*analysis["references"], *analysis["cells"]]
    for name in names:
        entry = analysis["references"].get(name) or analysis["cells"][name]
        targets = titles if name in analysis["references"] else [panels.get(name, "")]
        for title in targets:
            ax = axes[0][titles.index(title)]
            points = sorted(entry["curve"], key=lambda p: p["mean_loops"])
            xs = [p["mean_loops"] for p in points]
            means = [p["accuracy"]["mean"] for p in points]
            halves = [0.0 if math.isnan(p["accuracy"]["half_width"]) else
                      p["accuracy"]["half_width"] for p in points]
            if name in analysis["references"]:
                style = {"color": "black", "linestyle": "--", "marker": "o"}
            else:
                index = order.index(methods.get(name, name))
                style = {"color": colours(index % 10), "marker": markers[index % len(markers)]}
            label = methods.get(name, name) if len(titles) > 1 else name
            ax.plot(xs, means, label=label, color=style["color"],
                    linestyle=style.get("linestyle", "-"))
            ax.fill_between(xs, [m - h for m, h in zip(means, halves)],
                            [m + h for m, h in zip(means, halves)], alpha=0.12,
                            color=style["color"])
            fixed = static.get(name, {})
            ax.plot([int(r) for r in fixed], [fixed[r]["mean"] for r in fixed], linestyle="",
                    marker=style["marker"], color=style["color"])
    for title, ax in zip(titles, axes[0]):
        ax.axvline(analysis["budget_loops"], color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(title)
        ax.set_xlabel("mean loops per answer (adaptive: line; static R̃: dots)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
    for ax in axes[0]:  # each panel's own lines (a cell is in one panel)
        ax.legend(fontsize=6, loc="lower right")
    figure.tight_layout()
    figure.savefig(root / CURVE_PLOT, dpi=110)
    plt.close(figure)
