"""Pretrain a LoopLM with Ouro's loss.

    python recipes/pretrain_looplm.py [--config conf/pretrain.yaml] [key=value ...]
    torchrun --nproc-per-node 4 recipes/pretrain_looplm.py parallel.tensor_parallel=2
"""

from __future__ import annotations

from nemo_loop.algorithms.pretrain import PretrainConfig, pretrain
from nemo_loop.config import config_from_command_line
from nemo_loop.utils.distributed import init_distributed


def main(argv: list[str] | None = None) -> None:
    config = config_from_command_line(PretrainConfig, "pretrain.yaml", __doc__, argv)
    init_distributed()
    pretrain(config)


if __name__ == "__main__":
    main()
