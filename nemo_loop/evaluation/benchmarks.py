"""The benchmark registry: names → prompt sets under the data root, read by
:func:`nemo_loop.data.prompts.load_prompt_set`.

A benchmark is a :class:`~nemo_loop.data.prompts.PromptSetConfig` with a name, so a user's own
file (``custom`` in the eval config) is described the same way as the registered ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from nemo_loop.data.prompts import PromptSetConfig


@dataclass
class BenchmarkSpec(PromptSetConfig):
    path: str = ""  # empty: no custom benchmark
    name: str = "custom"


BENCHMARKS: dict[str, BenchmarkSpec] = {spec.name: spec for spec in (
    BenchmarkSpec(name="math500", path="math500/test.jsonl", id_field="unique_id"),
    BenchmarkSpec(name="aime24", path="aime24/test.jsonl", id_field="id"),
    BenchmarkSpec(name="amc23", path="amc23/test.jsonl", id_field="id"),
    BenchmarkSpec(name="gsm8k", path="gsm8k/test.jsonl", problem_field="question",
                  answer_format="after_hashes"),
    BenchmarkSpec(name="math_test_full", path="math_test_full/test.jsonl",
                  answer_field="solution", answer_format="last_boxed", id_field="idx"),
)}


def get_spec(name: str) -> BenchmarkSpec:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)} (or give a "
                         f"custom file with custom.path=...)")
    return BENCHMARKS[name]
