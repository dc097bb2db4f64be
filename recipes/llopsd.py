"""Latent-Loop On-Policy Self-Distillation of a LoopLM.

    python recipes/llopsd.py [--config conf/llopsd.yaml] [key=value ...]
    torchrun --nproc-per-node 2 recipes/llopsd.py parallel.tensor_parallel=2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nemo_loop.algorithms.llopsd import LLOPSDConfig, train  # noqa: E402
from nemo_loop.config import CONF_DIR, load_config  # noqa: E402
from nemo_loop.evaluation.answers import check_response  # noqa: E402
from nemo_loop.utils.distributed import init_distributed  # noqa: E402


def math_verifier(response_text: str, gold: str) -> tuple[str | None, bool]:
    verdict = check_response(response_text, gold)
    return verdict.extracted, verdict.correct


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONF_DIR / "llopsd.yaml"))
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    config = load_config(LLOPSDConfig, args.config, args.overrides)
    init_distributed()
    train(config, math_verifier)


if __name__ == "__main__":
    main()
