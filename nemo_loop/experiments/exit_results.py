"""A model's adaptive-exit curve in a study, and the analyses a pre-registration names on it.

A unit records, per exit threshold of its evaluation (in the order evaluated), every held-out
problem's correctness and the mean loop its tokens were read out at (:func:`exit_curve`), on
the evaluation split and on the selection split (validation). From those:

* :func:`matched_budget` — the **matched-budget accuracy**: the threshold is chosen on the
  selection split as the most accurate one whose mean loops stay within the budget (ties: the
  one with fewer loops), and the evaluation split is scored at that threshold. Nothing about
  the choice reads the evaluation split.
* :func:`budget_curve_mean` — the matched-budget accuracy averaged over a grid of budgets: one
  number for the whole accuracy-vs-loops curve (its area per loop).
* :func:`accuracy_by_level` — accuracy per difficulty level at a chosen threshold.

Mean loops are per generated token; with one generated token per problem (the shell game's
answer, ``max_new_tokens: 1``) that is the loop the answer was read out at.
"""

from __future__ import annotations

import math


def exit_curve(samples: list[dict], problem_ids: list[str]) -> dict | None:
    """The adaptive runs among a harness's ``samples`` (one benchmark): per threshold, each
    problem's correctness (mean over its samples) and mean exit loop, in ``problem_ids``
    order. None when the evaluation had no adaptive policy."""
    adaptive = [s for s in samples if s.get("exit_policy", "static") != "static"]
    if not adaptive:
        return None
    thresholds: dict[str, dict[str, list]] = {}
    for sample in adaptive:
        per_problem = thresholds.setdefault(_key(sample["exit_threshold"]), {})
        entry = per_problem.setdefault(sample["problem_id"], [[], []])
        entry[0].append(float(sample["correct"]))
        loops = sample.get("exit_loops") or [sample["num_loops"]]
        entry[1].append(sum(loops) / len(loops))
    correct, mean_loops = [], []
    for per_problem in thresholds.values():
        missing = [i for i in problem_ids if i not in per_problem]
        if missing:
            raise ValueError(f"the exit sweep did not score problems {missing[:5]}")
        correct.append([_mean(per_problem[i][0]) for i in problem_ids])
        mean_loops.append([_mean(per_problem[i][1]) for i in problem_ids])
    return {"policy": adaptive[0]["exit_policy"], "num_loops": adaptive[0]["num_loops"],
            "thresholds": [float(key) for key in thresholds], "correct": correct,
            "loops": mean_loops}


def summary(curve: dict) -> list[dict]:
    """Per threshold: accuracy and mean loops."""
    return [{"threshold": threshold, "accuracy": _mean(correct), "mean_loops": _mean(loops)}
            for threshold, correct, loops in zip(curve["thresholds"], curve["correct"],
                                                 curve["loops"])]


def matched_budget(selection: dict, evaluation: dict, budget: float) -> dict:
    """The threshold chosen on ``selection`` within ``budget`` mean loops (the fewest loops if
    none is within it: ``within_budget`` false) and the evaluation curve at that threshold."""
    if selection["thresholds"] != evaluation["thresholds"]:
        raise ValueError(f"the selection and evaluation sweeps used different thresholds: "
                         f"{selection['thresholds']} and {evaluation['thresholds']}")
    points = summary(selection)
    within = [index for index, point in enumerate(points) if point["mean_loops"] <= budget]
    if within:
        index = max(within, key=lambda i: (points[i]["accuracy"], -points[i]["mean_loops"], -i))
    else:
        index = min(range(len(points)), key=lambda i: (points[i]["mean_loops"], i))
    chosen = summary(evaluation)[index]
    return {"threshold": chosen["threshold"], "accuracy": chosen["accuracy"],
            "mean_loops": chosen["mean_loops"], "selection_accuracy": points[index]["accuracy"],
            "selection_mean_loops": points[index]["mean_loops"], "within_budget": bool(within),
            "index": index}


def budget_curve_mean(selection: dict, evaluation: dict, budgets: list[float]) -> float:
    """The matched-budget accuracy averaged over ``budgets``."""
    return _mean([matched_budget(selection, evaluation, budget)["accuracy"]
                  for budget in budgets])


def accuracy_by_level(curve: dict, index: int, problem_ids: list[str],
                      levels: dict[str, int]) -> dict[str, float]:
    """Accuracy per difficulty level at threshold ``index`` of ``curve``."""
    found: dict[int, list[float]] = {}
    for problem, correct in zip(problem_ids, curve["correct"][index]):
        if problem in levels:
            found.setdefault(levels[problem], []).append(correct)
    return {str(level): _mean(values) for level, values in sorted(found.items())}


def _key(threshold) -> str:
    return str(float("inf") if threshold is None else float(threshold))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
