"""Standard benchmarks through EleutherAI's lm-evaluation-harness at several loop budgets.

    python recipes/lm_eval_sweep.py [--config conf/lm_eval.yaml] [key=value ...]
    python recipes/lm_eval_sweep.py model_args.checkpoint=runs/llopsd tasks=[arc_easy,hellaswag] \
        loop_budgets=[1,2,4] limit=200
    torchrun --nproc-per-node 2 recipes/lm_eval_sweep.py model_args.tensor_parallel=2 ...

``model_args`` are the ``nemo_loop`` lm-eval model's arguments (checkpoint, tokenizer and chat
template via ``task``, batch size, generation engine); ``tasks`` are lm-eval task names, found
among lm-eval's own tasks and the YAML tasks under ``include_paths``. Everything runs offline:
a task whose data is neither local nor in the Hugging Face cache is an error naming it.

Writes results.json, samples.jsonl, results.md and accuracy_vs_loops.png to ``output_dir``.
(Not named lm_eval.py: a script's folder comes first on sys.path, and would shadow lm_eval.)
"""

from __future__ import annotations

import logging
from pathlib import Path

from nemo_loop.config import config_from_command_line
from nemo_loop.evaluation.lm_eval_config import LMEvalConfig
from nemo_loop.evaluation.lm_eval_sweep import TABLE_MD, run_sweep
from nemo_loop.utils.distributed import init_distributed


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = config_from_command_line(LMEvalConfig, "lm_eval.yaml", __doc__, argv)
    init_distributed()
    if run_sweep(config):
        print((Path(config.output_dir) / TABLE_MD).read_text())


if __name__ == "__main__":
    main()
