"""The embedded experiment: pretrain a tiny LoopLM on the shell game with R = 4 loops, compress
it to R̃ = 2 with LLOPSD and with the terminal-only baseline, evaluate all three at loops 1..4.

    python recipes/compression_experiment.py [--config conf/compression.yaml] [key=value ...]
    python recipes/compression_experiment.py output_dir=runs/try2 pretrain.trainer.max_steps=800

Everything lands in ``output_dir``: config, checkpoints, metrics, ``report.md`` and the plot.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from nemo_loop.config import config_from_command_line
from nemo_loop.experiments import report
from nemo_loop.experiments.compression import (
    CompressionExperimentConfig,
    run_experiment,
)
from nemo_loop.utils.distributed import init_distributed


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = config_from_command_line(CompressionExperimentConfig, "compression.yaml", __doc__,
                                      argv)
    init_distributed()
    summary = run_experiment(config)
    if torch.distributed.get_rank() != 0:
        return summary
    print("\n" + report.accuracy_table(summary) + "\n\n" + report.verdict(summary))
    print(f"\nTotal {summary['phase_seconds']['total'] / 60:.1f} min. Report: "
          f"{Path(config.output_dir) / report.REPORT_MD}")
    return summary


if __name__ == "__main__":
    main()
