"""Latent-Loop On-Policy Self-Distillation of a LoopLM.

    python recipes/llopsd.py [--config conf/llopsd.yaml] [key=value ...]
    torchrun --nproc-per-node 2 recipes/llopsd.py parallel.tensor_parallel=2
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nemo_loop.algorithms.llopsd import LLOPSDConfig, train  # noqa: E402
from nemo_loop.config import config_from_command_line  # noqa: E402
from nemo_loop.evaluation.answers import verifier_for  # noqa: E402
from nemo_loop.utils.distributed import init_distributed  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    config = config_from_command_line(LLOPSDConfig, "llopsd.yaml", __doc__, argv)
    init_distributed()
    train(config, verifier_for(config.answer_checker))


if __name__ == "__main__":
    main()
