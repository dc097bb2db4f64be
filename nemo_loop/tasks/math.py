"""Competition math: ChatML prompts with the Ouro tokenizer, boxed answers, math-verify.

The benchmarks are the held-out sets under the data root (``../shared/data``); training prompt
sets (MATH-train, GSM8K train) are read with the same :class:`~nemo_loop.data.prompts.PromptSetConfig`.
"""

from __future__ import annotations

from nemo_loop.data.chat import ChatTokenizer
from nemo_loop.data.prompts import BenchmarkSpec, PromptRecord
from nemo_loop.tasks.answers import Verdict, check_response
from nemo_loop.tasks.base import NO_CONTEXT, Attempt, Task

BENCHMARKS: dict[str, BenchmarkSpec] = {spec.name: spec for spec in (
    BenchmarkSpec(name="math500", path="math500/test.jsonl", id_field="unique_id"),
    BenchmarkSpec(name="aime24", path="aime24/test.jsonl", id_field="id"),
    BenchmarkSpec(name="amc23", path="amc23/test.jsonl", id_field="id"),
    BenchmarkSpec(name="gsm8k", path="gsm8k/test.jsonl", problem_field="question",
                  answer_format="after_hashes"),
    BenchmarkSpec(name="math_test_full", path="math_test_full/test.jsonl",
                  answer_field="solution", answer_format="last_boxed", id_field="idx"),
)}


class MathTask(Task):
    name = "math"
    benchmarks = BENCHMARKS

    def tokenizer(self, data_root=None) -> ChatTokenizer:
        return ChatTokenizer.from_file(self.config.prompt, data_root)

    def check(self, response: str, reference: str) -> Verdict:
        return check_response(response, reference, self.config.verify_timeout_s)

    def teacher_context(self, kind: str, record: PromptRecord, verdict: Verdict,
                        include_solution: bool = True, sibling: Attempt | None = None) -> str:
        self.check_context_kind(kind)
        if kind == "none":
            return NO_CONTEXT
        wording = self.config  # MathTaskConfig
        if kind == "opsd":
            context = wording.answer_template.format(answer=record.answer)
            if include_solution and record.solution:
                context += f"\nReference solution:\n{record.solution}"
            return context
        if kind == "sdpo" and sibling is not None:
            return wording.sibling_template.format(attempt=sibling.text.strip())
        # sdpo without a successful sibling: the verifier's feedback, worded as sdpo_verdict
        if kind in ("sdpo", "sdpo_verdict"):
            if verdict.extracted is None:
                return "(Feedback on an earlier attempt: it did not state a final answer.)"
            judgement = "correct" if verdict.correct else "incorrect"
            return (f"(Feedback on an earlier attempt: its final answer {verdict.extracted} is "
                    f"{judgement}.)")
        return f"({wording.concise_instruction})"
