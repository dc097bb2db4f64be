"""Supervised fine-tuning of a LoopLM at the student's loop budget R̃ (the SFT baseline).

    python recipes/sft.py [--config conf/sft.yaml] [key=value ...]
    torchrun --nproc-per-node 2 recipes/sft.py parallel.tensor_parallel=2
"""

from __future__ import annotations

from nemo_loop.algorithms.sft import SFTConfig, train
from nemo_loop.config import config_from_command_line
from nemo_loop.utils.distributed import init_distributed


def main(argv: list[str] | None = None) -> None:
    config = config_from_command_line(SFTConfig, "sft.yaml", __doc__, argv)
    init_distributed()
    train(config)


if __name__ == "__main__":
    main()
