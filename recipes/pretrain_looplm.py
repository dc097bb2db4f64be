"""Pretrain a LoopLM with Ouro's loss.

    python recipes/pretrain_looplm.py [--config conf/pretrain.yaml] [key=value ...]
    torchrun --nproc-per-node 4 recipes/pretrain_looplm.py parallel.tensor_parallel=2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nemo_loop.algorithms.pretrain import PretrainConfig, pretrain  # noqa: E402
from nemo_loop.config import CONF_DIR, load_config  # noqa: E402
from nemo_loop.utils.distributed import init_distributed  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONF_DIR / "pretrain.yaml"))
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    config = load_config(PretrainConfig, args.config, args.overrides)
    init_distributed()
    pretrain(config)


if __name__ == "__main__":
    main()
