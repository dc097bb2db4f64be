"""GRPO on a LoopLM (one of the baselines LLOPSD is compared with; docs/baselines.md).

    python recipes/grpo.py [--config conf/grpo.yaml] [key=value ...]
    torchrun --nproc-per-node 2 recipes/grpo.py parallel.tensor_parallel=2
"""

from __future__ import annotations

from nemo_loop.algorithms.grpo import GRPOConfig, train
from nemo_loop.config import config_from_command_line
from nemo_loop.utils.distributed import init_distributed


def main(argv: list[str] | None = None) -> None:
    config = config_from_command_line(GRPOConfig, "grpo.yaml", __doc__, argv)
    init_distributed()
    train(config)


if __name__ == "__main__":
    main()
