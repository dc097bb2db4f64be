"""Prompt sets with ground-truth answers from local JSONL / JSON files.

Field names differ between sets (``problem`` vs ``question``; numeric vs string answers; GSM8K's
answer after ``####``), so a :class:`PromptSetConfig` names the fields instead of per-file code.
A malformed record is an error naming the file and line; nothing is skipped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

ANSWER_FORMATS = ("field", "after_hashes")
REPO_ROOT = Path(__file__).resolve().parents[2]


def default_data_root() -> Path:
    """``$NEMO_LOOP_DATA`` or ``../shared/data`` beside the repository."""
    return Path(os.environ.get("NEMO_LOOP_DATA", REPO_ROOT.parent / "shared" / "data"))


@dataclass
class PromptSetConfig:
    path: str = "math_train_answers/deepscaler_math_train.json"
    problem_field: str = "problem"
    answer_field: str = "answer"
    solution_field: str | None = None
    answer_format: str = "field"  # field | after_hashes
    limit: int | None = None

    def resolved_path(self) -> Path:
        path = Path(self.path)
        return path if path.is_absolute() else default_data_root() / path

    def validate(self) -> None:
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"data.answer_format must be one of {ANSWER_FORMATS}, got "
                             f"{self.answer_format!r}")
        if not self.resolved_path().is_file():
            raise FileNotFoundError(f"prompt set not found: {self.resolved_path()} (relative "
                                    f"paths are under {default_data_root()}; set NEMO_LOOP_DATA "
                                    f"or give an absolute path)")
        if self.limit is not None and self.limit < 1:
            raise ValueError("data.limit must be >= 1 or null")


@dataclass(frozen=True)
class PromptRecord:
    problem: str
    answer: str
    solution: str | None = None


def _raw_records(path: Path):
    """(line number, dict) pairs; a JSON array counts records from 1."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON array of records")
        yield from enumerate(data, start=1)
        return
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            raise ValueError(f"{path}:{line_number}: empty line in a JSONL file")
        try:
            yield line_number, json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{line_number}: not valid JSON ({error})") from None


def _answer(value, answer_format: str, where: str) -> str:
    if answer_format == "after_hashes":
        text = str(value)
        if "####" not in text:
            raise ValueError(f"{where}: answer has no '#### <final answer>' line")
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def load_prompt_set(config: PromptSetConfig) -> list[PromptRecord]:
    config.validate()
    path = config.resolved_path()
    records = []
    for line_number, raw in _raw_records(path):
        where = f"{path}:{line_number}"
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: record is not a JSON object")
        for name in (config.problem_field, config.answer_field, config.solution_field):
            if name is not None and name not in raw:
                raise ValueError(f"{where}: missing field {name!r} (fields: {sorted(raw)})")
        problem = raw[config.problem_field]
        if not isinstance(problem, str) or not problem.strip():
            raise ValueError(f"{where}: field {config.problem_field!r} must be a non-empty string")
        solution = raw[config.solution_field] if config.solution_field else None
        records.append(PromptRecord(problem, _answer(raw[config.answer_field],
                                                     config.answer_format, where), solution))
        if config.limit is not None and len(records) >= config.limit:
            break
    if not records:
        raise ValueError(f"{path}: no records")
    return records


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
