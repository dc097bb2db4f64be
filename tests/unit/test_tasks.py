"""The task layer: one config field switches task; each task words its teacher contexts."""

import pytest
import torch

from nemo_loop.config import CONF_DIR, load_config
from nemo_loop.data.prompts import PromptRecord
from nemo_loop.tasks import TaskConfig, build_task
from nemo_loop.tasks.answers import Verdict

RECORD = PromptRecord(problem="What is 3+4?", answer="7", solution="3+4=7, so \\boxed{7}.")
NO_VERDICT = Verdict(False, None)


def test_math_opsd_reveals_the_answer_and_the_solution_when_asked():
    task = build_task(TaskConfig())
    with_solution = task.teacher_context("opsd", RECORD, NO_VERDICT)
    assert "7" in with_solution and "3+4=7" in with_solution
    bare = task.teacher_context("opsd", RECORD, NO_VERDICT, include_solution=False)
    assert "7" in bare and "3+4=7" not in bare


def test_math_sdpo_verdict_reports_the_verdict_without_the_answer():
    task = build_task(TaskConfig())
    wrong = task.teacher_context("sdpo_verdict", RECORD, Verdict(False, "8"))
    right = task.teacher_context("sdpo_verdict", RECORD, Verdict(True, "7"))
    missing = task.teacher_context("sdpo_verdict", RECORD, NO_VERDICT)
    assert "8" in wrong and "incorrect" in wrong and "7" not in wrong
    assert "7" in right and " correct" in right and "incorrect" not in right
    assert "did not state a final answer" in missing


def test_math_opsdc_gives_no_answer():
    text = build_task(TaskConfig()).teacher_context("opsdc", RECORD, Verdict(True, "7"))
    assert "7" not in text and "concise" in text.lower()


def test_answer_template_words_the_math_opsd_context():
    config = TaskConfig()
    config.math.answer_template = "hint {answer}"
    config.validate()
    assert build_task(config).teacher_context("opsd", RECORD, NO_VERDICT, False) == "hint 7"
    for bad in ("hint {solution}", "hint {", "hint {0}"):
        config.math.answer_template = bad
        with pytest.raises(ValueError, match="answer_template"):
            config.validate()


def test_math_checks_equivalence_and_the_shell_game_the_first_word():
    math, game = build_task(TaskConfig()), build_task(TaskConfig(name="shell_game"))
    assert math.check("so the answer is \\boxed{\\frac{1}{2}}", "0.5").correct
    assert not math.check("\\boxed{3}", "0.5").correct
    assert game.check("2 and more", "2") == Verdict(True, "2")
    assert not game.check("\\boxed{2}", "2").correct


def test_shell_game_words_only_the_answer_hint():
    game = build_task(TaskConfig(name="shell_game"))
    assert game.teacher_context("opsd", RECORD, NO_VERDICT) == "hint 7"
    for kind in ("sdpo_verdict", "opsdc"):
        with pytest.raises(ValueError, match=f"no wording for teacher context '{kind}'"):
            game.teacher_context(kind, RECORD, NO_VERDICT)


def test_synthetic_task_draws_training_examples_and_math_refuses():
    game = build_task(TaskConfig(name="shell_game"))
    examples = game.training_examples(64, torch.Generator().manual_seed(0))
    assert len(examples) == 64 and all(e.problem.startswith("ball ") for e in examples)
    assert any(e.context == f"hint {e.answer}" for e in examples)
    assert any(e.context is None for e in examples)
    with pytest.raises(ValueError, match="no synthetic training sequences"):
        build_task(TaskConfig()).training_examples(1, torch.Generator())


@pytest.mark.parametrize("overrides,message", [
    (["task.name=poetry"], "task.name must be one of"),
    (["task.shell_game.num_swaps=4"], "task.shell_game is set but task.name is 'math'"),
    (["task.name=shell_game", "teacher.context.kind=sdpo_verdict"],
     "no wording for teacher context"),
    (["task.math.verify_timeout_s=0"], "verify_timeout_s"),
    (["teacher.context.kind=hint"], "context.kind"),
])
def test_llopsd_task_settings_are_checked_at_load_time(overrides, message):
    from nemo_loop.algorithms.llopsd import LLOPSDConfig

    with pytest.raises(ValueError, match=message):
        load_config(LLOPSDConfig, CONF_DIR / "llopsd.yaml", overrides)


def test_switching_the_llopsd_task_is_one_field():
    from nemo_loop.algorithms.llopsd import LLOPSDConfig

    config = load_config(LLOPSDConfig, CONF_DIR / "llopsd.yaml",
                         ["task.name=shell_game", "model=tiny"])
    tokenizer = build_task(config.task).tokenizer()
    assert tokenizer.decode(tokenizer.encode_prompt("ball 1 | 0-1 =")) == "ball 1 | 0-1 ="
