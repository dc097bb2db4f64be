"""Memory and throughput plan of one training step, per rank, before anything is allocated.

    python recipes/plan.py [--algorithm llopsd] [--config conf/llopsd.yaml] [--world-size N]
                           [--device-memory-gib 80] [--mfu 0.4] [--prompt-tokens N]
                           [--context-tokens 512] [--sequence-tokens N] [key=value ...]

Loads the config exactly as ``recipes/<algorithm>.py`` does (defaults ← YAML ← overrides,
validated at the world size), prints weights, gradients, optimizer shard, teacher copy,
activations, loss buffers, rollout KV cache and the total per rank against the device memory,
plus FLOPs per step and the step time at the assumed MFU. Exits with status 3 and names the
component when the layout does not fit (``slurm/*.sh --dry-run`` runs this before launch).
"""

from __future__ import annotations

import argparse
import sys

from nemo_loop.algorithms.memory_plan import PlanAssumptions, PlanDoesNotFit, plan_training
from nemo_loop.algorithms.registry import algorithm
from nemo_loop.config import CONF_DIR, load_config

BAD_CONFIG, DOES_NOT_FIT = 2, 3


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithm", default="llopsd",
                        help="registry name (llopsd, grpo, rltt, oisd, sft, looprpt, pretrain) "
                             "or recipe name (pretrain_looplm)")
    parser.add_argument("--config", default=None,
                        help="training config YAML (default: conf/<algorithm>.yaml)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks of the job (default: TP × PP, one data-parallel rank)")
    defaults = PlanAssumptions()
    parser.add_argument("--device-memory-gib", type=float, default=defaults.device_memory_gib)
    parser.add_argument("--mfu", type=float, default=defaults.mfu)
    parser.add_argument("--peak-flops-per-s", type=float, default=defaults.peak_flops_per_s)
    parser.add_argument("--prompt-tokens", type=int, default=None)
    parser.add_argument("--context-tokens", type=int, default=defaults.context_tokens)
    parser.add_argument("--sequence-tokens", type=int, default=None)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        entry = algorithm(args.algorithm)
        config_path = args.config or CONF_DIR / f"{entry.name}.yaml"
        # Data paths are not checked: a plan may come before the corpus or prompts exist.
        config = load_config(entry.config_class(), config_path, args.overrides,
                             check_paths=False)
        if args.world_size is not None:
            config.validate(args.world_size, check_paths=False)
        plan = plan_training(entry, config, PlanAssumptions(
            world_size=args.world_size, device_memory_gib=args.device_memory_gib, mfu=args.mfu,
            peak_flops_per_s=args.peak_flops_per_s, prompt_tokens=args.prompt_tokens,
            context_tokens=args.context_tokens, sequence_tokens=args.sequence_tokens))
    except (ValueError, FileNotFoundError) as error:
        print(f"no plan: {error}", file=sys.stderr)
        return BAD_CONFIG
    print(f"config: {config_path} {' '.join(args.overrides)}".rstrip())
    print(plan.render())
    try:
        plan.check_fits()
    except PlanDoesNotFit as error:
        print(f"refused: {error}", file=sys.stderr)
        return DOES_NOT_FIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
