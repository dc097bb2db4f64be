"""The adaptive-exit analyses of a study, by hand: curves from samples, the matched-budget
choice (made on the selection split only), the curve mean, per-level accuracy, and the paired
primary comparison from unit records."""

from __future__ import annotations

import math

import pytest

from nemo_loop.experiments.exit_results import (
    accuracy_by_level,
    budget_curve_mean,
    exit_curve,
    matched_budget,
)

IDS = ["a", "b", "c", "d"]


def _curve(accuracy_and_loops: list[tuple[list[float], list[float]]],
           thresholds=(0.2, 0.5, 0.9)) -> dict:
    return {"policy": "confidence", "num_loops": 4, "thresholds": list(thresholds),
            "correct": [c for c, _ in accuracy_and_loops],
            "loops": [loops for _, loops in accuracy_and_loops]}


def test_exit_curve_reads_the_adaptive_samples_only():
    samples = [{"problem_id": i, "exit_policy": "static", "exit_threshold": None,
                "num_loops": 4, "correct": True, "exit_loops": None} for i in IDS]
    for threshold, loops in ((0.5, 2), (float("inf"), 4)):
        samples += [{"problem_id": i, "exit_policy": "confidence", "exit_threshold": threshold,
                     "num_loops": 4, "correct": i != "b", "exit_loops": [loops, 1]}
                    for i in IDS]
    curve = exit_curve(samples, IDS)
    assert curve["thresholds"] == [0.5, math.inf] and curve["num_loops"] == 4
    assert curve["correct"][0] == [1.0, 0.0, 1.0, 1.0]
    assert curve["loops"] == [[1.5] * 4, [2.5] * 4]  # per problem: its tokens' mean loop
    assert exit_curve(samples[:4], IDS) is None
    with pytest.raises(ValueError, match="did not score problems"):
        exit_curve(samples, IDS + ["e"])


def test_the_threshold_is_chosen_on_selection_within_the_budget():
    selection = _curve([([1, 0, 0, 0], [1, 1, 1, 1]),      # 0.25 at 1.0 loops
                        ([1, 1, 1, 0], [1, 2, 2, 3]),      # 0.75 at 2.0
                        ([1, 1, 1, 1], [2, 3, 3, 4])])     # 1.00 at 3.0
    evaluation = _curve([([0, 0, 0, 0], [1, 1, 1, 1]),
                         ([1, 1, 0, 0], [2, 2, 2, 2]),
                         ([1, 1, 1, 1], [4, 4, 4, 4])])
    chosen = matched_budget(selection, evaluation, budget=2.5)
    # the most accurate on selection within 2.5 loops is the middle threshold; the evaluation
    # split is read there, even though its third threshold would score higher
    assert chosen["threshold"] == 0.5 and chosen["accuracy"] == 0.5
    assert chosen["mean_loops"] == 2.0 and chosen["within_budget"]
    assert matched_budget(selection, evaluation, 3.0)["accuracy"] == 1.0
    below = matched_budget(selection, evaluation, 0.5)  # nothing within: the fewest loops
    assert below["index"] == 0 and not below["within_budget"]
    assert budget_curve_mean(selection, evaluation, [1.0, 2.0, 3.0]) == pytest.approx(0.5)
    # equal accuracy within the budget: the cheaper threshold
    tie = _curve([([1, 1, 0, 0], [2, 2, 2, 2]), ([1, 1, 0, 0], [1, 1, 1, 1]),
                  ([1, 1, 1, 1], [4, 4, 4, 4])])
    assert matched_budget(tie, tie, 2.5)["index"] == 1
    with pytest.raises(ValueError, match="different thresholds"):
        matched_budget(selection, _curve([([0] * 4, [1] * 4)] * 3, (1, 2, 3)), 2.0)


def test_accuracy_by_level():
    curve = _curve([([1, 0, 1, 1], [1] * 4)] * 3)
    assert accuracy_by_level(curve, 0, IDS, {"a": 4, "b": 4, "c": 8, "d": 8}) == {
        "4": 0.5, "8": 1.0}


