"""SDPO's own teacher context: a correct sibling (never the rollout itself), feedback only when
no sibling succeeded, masked with neither; and the kinds each task supports."""

import pytest

from nemo_loop.algorithms.rollouts import Rollout, RolloutBatch
from nemo_loop.algorithms.teacher_context import (
    SDPOChoice,
    TeacherContextConfig,
    sdpo_choices,
    teacher_contexts,
)
from nemo_loop.config import CONF_DIR, load_config
from nemo_loop.data.prompts import PromptRecord
from nemo_loop.tasks import TaskConfig, build_task


def _sibling(index):
    return SDPOChoice(sibling=index, feedback=False)


FEEDBACK, MASKED = SDPOChoice(None, True), SDPOChoice(None, False)


def test_sdpo_choices_on_hand_built_groups():
    groups = [0, 0, 0, 1, 1, 2, 2, 3, 3, 3]
    correct = [True, False, False, False, False, True, False, True, True, False]
    # group 0: the only success has no successful sibling; its failed siblings see it.
    # group 1: nobody succeeded. group 2: as group 0 with two rollouts. group 3: two successes
    # see each other, the failure sees the first.
    without_feedback = sdpo_choices(groups, correct, [False] * len(groups))
    assert without_feedback == [MASKED, _sibling(0), _sibling(0), MASKED, MASKED, MASKED,
                                _sibling(5), _sibling(8), _sibling(7), _sibling(7)]
    with_feedback = sdpo_choices(groups, correct, [True] * len(groups))
    assert with_feedback == [FEEDBACK, _sibling(0), _sibling(0), FEEDBACK, FEEDBACK, FEEDBACK,
                             _sibling(5), _sibling(8), _sibling(7), _sibling(7)]
    assert all(choice.sibling != index for index, choice in enumerate(with_feedback))
    # feedback only where a rollout has some: rollout 3 has, rollout 4 has not
    mixed = sdpo_choices(groups[3:5], correct[3:5], [True, False])
    assert mixed == [FEEDBACK, MASKED] and mixed[1].masked and not mixed[0].masked
    # siblings come from the same group only, whatever the order of the batch
    assert sdpo_choices([1, 0, 1], [False, True, False], [False] * 3) == [MASKED] * 3
    with pytest.raises(ValueError, match="one entry per rollout"):
        sdpo_choices([0, 0], [True], [False, False])


