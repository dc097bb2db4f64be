"""Ouro's Stage II: train the exit gate of a trained LoopLM, the language model frozen.

    python recipes/train_exit_gate.py trainer.init_from=<run dir or model dir> [key=value ...]
    python recipes/train_exit_gate.py --config conf/exit_gate.yaml \
        trainer.init_from=runs/compression/students/llopsd output_dir=runs/gate_llopsd

Writes checkpoints and the model-only checkpoint ``<output_dir>/model`` (the whole model with
the retrained gate), which ``recipes/evaluate.py checkpoint=<output_dir>`` reads, e.g. with
``generation.exit.policy=q_exit``.
"""

from __future__ import annotations

from nemo_loop.algorithms.exit_gate import ExitGateConfig, train
from nemo_loop.config import config_from_command_line
from nemo_loop.utils.distributed import init_distributed


def main(argv: list[str] | None = None) -> None:
    config = config_from_command_line(ExitGateConfig, "exit_gate.yaml", __doc__, argv)
    init_distributed()
    train(config)


if __name__ == "__main__":
    main()
