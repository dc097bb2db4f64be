import pytest

from nemo_loop.algorithms.contexts import TeacherContextConfig, privileged_context
from nemo_loop.data.prompts import PromptRecord

RECORD = PromptRecord(problem="What is 3+4?", answer="7", solution="3+4=7, so \\boxed{7}.")


def test_opsd_reveals_the_answer_and_the_solution_when_asked():
    with_solution = privileged_context(RECORD, (None, False), TeacherContextConfig(kind="opsd"))
    assert "7" in with_solution and "3+4=7" in with_solution
    bare = privileged_context(RECORD, (None, False),
                              TeacherContextConfig(kind="opsd", include_solution=False))
    assert "7" in bare and "3+4=7" not in bare


def test_sdpo_reports_the_verdict_without_the_answer():
    config = TeacherContextConfig(kind="sdpo")
    wrong = privileged_context(RECORD, ("8", False), config)
    right = privileged_context(RECORD, ("7", True), config)
    missing = privileged_context(RECORD, (None, False), config)
    assert "8" in wrong and "incorrect" in wrong and "7" not in wrong
    assert "7" in right and " correct" in right and "incorrect" not in right
    assert "did not state a final answer" in missing


def test_opsdc_gives_no_answer():
    text = privileged_context(RECORD, ("7", True), TeacherContextConfig(kind="opsdc"))
    assert "7" not in text and "concise" in text.lower()


def test_unknown_context_kind_is_rejected():
    with pytest.raises(ValueError, match="context.kind"):
        TeacherContextConfig(kind="hint").validate()


def test_answer_template_words_the_opsd_context():
    config = TeacherContextConfig(kind="opsd", answer_template="hint {answer}",
                                  include_solution=False)
    config.validate()
    assert privileged_context(RECORD, (None, False), config) == "hint 7"
    for bad in ("hint {solution}", "hint {", "hint {0}"):
        with pytest.raises(ValueError, match="answer_template"):
            TeacherContextConfig(answer_template=bad).validate()
