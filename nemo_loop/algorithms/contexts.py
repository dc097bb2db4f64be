"""Privileged teacher contexts c: what the teacher sees that the student does not.

* ``opsd``  — the ground-truth answer (and the reference solution where the data has one);
* ``sdpo``  — a verifier's feedback on the student's own rollout y: the answer it extracted
  and whether it matches the ground truth;
* ``opsdc`` — an instruction to be concise, with no privileged answer.

The teacher's user turn is the student's (problem + instruction suffix) followed by c, built by
:meth:`nemo_loop.data.chat.ChatTokenizer.user_message`, so the two prompts differ only by c.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from nemo_loop.data.prompts import PromptRecord

CONTEXT_KINDS = ("opsd", "sdpo", "opsdc")
# (response text, ground truth) → (extracted answer or None, is it correct)
Verifier = Callable[[str, str], tuple[str | None, bool]]


@dataclass
class TeacherContextConfig:
    kind: str = "opsd"
    # How the OPSD context states the answer; a synthetic task with its own vocabulary sets its
    # own words here.
    answer_template: str = "(For reference, the correct final answer is {answer}.)"
    include_solution: bool = True
    concise_instruction: str = ("Be concise: reach the final answer with as few steps and "
                                "tokens as possible.")

    def validate(self) -> None:
        if self.kind not in CONTEXT_KINDS:
            raise ValueError(f"teacher.context.kind must be one of {CONTEXT_KINDS}, got "
                             f"{self.kind!r}")
        try:
            self.answer_template.format(answer="0")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"teacher.context.answer_template must be a format string with "
                             f"only {{answer}} in it, got {self.answer_template!r} ({error!r})"
                             ) from None


def privileged_context(record: PromptRecord, verdict: tuple[str | None, bool],
                       config: TeacherContextConfig) -> str:
    """``verdict`` is the verifier's (extracted answer, correct) on the student's rollout."""
    if config.kind == "opsd":
        context = config.answer_template.format(answer=record.answer)
        if config.include_solution and record.solution:
            context += f"\nReference solution:\n{record.solution}"
        return context
    if config.kind == "sdpo":
        extracted, correct = verdict
        if extracted is None:
            return "(Feedback on an earlier attempt: it did not state a final answer.)"
        judgement = "correct" if correct else "incorrect"
        return f"(Feedback on an earlier attempt: its final answer {extracted} is {judgement}.)"
    return f"({config.concise_instruction})"
