"""Benchmarks read from local JSONL/JSON files, described by configuration rather than code.

A ``BenchmarkSpec`` names the file (relative to the data root, or absolute), the field holding
the problem, the field holding the reference, and how the reference answer sits in that field:

* ``plain``: the field *is* the answer (MATH500 ``answer``, AIME ``answer``, AMC ``27.0``);
* ``boxed``: the answer is the last ``\\boxed{}`` of the field (full MATH test ``solution``);
* ``after_hashes``: the answer follows ``####`` (GSM8K ``answer``).

The data root is ``data_root`` from the config, else ``$NEMO_LOOP_DATA``, else ``../shared/data``
next to the repository.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from nemo_loop.evaluation.answers import after_hash_marks, gold_to_text, last_boxed

ANSWER_FORMATS = ("plain", "boxed", "after_hashes")
REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_ROOT_ENV = "NEMO_LOOP_DATA"


@dataclass
class BenchmarkSpec:
    """Where a benchmark's records live and which fields hold the problem and its answer."""

    name: str = "custom"
    path: str = ""
    problem_field: str = "problem"
    answer_field: str = "answer"
    answer_format: str = "plain"
    id_field: str | None = None  # record index when None

    def validate(self) -> None:
        if not self.path:
            raise ValueError(f"benchmark {self.name!r}: path is empty")
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"benchmark {self.name!r}: unknown answer_format "
                             f"{self.answer_format!r}; choose one of {ANSWER_FORMATS}")
        if not self.problem_field or not self.answer_field:
            raise ValueError(f"benchmark {self.name!r}: problem_field and answer_field are "
                             f"required")


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "math500": BenchmarkSpec("math500", "math500/test.jsonl", "problem", "answer", "plain",
                             id_field="unique_id"),
    "aime24": BenchmarkSpec("aime24", "aime24/test.jsonl", "problem", "answer", "plain",
                            id_field="id"),
    "amc23": BenchmarkSpec("amc23", "amc23/test.jsonl", "problem", "answer", "plain",
                           id_field="id"),
    "gsm8k": BenchmarkSpec("gsm8k", "gsm8k/test.jsonl", "question", "answer", "after_hashes"),
    "math_test_full": BenchmarkSpec("math_test_full", "math_test_full/test.jsonl", "problem",
                                    "solution", "boxed", id_field="idx"),
}


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str  # reference answer as LaTeX text


class BenchmarkDataError(ValueError):
    """A data file that cannot be read as the spec says; the message names file and line."""


def default_data_root() -> Path:
    configured = os.environ.get(DATA_ROOT_ENV)
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"


def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    return Path(data_root) if data_root else default_data_root()


def get_spec(name: str) -> BenchmarkSpec:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)} (or give a "
                         f"custom file with custom.path=...)")
    return BENCHMARKS[name]


def load_benchmark(spec: BenchmarkSpec, data_root: str | os.PathLike | None = None,
                   limit: int | None = None) -> list[Problem]:
    """The first ``limit`` problems (all when None) of ``spec``'s file, in file order."""
    spec.validate()
    path = Path(spec.path)
    if not path.is_absolute():
        path = resolve_data_root(data_root) / path
    if not path.is_file():
        raise FileNotFoundError(f"benchmark {spec.name!r}: data file {path} does not exist "
                                f"(data root: set data_root or ${DATA_ROOT_ENV})")
    problems = []
    for line_number, record in _records(path):
        if limit is not None and len(problems) >= limit:
            break
        problems.append(_problem(spec, record, path, line_number, len(problems)))
    return problems


def _records(path: Path):
    """(line number, record) pairs; a ``.json`` file holds one array (line = element index+1)."""
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise BenchmarkDataError(f"{path}:{error.lineno}: malformed JSON: {error.msg}") \
                from None
        if not isinstance(data, list):
            raise BenchmarkDataError(f"{path}: a .json benchmark must hold an array of records")
        yield from _checked_records(path, enumerate(data, start=1), unit="record")
        return
    with path.open(encoding="utf-8") as handle:
        def parsed_lines():
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield line_number, json.loads(line)
                except json.JSONDecodeError as error:
                    raise BenchmarkDataError(f"{path}:{line_number}: malformed JSON record: "
                                             f"{error.msg}") from None

        yield from _checked_records(path, parsed_lines(), unit="line")


def _checked_records(path: Path, numbered_records, unit: str):
    for number, record in numbered_records:
        if not isinstance(record, dict):
            raise BenchmarkDataError(f"{path}:{number}: {unit} {number} is a "
                                     f"{type(record).__name__}, not a JSON object")
        yield number, record


def _problem(spec: BenchmarkSpec, record: dict, path: Path, line_number: int,
             index: int) -> Problem:
    problem = _field(record, spec.problem_field, path, line_number)
    raw_answer = _field(record, spec.answer_field, path, line_number)
    answer = _answer_from(spec.answer_format, raw_answer)
    if answer is None:
        raise BenchmarkDataError(f"{path}:{line_number}: field {spec.answer_field!r} holds no "
                                 f"answer in {spec.answer_format!r} format")
    identity = record.get(spec.id_field, index) if spec.id_field else index
    return Problem(id=str(identity), problem=str(problem), answer=answer)


def _field(record: dict, name: str, path: Path, line_number: int):
    if name not in record:
        raise BenchmarkDataError(f"{path}:{line_number}: missing field {name!r} (record has "
                                 f"{sorted(record)})")
    return record[name]


def _answer_from(answer_format: str, raw) -> str | None:
    if answer_format == "plain":
        return gold_to_text(raw)
    if answer_format == "boxed":
        return last_boxed(str(raw))
    return after_hash_marks(str(raw))