def _batch(task, answer, texts, group_size):
    records = [PromptRecord(f"problem {g}", answer, None, str(g))
               for g in range(len(texts) // group_size)]
    rollouts = [Rollout(index // group_size, index % group_size, records[index // group_size],
                        [1], [5], [0.0], text, task.check(text, answer))
                for index, text in enumerate(texts)]
    return RolloutBatch(rollouts, group_size)


def test_math_sdpo_shows_a_correct_sibling_and_else_feedback():
    task = build_task(TaskConfig())
    texts = ["so \\boxed{7}", "\\boxed{8}", "\\boxed{9}",  # group 0: one success
             "\\boxed{1}", "no answer here", "\\boxed{2}"]  # group 1: none
    batch = _batch(task, "7", texts, 3)
    contexts = teacher_contexts(batch, task, TeacherContextConfig(kind="sdpo"))
    # the success has no correct sibling: feedback on its own answer, which it got right
    assert "7 is correct" in contexts[0] and "boxed" not in contexts[0]
    for index in (1, 2):  # the failures see the successful sibling's text, not their own
        assert "so \\boxed{7}" in contexts[index] and texts[index] not in contexts[index]
        assert "incorrect" not in contexts[index]  # no feedback next to a sibling
    assert "1 is incorrect" in contexts[3] and "did not state a final answer" in contexts[4]
    assert contexts[5].endswith("its final answer 2 is incorrect.)")
    masked = teacher_contexts(batch, task, TeacherContextConfig(kind="sdpo", feedback=False))
    assert masked[:3] == [None, contexts[1], contexts[2]] and masked[3:] == [None] * 3


def test_shell_game_sdpo_hints_a_correct_siblings_answer_and_masks_the_rest():
    task = build_task(TaskConfig(name="shell_game"))
    batch = _batch(task, "2", ["2", "0", "1", "2", "1 0", "0"], 2)
    contexts = teacher_contexts(batch, task, TeacherContextConfig(kind="sdpo"))
    # group 0: [2 ✓, 0 ✗]; group 1: [1 ✗, 2 ✓]; group 2: [1 ✗, 0 ✗]
    assert contexts == [None, "hint 2", "hint 2", None, None, None]


def test_sdpo_verdict_keeps_the_verdict_on_the_rollout_itself():
    task = build_task(TaskConfig())
    batch = _batch(task, "7", ["\\boxed{7}", "\\boxed{8}"], 2)
    contexts = teacher_contexts(batch, task, TeacherContextConfig(kind="sdpo_verdict"))
    assert "7 is correct" in contexts[0] and "8 is incorrect" in contexts[1]


@pytest.mark.parametrize("task_config", [TaskConfig(), TaskConfig(name="shell_game")])
def test_context_none_gives_the_teacher_the_students_own_prompt(task_config):
    task = build_task(task_config)
    batch = _batch(task, "2", ["2", "0"], 1)
    contexts = teacher_contexts(batch, task, TeacherContextConfig(kind="none"))
    assert contexts == ["", ""]  # not None: no rollout is masked out
    if task_config.name == "shell_game":  # the math tokenizer needs the data root
        tokenizer, problem = task.tokenizer(), "ball 1 | 0-1 ="
        assert tokenizer.encode_prompt(problem, "") == tokenizer.encode_prompt(problem)
        assert tokenizer.encode_prompt(problem, "hint 2") != tokenizer.encode_prompt(problem)


@pytest.mark.parametrize("overrides, message", [
    (["teacher.context.kind=sdpo"], r"needs rollout.samples_per_prompt \(G\) >= 2, got 1"),
    (["task.name=shell_game", "model=tiny", "teacher.context.kind=sdpo_verdict",
      "rollout.samples_per_prompt=2"], "no wording for teacher context 'sdpo_verdict'"),
    (["task.name=shell_game", "model=tiny", "teacher.context.kind=opsdc"],
     "no wording for teacher context 'opsdc'"),
    (["task.math.sibling_template={solution}"], "sibling_template"),
])
def test_bad_teacher_contexts_are_named_at_load_time(overrides, message):
    from nemo_loop.algorithms.llopsd import LLOPSDConfig

    with pytest.raises(ValueError, match=message):
        load_config(LLOPSDConfig, CONF_DIR / "llopsd.yaml", overrides)


def test_sdpo_loads_with_groups_on_both_tasks():
    from nemo_loop.algorithms.llopsd import LLOPSDConfig

    for task in ([], ["task.name=shell_game", "model=tiny"]):
        config = load_config(LLOPSDConfig, CONF_DIR / "llopsd.yaml", [
            *task, "teacher.context.kind=sdpo", "rollout.samples_per_prompt=2"])
        assert config.teacher.context.kind == "sdpo"
        config = load_config(LLOPSDConfig, CONF_DIR / "llopsd.yaml",
                             [*task, "teacher.context.kind=none"])
        assert config.teacher.context.kind == "none"


def test_llopsd_step_masks_rollouts_without_a_context(megatron_single_process, tmp_path,
                                                      monkeypatch):
    """Wiring: a rollout whose context is None contributes nothing — with every rollout masked
    the loss is 0 and no weight moves; the masked share is logged."""
    import torch
    from megatron.core.utils import unwrap_model

    from nemo_loop.algorithms import llopsd
    from nemo_loop.data.prompts import write_prompt_set
    from nemo_loop.models.looplm.state_dict import gather_full_state_dict

    games = write_prompt_set(tmp_path / "games.jsonl", build_task(
        TaskConfig(name="shell_game")).heldout_problems("train", 8))
    config = load_config(llopsd.LLOPSDConfig, CONF_DIR / "ablations" / "context_sdpo.yaml", [
        "model=tiny", "task.name=shell_game", f"data.path={games}", "data.id_field=id",
        f"output_dir={tmp_path / 'run'}", "trainer.prompts_per_step=2",
        "trainer.micro_batch_size=2", "rollout.max_new_tokens=2"])
    state = llopsd.setup(config)
    before = gather_full_state_dict(unwrap_model(state.ddp_model))
    monkeypatch.setattr(llopsd, "teacher_contexts",
                        lambda batch, task, context: [None] * len(batch))
    metrics = llopsd.llopsd_step(state)
    assert metrics["loss"] == 0.0 and metrics["teacher_context_masked"] == 1.0
    after = gather_full_state_dict(unwrap_model(state.ddp_model))
    assert all(torch.equal(before[name], after[name]) for name in before)
