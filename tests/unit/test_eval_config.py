"""conf/eval.yaml loads into EvalConfig; overrides and validation."""

import pytest

from nemo_loop.config import CONF_DIR, load_config
from nemo_loop.evaluation.config import EvalConfig


def test_default_eval_config_loads_with_all_loop_budgets():
    config = load_config(EvalConfig, CONF_DIR / "eval.yaml")
    assert config.model.name == "tiny" and config.checkpoint is None
    assert config.budgets() == list(range(1, config.model.num_loops + 1))
    assert [spec.name for spec in config.benchmark_specs()] == ["math500"]


def test_custom_benchmark_and_overrides(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"q": "1+1?", "answer": "#### 2"}\n')
    config = load_config(EvalConfig, CONF_DIR / "eval.yaml", [
        "benchmarks=[aime24,amc23]", "custom.path=x.jsonl", "custom.name=mine",
        f"data_root={tmp_path}", "limit=3",
        "custom.problem_field=q", "custom.answer_format=after_hashes", "loop_budgets=[4,1]",
        "task.math.prompt.instruction_suffix=Show your work."])
    assert [s.name for s in config.benchmark_specs()] == ["aime24", "amc23", "mine"]
    assert config.benchmark_specs()[-1].problem_field == "q"
    assert all(s.limit == 3 for s in config.benchmark_specs())
    assert config.budgets() == [1, 4]


def test_missing_custom_file_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_config(EvalConfig, CONF_DIR / "eval.yaml", [f"custom.path={tmp_path}/missing.jsonl"])


@pytest.mark.parametrize("override,message", [
    ("benchmarks=[nope]", "unknown benchmark"),
    ("loop_budgets=[0,2]", "loop_budgets"),
    ("loop_budgets=[5]", "loop_budgets"),
    ("n_samples=0", "n_samples"),
    ("custom.name=math500", "clashes"),
    ("sampling.top_p=0", "top_p"),
    ("custom.answer_format=weird", None),
    ("task.math.prompt.template=html", "prompt.template"),
])
def test_invalid_configs_are_rejected(override, message):
    overrides = [override]
    if override.startswith("custom.name"):
        overrides.append("custom.path=/tmp/x.jsonl")
    if override.startswith("custom.answer_format"):
        overrides.append("custom.path=/tmp/x.jsonl")
        message = "answer_format"
    with pytest.raises(ValueError, match=message):
        load_config(EvalConfig, CONF_DIR / "eval.yaml", overrides)