def _record(selection_scores, evaluation_scores, seed: int) -> dict:
    """A unit record whose exit curves reach the given accuracies at 1, 2 and 3 mean loops."""
    def curve(scores):
        return _curve([([1.0] * round(4 * s) + [0.0] * (4 - round(4 * s)), [loops] * 4)
                       for s, loops in zip(scores, (1, 2, 3))])
    return {"seed": seed, "problem_ids": IDS, "levels": {i: 4 for i in IDS},
            "exit": curve(evaluation_scores), "selection": {"exit": curve(selection_scores)}}


def test_the_primary_analysis_pairs_cells_with_their_baselines():
    from nemo_loop.experiments.preregistration import PrimaryMetric
    from nemo_loop.experiments.study_primary import analyse, markdown

    primary = PrimaryMetric(description="x", exit_policy="confidence", thresholds=[0.2, 0.5, 0.9],
                            budget_loops=2.0, curve_budgets=[1.0, 2.0, 3.0])
    # the cell beats the baseline by 0.25 at 2 loops on every seed; its validation peak at 3
    # loops is outside the budget and not used
    cell = [_record([0.25, 0.75, 1.0], [0.25, 0.75, 1.0], s) for s in (1, 2, 3)]
    base = [_record([0.25, 0.5, 1.0], [0.25, 0.5, 0.75], s) for s in (1, 2, 3)]
    reference = [_record([0.0, 0.25, 1.0], [0.0, 0.25, 1.0], s) for s in (1, 2, 3)]
    analysis = analyse(primary, {"llopsd": cell, "terminal_only": base, "broken": None},
                       {"pretrained": reference},
                       {"llopsd": "terminal_only", "terminal_only": "terminal_only"},
                       {"llopsd": (3,), "terminal_only": (3,)})
    entry = analysis["cells"]["llopsd"]
    assert entry["accuracy"]["mean"] == pytest.approx(0.75)
    assert entry["versus"]["accuracy"]["difference"]["mean"] == pytest.approx(0.25)
    assert entry["versus"]["accuracy"]["verdict"] == "wins"
    # curve mean over budgets 1, 2, 3: (0.25 + 0.75 + 1.0)/3 vs (0.25 + 0.5 + 0.75)/3
    assert entry["versus"]["curve_mean"]["difference"]["mean"] == pytest.approx(0.5 / 3)
    assert "versus" not in analysis["cells"]["terminal_only"] and "broken" not in \
        analysis["cells"]
    pretrained = analysis["references"]["pretrained"]["versus"]["terminal_only"]
    assert pretrained["accuracy"]["difference"]["mean"] == pytest.approx(-0.25)
    assert analysis["cells"]["llopsd"]["by_level"]["4"]["mean"] == pytest.approx(0.75)
    assert entry["versus"]["by_level"]["4"]["difference"]["mean"] == pytest.approx(0.25)
    # contrasts pair every two cells of a group, in both directions
    assert analysis["contrasts"]["terminal_only"]["llopsd"]["difference"]["mean"] == \
        pytest.approx(-0.25)
    assert analysis["contrasts"]["llopsd"]["terminal_only"]["verdict"] == "wins"
    text = "\n".join(markdown(analysis, {"llopsd": 3, "terminal_only": 3}))
    assert "| llopsd | 3 | 0.750 ± 0.000 | 2.000 ± 0.000 | 0.250 ± 0.000 | wins |" in text
    assert "*pretrained* vs terminal_only" in text
    assert "* llopsd − **terminal_only: 0.250 ± 0.000**" in text
    assert "0.750 ± 0.000 (Δ 0.250 ± 0.000)" in text
    assert analyse(PrimaryMetric(), {}, {}, {}, {}) is None


def test_a_tuning_study_chooses_the_threshold_on_its_own_validation_curve():
    """A study that evaluates the validation split has no separate selection curve: only then
    is the threshold chosen on the evaluated curve itself."""
    from nemo_loop.experiments.preregistration import PrimaryMetric
    from nemo_loop.experiments.study_primary import per_seed

    primary = PrimaryMetric(description="x", exit_policy="confidence", thresholds=[0.2, 0.5, 0.9],
                            budget_loops=2.0)
    record = _record([0.0, 0.0, 0.0], [0.25, 0.75, 1.0], 1)
    del record["selection"]
    assert per_seed(record, primary) is None
    chosen = per_seed(record, primary, select_on_evaluation=True)
    assert chosen["accuracy"] == pytest.approx(0.75) and chosen["mean_loops"] == 2.0
