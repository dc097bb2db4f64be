"""Peak memory of one pretraining step at PP = 2: the loop-aware 1F1B schedule vs every forward
first (GPipe-like, the previous schedule's memory), for 2, 4 and 8 micro-batches (CPU, gloo).

Run: ``python benchmarks/pipeline_memory.py`` (about two minutes on an idle 2-core machine).
Model: 2 shared layers (one per stage), R = 4 loops, hidden 256, sequence 128, micro-batch 8,
vocabulary 1,024; one step of ``train_step`` (megatron-core DDP + distributed optimizer, Ouro's
loss) on random tokens.

Method: every (schedule, micro-batches) case runs in two fresh processes (the two stages). Each
builds the model and optimizer, runs a warm-up step on one micro-batch (Adam's state appears,
the allocator warms up), then writes "5" to
/proc/self/clear_refs (peak RSS := current RSS), notes VmRSS, runs the measured step and reads
VmHWM. ``peak_rss_mib`` is VmHWM (what the machine must have), ``step_extra_mib`` is VmHWM minus
the RSS before the step (activations, gradients, messages); both are the larger of the two
stages. ``flat`` compares 8 with 2 micro-batches. The JSON line is the last line printed.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MICRO_BATCH_COUNTS = (2, 4, 8)
SCHEDULES = ("1f1b", "gpipe")
LOOPS, HIDDEN, SEQ, MICRO_BATCH, VOCAB = 4, 256, 128, 8, 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _micro_batches(count: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=gen)
        batches.append(dict(input_ids=tokens[:, :-1], labels=tokens[:, 1:],
                            loss_mask=torch.ones(MICRO_BATCH, SEQ)))
    return batches


def _stage(rank: int, port: int, schedule: str, count: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from nemo_loop.algorithms.common import (
        OptimConfig,
        sum_metrics,
        build_optimizer,
        wrap_data_parallel,
    )
    from nemo_loop.losses.normalization import LossNormalizer
    from nemo_loop.losses.ouro_pretrain import ouro_pretraining_loss
    from nemo_loop.models.looplm.config import LoopModelConfig
    from nemo_loop.models.looplm.model import build_loop_model
    from nemo_loop.models.looplm.pipeline import forward_backward_loops
    from nemo_loop.utils.distributed import (
        ParallelConfig,
        init_distributed,
        initialize_model_parallel,
    )

    init_distributed()
    layout = ParallelConfig(pipeline_parallel=2)
    initialize_model_parallel(layout)
    model_config = LoopModelConfig(num_layers=2, hidden_size=HIDDEN, ffn_hidden_size=4 * HIDDEN,
                                   num_attention_heads=4, vocab_size=VOCAB,
                                   max_sequence_length=SEQ, num_loops=LOOPS)
    ddp = wrap_data_parallel(build_loop_model(model_config.transformer_config(1, 2)))
    optimizer, _ = build_optimizer(ddp, OptimConfig())

    def step(batches):  # common.train_step, with the schedule chosen here
        normalizer = LossNormalizer.count([batch["loss_mask"] for batch in batches])

        def loss_func(batch, output):
            return ouro_pretraining_loss(output, batch["labels"], batch["loss_mask"],
                                         normalizer=normalizer)

        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        metrics = forward_backward_loops(ddp, batches, loss_func, schedule=schedule)
        finalize_model_grads([ddp])
        optimizer.step()
        sum_metrics(metrics)

    step(_micro_batches(1))
    batches = _micro_batches(count)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status_kib("VmRSS")
    step(batches)
    peak = _status_kib("VmHWM")
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"peak_rss_mib": peak / 1024, "step_extra_mib": (peak - before) / 1024}, fh)
    torch.distributed.destroy_process_group()


def run_case(schedule: str, count: int) -> dict:
    from nemo_loop.utils.distributed import free_port

    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_stage, args=(free_port(), schedule, count, out_dir), nprocs=2,
                           join=True, start_method="spawn")
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(2)]
    return {key: round(max(r[key] for r in ranks), 1) for key in ranks[0]}


def main() -> None:
    results = {(s, m): run_case(s, m) for s in SCHEDULES for m in MICRO_BATCH_COUNTS}
    print(f"{'schedule':<8}{'micro-batches':>15}{'peak RSS [MiB]':>16}{'step extra [MiB]':>18}")
    for (schedule, count), row in results.items():
        print(f"{schedule:<8}{count:>15}{row['peak_rss_mib']:>16.0f}{row['step_extra_mib']:>18.0f}")
    summary = {"bench": "pipeline_memory", "pp": 2, "loops": LOOPS,
               "micro_batches": list(MICRO_BATCH_COUNTS)}
    for schedule in SCHEDULES:
        rows = [results[schedule, m] for m in MICRO_BATCH_COUNTS]
        summary[f"{schedule}_peak_rss_mib"] = [r["peak_rss_mib"] for r in rows]
        summary[f"{schedule}_step_extra_mib"] = [r["step_extra_mib"] for r in rows]
        summary[f"{schedule}_peak_rss_growth_2_to_8"] = round(
            rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"], 3)
    summary["target_1f1b_growth_at_most"] = 1.10
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
