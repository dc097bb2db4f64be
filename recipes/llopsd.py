"""Latent-Loop On-Policy Self-Distillation of a LoopLM.

    python recipes/llopsd.py [--config conf/llopsd.yaml] [key=value ...]
    torchrun --nproc-per-node 2 recipes/llopsd.py parallel.tensor_parallel=2
"""

from __future__ import annotations

from nemo_loop.algorithms.llopsd import LLOPSDConfig, train
from nemo_loop.config import config_from_command_line
from nemo_loop.utils.distributed import init_distributed


def main(argv: list[str] | None = None) -> None:
    config = config_from_command_line(LLOPSDConfig, "llopsd.yaml", __doc__, argv)
    init_distributed()
    train(config)


if __name__ == "__main__":
    main()
