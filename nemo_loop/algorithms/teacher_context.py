"""What the teacher sees besides the prompt, rollout by rollout; the task words it.

Kinds (``teacher.context.kind``, see :data:`nemo_loop.tasks.base.CONTEXT_KINDS`): ``opsd``,
``sdpo_verdict`` and ``opsdc`` depend on the rollout alone. ``sdpo`` is SDPO's own context and
looks at the rollout's group (the G rollouts of the same prompt), as the reference SDPO code
(lasgroup/SDPO, a verl fork) reprompts its teacher:

* a *sibling* — another rollout of the same prompt that the verifier marked correct, never the
  rollout itself (SDPO's ``dont_reprompt_on_self_success``); the first such sibling in group
  order, as SDPO takes the first of its successful candidates;
* only when no sibling succeeded, the verifier's feedback on the rollout itself (SDPO's
  ``environment_feedback_only_without_solution``), if ``teacher.context.feedback`` is on and
  the task has words for feedback;
* with neither, the rollout is masked out of the loss (SDPO's ``self_distillation_mask``); its
  teacher row reads the plain prompt and contributes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nemo_loop.algorithms.rollouts import RolloutBatch
from nemo_loop.tasks import CONTEXT_KINDS, GROUP_CONTEXT_KINDS, Attempt, Task


@dataclass
class TeacherContextConfig:
    # What the teacher sees besides the prompt (nemo_loop.tasks.base.CONTEXT_KINDS); the task
    # words it.
    kind: str = "opsd"  # opsd | sdpo | sdpo_verdict | opsdc | none (the student's own prompt)
    include_solution: bool = True  # opsd: add the reference solution where the data has one
    # sdpo: the verifier's feedback on the rollout when none of its siblings succeeded (SDPO's
    # include_environment_feedback); off, such rollouts are masked out.
    feedback: bool = True

    def validate(self, task: Task, samples_per_prompt: int) -> None:
        if self.kind not in CONTEXT_KINDS:
            raise ValueError(f"teacher.context.kind must be one of {CONTEXT_KINDS}, got "
                             f"{self.kind!r}")
        task.check_context_kind(self.kind)
        if self.kind in GROUP_CONTEXT_KINDS and samples_per_prompt < 2:
            raise ValueError(
                f"teacher.context.kind={self.kind} shows the teacher a correct sibling rollout "
                f"of the same prompt, so it needs rollout.samples_per_prompt (G) >= 2, got "
                f"{samples_per_prompt}; use kind sdpo_verdict for the verdict on the rollout "
                f"itself")


@dataclass(frozen=True)
class SDPOChoice:
    """What SDPO's teacher sees for one rollout."""

    sibling: int | None  # index (in the batch) of the correct sibling shown to the teacher
    feedback: bool  # no sibling succeeded: the verifier's feedback on the rollout itself

    @property
    def masked(self) -> bool:
        return self.sibling is None and not self.feedback


def sdpo_choices(groups: Sequence[int], correct: Sequence[bool],
                 has_feedback: Sequence[bool]) -> list[SDPOChoice]:
    """For every rollout i (``groups[i]``: its prompt group): the first *other* rollout of its
    group with ``correct``; when there is none, feedback if ``has_feedback[i]``; else neither."""
    if not len(groups) == len(correct) == len(has_feedback):
        raise ValueError(f"groups, correct and has_feedback must have one entry per rollout, "
                         f"got {len(groups)}, {len(correct)}, {len(has_feedback)}")
    choices = []
    for index, group in enumerate(groups):
        sibling = next((other for other, (other_group, ok) in enumerate(zip(groups, correct))
                        if other != index and other_group == group and ok), None)
        choices.append(SDPOChoice(sibling, sibling is None and bool(has_feedback[index])))
    return choices


def teacher_contexts(batch: RolloutBatch, task: Task, config: TeacherContextConfig
                     ) -> list[str | None]:
    """The teacher's context of every rollout of ``batch``, worded by ``task``; None: the
    rollout is masked out (``sdpo`` with neither a correct sibling nor feedback)."""
    rollouts = batch.rollouts
    if config.kind not in GROUP_CONTEXT_KINDS:
        return [task.teacher_context(config.kind, r.record, r.verdict, config.include_solution)
                for r in rollouts]
    feedback = [task.teacher_context(config.kind, r.record, r.verdict) if config.feedback
                else None for r in rollouts]
    choices = sdpo_choices([r.group for r in rollouts], [r.verdict.correct for r in rollouts],
                           [text is not None for text in feedback])
    contexts = []
    for rollout, choice, own_feedback in zip(rollouts, choices, feedback):
        if choice.sibling is not None:
            sibling = rollouts[choice.sibling]
            contexts.append(task.teacher_context(config.kind, rollout.record, rollout.verdict,
                                                 sibling=Attempt(sibling.text, sibling.verdict)))
        else:
            contexts.append(own_feedback if choice.feedback else None)
    return contexts


def context_metrics(contexts: list[str | None], kind: str) -> dict:
    """Share of rollouts masked out for want of a context (``sdpo`` only), on this rank."""
    if kind not in GROUP_CONTEXT_KINDS:
        return {}
    return {"teacher_context_masked": sum(c is None for c in contexts) / max(len(contexts), 1)}
