"""The evaluation harness's adaptive-exit sweep on a tiny shell-game model (random weights):
per-threshold metrics consistent with the samples, per-difficulty accuracy, the report."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_loop.config import CONF_DIR, load_config
from nemo_loop.evaluation.config import EvalConfig

MIXED = "[2,3,4,5,6,7]"


def _config(tmp_path, *overrides):
    return load_config(EvalConfig, CONF_DIR / "eval.yaml", [
        "task.name=shell_game", f"task.shell_game.heldout_swaps={MIXED}", "benchmarks=[]",
        f"custom.path={tmp_path}/mixed.jsonl", "custom.id_field=id", "custom.name=mixed",
        "n_samples=1", "pass_at_k=[1]", "sampling.temperature=0", "sampling.max_new_tokens=3",
        "model=tiny", *overrides])


@pytest.fixture(scope="module")
def sweep(megatron_single_process, tmp_path_factory):
    from nemo_loop.data.prompts import write_prompt_set
    from nemo_loop.evaluation.harness import run_evaluation
    from nemo_loop.models.looplm.model import build_loop_model
    from nemo_loop.tasks import build_task

    from nemo_loop.tasks import TaskConfig
    from nemo_loop.tasks.shell_game import ShellGameConfig

    tmp_path = tmp_path_factory.mktemp("sweep")
    task = build_task(TaskConfig(name="shell_game", shell_game=ShellGameConfig(
        heldout_swaps=[2, 3, 4, 5, 6, 7])))
    write_prompt_set(tmp_path / "mixed.jsonl", task.stratified_problems("test", 4))
    config = _config(tmp_path, "generation.exit.policy=q_exit", "exit_thresholds=[0.6,1.0]",
                     "generation.exit.kv_fill=propagate")
    torch.manual_seed(0)
    model = build_loop_model(config.model.transformer_config()).eval()
    summary, records = run_evaluation(config, model, task.tokenizer())
    return config, summary["mixed"], records


def test_sweep_metrics_follow_the_samples(sweep):
    config, bench, records = sweep
    exit = bench["exit"]
    assert (exit["policy"], exit["kv_fill"], exit["num_loops"]) == ("q_exit", "propagate", 4)
    assert list(exit["thresholds"]) == ["0.6", "1.0"]
    for threshold, metrics in exit["thresholds"].items():
        mine = [r for r in records if r.exit_threshold == float(threshold)]
        assert len(mine) == metrics["num_problems"] == 4 + 4 * 5 + 4  # k=2..8, 4 each
        loops = [loop for r in mine for loop in r.exit_loops]
        assert metrics["mean_loops_per_token"] == pytest.approx(sum(loops) / len(loops))
        assert sum(metrics["exit_loop_histogram"]) == pytest.approx(1.0)
        assert metrics["avg@n"] == pytest.approx(sum(r.correct for r in mine) / len(mine))
        levels = metrics["accuracy_by_difficulty"]
        assert sorted(map(int, levels)) == [2, 3, 4, 5, 6, 7, 8]
        assert all(level["problems"] == 4 for level in levels.values())
    exact = exit["thresholds"]["1.0"]  # q = 1: every token at R̃, the static run itself
    assert exact["agreement_with_static"] == 1.0 and exact["mean_loops_per_token"] == 4.0
    assert exact["flops_ratio"] == pytest.approx(1.0)
    early = exit["thresholds"]["0.6"]
    assert early["mean_loops_per_token"] < 4 and early["flops_ratio"] < 1.0
    static = bench["budgets"]["4"]
    assert static["flops_per_problem"] == pytest.approx(exit["static_flops_per_problem"])
    assert sorted(map(int, static["accuracy_by_difficulty"])) == [2, 3, 4, 5, 6, 7, 8]


def test_report_has_the_sweep_and_the_difficulty_table(sweep, tmp_path):
    from nemo_loop.evaluation import report

    config, bench, _ = sweep
    results = {"benchmarks": {"mixed": bench}, "config": {"n_samples": 1, "sampling": {
        "temperature": 0, "top_p": 1, "max_new_tokens": 3}}, "model": {"num_loops": 4},
        "checkpoint": {"random_init": True}}
    table = report.markdown_table(results)
    assert "adaptive exit (q_exit, kv_fill propagate, min_loops 1, R̃ = 4)" in table
    assert "| level | problems | R̃=1 | R̃=2 | R̃=3 | R̃=4 | q_exit 0.6 | q_exit 1.0 |" in table
    paths = report.plot_all(tmp_path, results)
    assert (tmp_path / "accuracy_vs_mean_loops_mixed.png") in paths
    from nemo_loop.evaluation.exit_sweep import exit_curve

    curve = exit_curve(results, "mixed")
    assert [point["threshold"] for point in curve] == [0.6, 1.0]


@pytest.mark.parametrize("overrides,match", [
    (["exit_thresholds=[0.5]"], "exit_thresholds is set but generation.exit.policy"),
    (["generation.exit.policy=q_exit", "generation.exit.threshold=0.5",
      "exit_thresholds=[0.9]"], "either generation.exit.threshold"),
    (["generation.exit.policy=q_exit", "exit_thresholds=[0.5,1.5]"], r"q_exit must be in"),
    (["generation.exit.policy=confidence"], "needs a numeric threshold"),
    (["generation.exit.policy=q_exit", "generation.exit.threshold=0.5",
      "generation.exit.min_loops=3", "loop_budgets=[1,2]"], "exceeds the loop budget"),
    (["generation.exit.policy=q_exit", "generation.exit.threshold=0.5",
      "generation.exit.kv_fill=copy", "generation.backend=vllm"], "kv_fill=copy is not"),
])
def test_bad_exit_settings_fail_at_load_time(tmp_path, overrides, match):
    (tmp_path / "mixed.jsonl").write_text('{"id": "0", "problem": "ball 0 | 0-1 =", '
                                          '"answer": "1"}\n')
    with pytest.raises(ValueError, match=match):
        _config(tmp_path, *overrides)


def test_flops_of_adaptive_generation():
    from nemo_loop.models.looplm.config import LoopModelConfig
    from nemo_loop.utils.flops import LoopShape, adaptive_generation_flops, generation_flops

    shape = LoopShape.of(LoopModelConfig())
    static = adaptive_generation_flops(shape, 10, 4, [4] * 6, [1] * 6)
    assert static == generation_flops(shape, 10, 6, 4)
    fewer = adaptive_generation_flops(shape, 10, 4, [4, 2, 2, 2, 2, 2], [1] * 6)
    assert fewer < static
    propagated = adaptive_generation_flops(shape, 10, 4, [4, 2, 2, 2, 2, 2], [1] * 6,
                                           [False] + [True] * 5)
    key_value = 2 * shape.hidden * 2 * shape.query_groups * shape.head_dim
    assert propagated - fewer == 5 * shape.layers * key_value
    assert math.isclose(adaptive_generation_flops(shape, 10, 4, [4] * 6, [4] * 6) - static,
                        6 * 3 * shape.head_flops())
