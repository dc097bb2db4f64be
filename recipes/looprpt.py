"""LoopRPT: reinforcement pre-training of a LoopLM's loops (EMA teacher, hard tokens, noisy
latent rollouts, per-loop rewards), on the shell game or a tokenized text corpus.

    python recipes/looprpt.py [--config conf/looprpt.yaml] [key=value ...]
    python recipes/looprpt.py --config conf/looprpt_text.yaml      # the MATH text corpus
    torchrun --nproc-per-node 2 recipes/looprpt.py parallel.tensor_parallel=2
"""

from __future__ import annotations

from nemo_loop.algorithms.looprpt import LoopRPTConfig, train
from nemo_loop.config import config_from_command_line
from nemo_loop.utils.distributed import init_distributed


def main(argv: list[str] | None = None) -> None:
    config = config_from_command_line(LoopRPTConfig, "looprpt.yaml", __doc__, argv)
    init_distributed()
    train(config)


if __name__ == "__main__":
    main()
