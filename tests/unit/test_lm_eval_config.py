"""The lm-eval adapter's model args and the sweep recipe's config: parsing, validation, and bad
input rejected before any model is built (checkpoint, loop budget, unknown or online-only task);
lm_eval itself is imported only by the adapter."""

import subprocess
import sys
from pathlib import Path

import pytest

from nemo_loop.config import CONF_DIR, load_config
from nemo_loop.evaluation.lm_eval_config import (
    LMEvalConfig,
    LMEvalModelArgs,
)
from nemo_loop.models.looplm.config import LoopModelConfig, write_model_config

ROOT = Path(__file__).resolve().parents[2]


def test_model_args_take_lm_eval_key_values_with_dotted_keys():
    # As lm-eval's simple_parse_args_string hands them over (numbers already converted).
    args = LMEvalModelArgs.from_kwargs({
        "checkpoint": "runs/x", "num_loops": 2, "task.name": "shell_game",
        "task.shell_game.num_swaps": 5, "batch_size": 4, "generation.backend": "native"})
    assert (args.checkpoint, args.num_loops, args.batch_size) == ("runs/x", 2, 4)
    assert args.task.name == "shell_game" and args.task.shell_game.num_swaps == 5


@pytest.mark.parametrize("kwargs,message", [
    ({}, "checkpoint is required"),
    ({"checkpoint": "x", "loops": 2}, "loops"),
    ({"checkpoint": "x", "num_loops": 0}, "num_loops"),
    ({"checkpoint": "x", "batch_size": "auto"}, "auto"),
    ({"checkpoint": "x", "device": "cuda:0"}, "device"),
    ({"checkpoint": "x", "task.name": "poetry"}, "task.name"),
    ({"checkpoint": "x", "generation.backend": "trt"}, "generation.backend"),
])
def test_bad_model_args_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LMEvalModelArgs.from_kwargs(kwargs)


def test_exit_policy_args_reach_generation_exit():
    kwargs = {"checkpoint": "x", "generation.exit.policy": "q_exit",
              "generation.exit.threshold": 0.9}
    assert LMEvalModelArgs.from_kwargs(kwargs).generation.exit.policy == "q_exit"


def _sweep_config(*overrides):
    return load_config(LMEvalConfig, CONF_DIR / "lm_eval.yaml",
                       ["model_args.checkpoint=somewhere", "tasks=[arc_easy]", *overrides])


def test_sweep_config_loads_and_lists_its_points():
    config = _sweep_config("loop_budgets=[4,1]")
    assert config.sweep_points(max_loops=4) == [(1, None), (4, None)]
    assert _sweep_config().sweep_points(max_loops=3) == [(1, None), (2, None), (3, None)]


@pytest.mark.parametrize("overrides,message", [
    (["tasks=[]"], "tasks is empty"),
    (["tasks=[a,a]"], "twice"),
    (["model_args.num_loops=2"], "loop_budgets"),
    (["loop_budgets=[0]"], "loop_budgets"),
    (["loop_budgets=[2,2]"], "loop_budgets"),
    (["limit=0"], "limit"),
    (["shell_game_tasks.problems=8"], "task.name=shell_game"),
    (["model_args.task.name=shell_game", "shell_game_tasks.problems=8",
      "shell_game_tasks.split=dev"], "shell_game_tasks.split"),
    (["model_args.task.name=shell_game", "shell_game_tasks.problems=100000"], "distinct"),
])
def test_bad_sweep_config_is_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        _sweep_config(*overrides)


def test_exit_threshold_sweeps_are_checked():
    config = _sweep_config("model_args.generation.exit.policy=confidence",
                           "exit_thresholds=[0.3,.inf]", "loop_budgets=[4]")
    assert config.sweep_points(max_loops=4) == [(4, 0.3), (4, float("inf"))]
    for overrides, message in [
            (["exit_thresholds=[0.5]"], "policy is 'static'"),
            (["model_args.generation.exit.policy=confidence",
              "model_args.generation.exit.threshold=0.5", "exit_thresholds=[0.4]"], "not both"),
            (["model_args.generation.exit.policy=q_exit", "exit_thresholds=[2.0]"], "q_exit")]:
        with pytest.raises(ValueError, match=message):
            _sweep_config(*overrides)


# ----- bad input before any model is built -----

def _checkpoint_dir(path: Path, num_loops: int | None) -> Path:
    """The files resolve_checkpoint reads: a model-only directory (+ its model config)."""
    path.mkdir()
    (path / "metadata.json").write_text("{}")
    if num_loops is not None:
        write_model_config(LoopModelConfig(vocab_size=64, num_loops=num_loops),
                           path / "model_config.yaml")
    return path


