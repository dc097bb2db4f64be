"""Prompt sets with reference answers from local JSONL / JSON files (training and evaluation).

Field names differ between sets (``problem`` vs ``question``; numeric vs string answers; GSM8K's
answer after ``####``; the full MATH test set's answer boxed inside ``solution``), so a
:class:`PromptSetConfig` names the fields and how the answer sits in its field instead of
per-file code:

* ``plain``: the field *is* the answer (MATH ``answer``; AMC's ``27.0`` becomes ``27``);
* ``last_boxed``: the answer is the last ``\\boxed{}`` of the field (full MATH test ``solution``);
* ``after_hashes``: the answer follows the last ``####`` (GSM8K ``answer``).

Relative paths are under the data root: ``data_root`` where the caller has one, else
``$NEMO_LOOP_DATA``, else ``../shared/data`` beside the repository. A malformed record is an
error naming the file and line; nothing is skipped but blank lines.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from nemo_loop.data.answer_formats import after_hash_marks, gold_to_text, last_boxed

ANSWER_FORMATS = ("plain", "last_boxed", "after_hashes")
REPO_ROOT = Path(__file__).resolve().parents[2]


def default_data_root() -> Path:
    """``$NEMO_LOOP_DATA`` or ``../shared/data`` beside the repository."""
    return Path(os.environ.get("NEMO_LOOP_DATA") or REPO_ROOT.parent / "shared" / "data")


def data_path(path: str | os.PathLike, data_root: str | os.PathLike | None = None) -> Path:
    """``path`` itself when absolute, else under ``data_root`` (default: the data root)."""
    path = Path(path)
    return path if path.is_absolute() else Path(data_root or default_data_root()) / path


class PromptSetError(ValueError):
    """A file that cannot be read as its config says; the message names file and line."""


@dataclass
class PromptSetConfig:
    path: str = "math_train_answers/deepscaler_math_train.json"
    problem_field: str = "problem"
    answer_field: str = "answer"
    solution_field: str | None = None
    answer_format: str = "plain"  # plain | last_boxed | after_hashes
    id_field: str | None = None  # None: the record's index in the loaded set
    limit: int | None = None  # the first N records (None: all)

    def resolved_path(self, data_root: str | os.PathLike | None = None) -> Path:
        return data_path(self.path, data_root)

    def validate(self, data_root: str | os.PathLike | None = None,
                 check_path: bool = True) -> None:
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got "
                             f"{self.answer_format!r}")
        if not self.problem_field or not self.answer_field:
            raise ValueError("problem_field and answer_field are required")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or null, got {self.limit}")
        path = self.resolved_path(data_root)
        if check_path and not path.is_file():
            raise FileNotFoundError(f"prompt set not found: {path} (relative paths are under "
                                    f"{Path(data_root or default_data_root())}; set data_root "
                                    f"or NEMO_LOOP_DATA, or give an absolute path)")


@dataclass
class BenchmarkSpec(PromptSetConfig):
    """A named prompt set: a task's registered benchmark, or a user's own file (``custom``)."""

    path: str = ""  # empty: no custom benchmark
    name: str = "custom"


@dataclass(frozen=True)
class PromptRecord:
    problem: str
    answer: str  # reference answer as LaTeX text
    solution: str | None = None
    id: str = ""


def load_prompt_set(config: PromptSetConfig,
                    data_root: str | os.PathLike | None = None) -> list[PromptRecord]:
    """The first ``config.limit`` records (all when None) of the file, in file order."""
    config.validate(data_root)
    path = config.resolved_path(data_root)
    records = []
    for line_number, raw in read_records(path):
        records.append(_record(config, raw, f"{path}:{line_number}", len(records)))
        if config.limit is not None and len(records) >= config.limit:
            break
    if not records:
        raise PromptSetError(f"{path}: no records")
    return records


def read_records(path: Path):
    """(line number, dict) pairs of a JSONL file, or of a ``.json`` file holding one array
    (numbered from record 1); a malformed line or a record that is not an object is a
    :class:`PromptSetError` naming the file and line."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise PromptSetError(f"{path}:{error.lineno}: malformed JSON: {error.msg}") from None
        if not isinstance(data, list):
            raise PromptSetError(f"{path}: expected a JSON array of records")
        numbered = enumerate(data, start=1)
    else:
        numbered = _jsonl_records(path, text)
    for number, raw in numbered:
        if not isinstance(raw, dict):
            raise PromptSetError(f"{path}:{number}: record is a {type(raw).__name__}, not a "
                                 f"JSON object")
        yield number, raw


def _jsonl_records(path: Path, text: str):
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield line_number, json.loads(line)
        except json.JSONDecodeError as error:
            raise PromptSetError(f"{path}:{line_number}: malformed JSON: {error.msg}") from None


def _record(config: PromptSetConfig, raw: dict, where: str, index: int) -> PromptRecord:
    for name in (config.problem_field, config.answer_field, config.solution_field,
                 config.id_field):
        if name is not None and name not in raw:
            raise PromptSetError(f"{where}: missing field {name!r} (fields: {sorted(raw)})")
    # Numbers and other scalars are valid problem text once written out; null or blank is not.
    problem = raw[config.problem_field]
    problem = "" if problem is None else str(problem)
    if not problem.strip():
        raise PromptSetError(f"{where}: field {config.problem_field!r} is empty")
    answer = _answer(raw[config.answer_field], config.answer_format)
    # None: the format found nothing. A blank plain answer is kept (two MATH-train records have
    # one) rather than failing the whole set.
    if answer is None:
        raise PromptSetError(f"{where}: field {config.answer_field!r} holds no answer in "
                             f"{config.answer_format!r} format")
    solution = raw[config.solution_field] if config.solution_field else None
    identity = raw[config.id_field] if config.id_field else index
    return PromptRecord(problem, answer, solution, str(identity))


def _answer(value, answer_format: str) -> str | None:
    if answer_format == "plain":
        return gold_to_text(value)
    if answer_format == "last_boxed":
        return last_boxed(str(value))
    return after_hash_marks(str(value))


def write_prompt_set(path: str | os.PathLike, records: list[PromptRecord]) -> Path:
    """JSONL with ``id``/``problem``/``answer`` fields, readable by :func:`load_prompt_set`
    with ``id_field: id``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": r.id, "problem": r.problem, "answer": r.answer})
                            + "\n" for r in records))
    return path


class PromptSampler:
    """Seeded shuffles, epoch after epoch; its state is the data position for resuming."""

    def __init__(self, num_records: int, seed: int):
        self.num_records, self.seed = num_records, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_records, generator=generator).tolist()

    def next_indices(self, count: int) -> list[int]:
        indices = []
        while len(indices) < count:
            if self.cursor == self.num_records:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._shuffle()
            indices.append(self._order[self.cursor])
            self.cursor += 1
        return indices

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
                "num_records": self.num_records}

    def load_state_dict(self, state: dict) -> None:
        if state["num_records"] != self.num_records or state["seed"] != self.seed:
            raise ValueError(f"data position was saved for {state['num_records']} records with "
                             f"seed {state['seed']}, this run has {self.num_records} and "
                             f"{self.seed}")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._shuffle()
