"""Write a synthetic task's held-out problems as a prompt-set JSONL (for recipes/evaluate.py).

    python recipes/write_heldout_set.py output=runs/sets/test_mixed.jsonl split=test \
        count_per_length=64 'task.shell_game.heldout_swaps=[2,3,4,5,6,7]'
    python recipes/write_heldout_set.py output=runs/sets/test.jsonl split=test count=512

``count_per_length``: a mixed-difficulty set stratified by game length (every length of
``task.shell_game.heldout_swaps`` and the full length; ids ``k<k>-<i>``); ``count``: full-length
games only (the sets the compression experiment writes). Evaluate it with
``custom.path=<output> custom.id_field=id benchmarks=[] task.name=shell_game ...`` and the same
``task`` settings the model was trained with (they decide which games are held out).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from nemo_loop.config import load_config
from nemo_loop.data.prompts import write_prompt_set
from nemo_loop.tasks import TaskConfig, build_task


@dataclass
class HeldoutSetConfig:
    task: TaskConfig = field(default_factory=lambda: TaskConfig(name="shell_game"))
    split: str = "test"  # test | validation
    count: int = 0  # full-length games
    count_per_length: int = 0  # or: a mixed-difficulty set, this many games per length
    output: str = ""

    def validate(self) -> None:
        self.task.validate()
        if self.split not in ("test", "validation"):
            raise ValueError(f"split must be test or validation, got {self.split!r}")
        if (self.count > 0) == (self.count_per_length > 0) or min(self.count,
                                                                   self.count_per_length) < 0:
            raise ValueError("set exactly one of count (full-length games) and "
                             "count_per_length (a mixed-difficulty set), > 0")
        if not self.output:
            raise ValueError("output (the JSONL file to write) is required")
        if self.count:
            build_task(self.task).check_count(self.split, self.count)


def main(argv: list[str] | None = None) -> None:
    config = load_config(HeldoutSetConfig, None, sys.argv[1:] if argv is None else argv)
    task = build_task(config.task)
    records = task.stratified_problems(config.split, config.count_per_length) \
        if config.count_per_length else task.heldout_problems(config.split, config.count)
    path = write_prompt_set(config.output, records)
    levels: dict[int, int] = {}
    for record in records:
        level = task.difficulty(record.problem)
        levels[level] = levels.get(level, 0) + 1
    print(f"{len(records)} {config.split} problems → {path}"
          + (f" (per level: {dict(sorted(levels.items()))})" if None not in levels else ""))


if __name__ == "__main__":
    main()