def _online_task(directory: Path) -> Path:
    directory.mkdir()
    (directory / "needs_the_hub.yaml").write_text(
        "task: needs_the_hub\ndataset_path: nemo-loop-tests/not-on-this-machine\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\n"
        "doc_to_target: 0\ndoc_to_choice: ['a', 'b']\n")
    return directory


@pytest.fixture
def no_model_building(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the bad input was found")

    monkeypatch.setattr("nemo_loop.evaluation.lm_eval_sweep.build_model", refuse)


def test_sweep_rejects_bad_input_before_building_a_model(tmp_path, no_model_building):
    from nemo_loop.evaluation.lm_eval_sweep import run_sweep

    tasks = _online_task(tmp_path / "tasks")
    good = _checkpoint_dir(tmp_path / "good", num_loops=3)
    bare = _checkpoint_dir(tmp_path / "bare", num_loops=None)
    cases = [
        ([f"model_args.checkpoint={bare}"], "records no model config"),
        ([f"model_args.checkpoint={good}", "loop_budgets=[1,4]"],
         r"loop budget\(s\) \[4\] outside 1..R = 1..3"),
        ([f"model_args.checkpoint={good}", "model_args.task.name=shell_game",
          "tasks=[needs_the_hub]", f"include_paths=[{tasks}]"],
         "lm-eval task 'needs_the_hub' needs data that is not on this machine"),
    ]
    for overrides, message in cases:
        config = load_config(LMEvalConfig, CONF_DIR / "lm_eval.yaml",
                             ["tasks=[shell_game_mc]", *overrides,
                              f"output_dir={tmp_path / 'out'}"])
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            run_sweep(config)


def test_exit_policy_misuse_is_rejected_before_building_a_model(tmp_path, no_model_building):
    from nemo_loop.evaluation.lm_eval_sweep import run_sweep
    from nemo_loop.evaluation.lm_eval_tasks import write_shell_game_tasks
    from nemo_loop.tasks.shell_game import ShellGameConfig

    tasks = write_shell_game_tasks(tmp_path / "tasks", ShellGameConfig(), "test", 8)
    checkpoint = _checkpoint_dir(tmp_path / "good", num_loops=4)
    exit_policy = ["model_args.generation.exit.policy=confidence", "exit_thresholds=[0.3]"]
    for overrides, message in [
            (["tasks=[shell_game_gen,shell_game_mc]"],
             r"applies to generation tasks only; \['shell_game_mc'\]"),
            (["tasks=[shell_game_gen]", "model_args.generation.exit.min_loops=2",
              "loop_budgets=[1,4]"], "min_loops=2 exceeds the loop budget"),
    ]:
        config = load_config(LMEvalConfig, CONF_DIR / "lm_eval.yaml", [
            f"model_args.checkpoint={checkpoint}", "model_args.task.name=shell_game",
            f"include_paths=[{tasks}]", *exit_policy, *overrides,
            f"output_dir={tmp_path / 'out'}"])
        with pytest.raises(ValueError, match=message):
            run_sweep(config)


def test_unknown_task_is_named(tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from nemo_loop.evaluation.lm_eval_tasks import check_known

    tasks = _online_task(tmp_path / "tasks")
    # The sweep indexes lm-eval's own tasks too; that index takes tens of seconds to build, and
    # the check is the same on either index.
    manager = TaskManager(include_path=[str(tasks)], include_defaults=False)
    check_known(["needs_the_hub"], manager, [str(tasks)])
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) \['no_such_task'\]"):
        check_known(["needs_the_hub", "no_such_task"], manager, [str(tasks)])


def test_only_the_adapter_imports_lm_eval():
    """Recipes and evaluation modules that do not evaluate with lm-eval never import it."""
    modules = sorted(p.stem for p in (ROOT / "nemo_loop" / "evaluation").glob("*.py")
                     if p.stem not in ("__init__", "lm_eval_adapter"))
    recipes = sorted(str(p) for p in (ROOT / "recipes").glob("*.py"))
    code = "\n".join([
        "import importlib, importlib.util, sys",
        "import nemo_loop.evaluation",
        *[f"importlib.import_module('nemo_loop.evaluation.{m}')" for m in modules],
        f"for path in {recipes!r}:",
        "    name = 'recipe_' + path.rsplit('/', 1)[1].removesuffix('.py')",
        "    spec = importlib.util.spec_from_file_location(name, path)",
        "    sys.modules[name] = importlib.util.module_from_spec(spec)",
        "    spec.loader.exec_module(sys.modules[name])",
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'lm_eval'))"])
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"
    assert "lm_eval_sweep" in " ".join(recipes) and "lm_eval_sweep" in modules
