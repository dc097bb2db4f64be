"""Convert Hugging Face Ouro checkpoints to and from nemo-loop (megatron dist_checkpointing).

    python recipes/convert_ouro.py import --hf-dir ./Ouro-1.4B --out ckpt/ouro_1p4b \
        [parallel.tensor_parallel=2 parallel.pipeline_parallel=2 params_dtype=float32]
    python recipes/convert_ouro.py export --ckpt ckpt/ouro_1p4b --out ./Ouro-1.4B-R3 \
        --num-loops 3 [parallel.tensor_parallel=2 ...]

Run under ``torchrun --nproc-per-node N`` for N = TP × PP (× DP) ranks; one process is a world
of one. The checkpoint loads at any TP/PP, so import and export layouts need not match.
See docs/ouro_conversion.md.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field

from nemo_loop.utils.distributed import ParallelConfig
from nemo_loop.config import load_config


@dataclass
class ConvertOptions:
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # Import only: parameter dtype of the megatron model (default: config.json's torch_dtype).
    params_dtype: str | None = None

    def validate(self) -> None:
        if self.parallel.sequence_parallel:
            raise ValueError("sequence_parallel has no effect on conversion; leave it false")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    to_megatron = commands.add_parser("import", help="HF Ouro directory → dist checkpoint")
    to_megatron.add_argument("--hf-dir", required=True)
    to_megatron.add_argument("--out", required=True)
    to_hf = commands.add_parser("export", help="dist checkpoint → HF Ouro directory")
    to_hf.add_argument("--ckpt", required=True)
    to_hf.add_argument("--out", required=True)
    to_hf.add_argument("--num-loops", type=int, default=None,
                       help="total_ut_steps R̃ of the exported model (default: the model's R)")
    to_hf.add_argument("--model-config", default=None,
                       help="model YAML (default: the one stored with the checkpoint; it "
                            "must describe the same model)")
    for command in (to_megatron, to_hf):
        command.add_argument("overrides", nargs="*", help="key=value, e.g. "
                             "parallel.tensor_parallel=2")
    args = parser.parse_args(argv)
    options = load_config(ConvertOptions, None, args.overrides)

    from nemo_loop.conversion import ouro
    from nemo_loop.utils.distributed import destroy_model_parallel, init_distributed

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    init_distributed()
    layout = options.parallel
    if args.command == "import":
        config = ouro.import_ouro(args.hf_dir, args.out, layout, options.params_dtype)
        message = f"imported {args.hf_dir} → {args.out} ({config.num_layers} layers × " \
                  f"{config.num_loops} loops, {layout})"
    else:
        hf_config = ouro.export_ouro(args.ckpt, args.out, args.num_loops, layout,
                                        args.model_config)
        message = f"exported {args.ckpt} → {args.out} (total_ut_steps=" \
                  f"{hf_config['total_ut_steps']})"
    destroy_model_parallel()
    import torch

    if torch.distributed.get_rank() == 0:
        print(message, flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
