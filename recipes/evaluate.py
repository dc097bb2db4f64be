"""Evaluate a LoopLM checkpoint on math benchmarks at several loop budgets.

    python recipes/evaluate.py [--config conf/eval.yaml] [key=value ...]
    python recipes/evaluate.py checkpoint=runs/llopsd benchmarks=[math500,aime24] \
        n_samples=8 loop_budgets=[1,2,4]

``checkpoint`` is a run directory, its checkpoints/, one step or a model-only directory; the
model config comes from the checkpoint.

Writes results.json, samples.jsonl, results.md and PNG plots to ``output_dir``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from nemo_loop.config import config_from_command_line
from nemo_loop.evaluation.config import EvalConfig
from nemo_loop.evaluation.harness import evaluate
from nemo_loop.evaluation.report import TABLE_MD
from nemo_loop.utils.distributed import init_distributed


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = config_from_command_line(EvalConfig, "eval.yaml", __doc__, argv)
    init_distributed()
    evaluate(config)
    table = Path(config.output_dir) / TABLE_MD
    if table.is_file():
        print(table.read_text())


if __name__ == "__main__":
    main()
