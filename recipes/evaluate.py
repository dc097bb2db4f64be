"""Evaluate a LoopLM checkpoint on math benchmarks at several loop budgets.

    python recipes/evaluate.py [--config conf/eval.yaml] [key=value ...]
    python recipes/evaluate.py checkpoint=runs/pretrain/checkpoints benchmarks=[math500,aime24] \
        n_samples=8 loop_budgets=[1,2,4]

Writes results.json, samples.jsonl, results.md and PNG plots to ``output_dir``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nemo_loop.config import config_from_command_line  # noqa: E402
from nemo_loop.evaluation.config import EvalConfig  # noqa: E402
from nemo_loop.evaluation.harness import evaluate  # noqa: E402
from nemo_loop.evaluation.report import TABLE_MD  # noqa: E402
from nemo_loop.utils.distributed import init_distributed  # noqa: E402


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
