"""Peak memory of one training step per loops trained (R̃ = 1..4), without and with activation
recompute, measured and as the memory plan predicts it (CPU).

Run: ``python benchmarks/recompute_memory.py`` (a few minutes on an idle 2-core machine). Model:
4 shared layers × R = 4, hidden 256, 4 heads, SwiGLU 704, vocabulary 1,024, fp32 (SDPA); one
micro-batch of 2 prompt + response rows × 512 random tokens (padded masks); one step of
``train_step`` at R̃ loops (megatron DDP + distributed optimizer, the loop pipeline, Ouro's loss
over the R̃ loops) for
``model.recompute`` none, selective (core_attn + mlp) and full (uniform, one layer per chunk).

Method: each (recompute, R̃) case builds its model and optimizer, runs a warm-up step, then one
step under ``PeakTensorMemory`` (allocator level: what the step allocates on top of the weights,
gradient buffer and Adam state). ``planned`` is the plan's training-phase total minus its static
part (``nemo_loop.algorithms.memory_plan``) for the same config. The last line printed is one
JSON line: the peaks, the plan's error and the memory ratios with/without recompute per R̃.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LOOPS = (1, 2, 3, 4)
RECOMPUTE = {"none": [], "selective": ["model.recompute=selective",
                                       "model.recompute_modules=[core_attn,mlp]"],
             "full": ["model.recompute=full"]}
SEQ, ROWS = 512, 2
MODEL = ["model.num_layers=4", "model.hidden_size=256", "model.ffn_hidden_size=704",
         "model.num_attention_heads=4", "model.num_query_groups=4", "model.vocab_size=1024",
         f"model.max_sequence_length={SEQ}", "model.num_loops=4"]


def _config(recompute: str, loops: int):
    """An SFT config: teacher-forced rows at R̃ = trainer.student_loops (the plan's sft path)."""
    from nemo_loop.algorithms.sft import SFTConfig
    from nemo_loop.config import CONF_DIR, load_config

    return load_config(SFTConfig, CONF_DIR / "sft.yaml", [
        *MODEL, *RECOMPUTE[recompute], f"trainer.student_loops={loops}", "loss.kind=ouro",
        f"trainer.micro_batch_size={ROWS}", f"trainer.examples_per_step={ROWS}"],
        check_paths=False)


def _planned(config) -> int:
    from nemo_loop.algorithms.memory_plan import PlanAssumptions, plan_training
    from nemo_loop.algorithms.registry import algorithm

    plan = plan_training(algorithm("sft"), config, PlanAssumptions(sequence_tokens=SEQ))
    return plan.phase_total("training") - sum(c.bytes for c in plan.static)


def _measured(config) -> int:
    from nemo_loop.algorithms.common import build_optimizer, train_step, wrap_data_parallel
    from nemo_loop.losses.ouro_pretrain import ouro_pretraining_loss
    from nemo_loop.models.looplm.model import build_loop_model
    from nemo_loop.utils.memory import PeakTensorMemory

    torch.manual_seed(0)
    ddp = wrap_data_parallel(build_loop_model(config.model.transformer_config()))
    optimizer, scheduler = build_optimizer(ddp, config.optim)
    from nemo_loop.data.sequences import teacher_forced_batch

    # Prompt + response rows with megatron's padded masks, as SFT trains on.
    tokens = torch.randint(1, config.model.vocab_size, (ROWS, SEQ + 1),
                           generator=torch.Generator().manual_seed(1)).tolist()
    batches = [teacher_forced_batch([row[:SEQ // 2] for row in tokens],
                                    [row[SEQ // 2:] for row in tokens], pad_id=0)]
    loops = config.trainer.student_loops

    def loss_func(batch, output, normalizer):
        return ouro_pretraining_loss(output, batch["labels"], batch["loss_mask"],
                                     normalizer=normalizer)

    def step():
        train_step(ddp, optimizer, scheduler, batches, loss_func, num_loops=loops)

    step()
    with PeakTensorMemory("cpu") as peak:
        step()
    return peak.bytes


def main() -> None:
    from nemo_loop.utils.distributed import (
        ParallelConfig,
        init_distributed,
        initialize_model_parallel,
    )

    init_distributed()
    initialize_model_parallel(ParallelConfig())
    measured, planned = {}, {}
    for recompute in RECOMPUTE:
        for loops in LOOPS:
            config = _config(recompute, loops)
            measured[recompute, loops] = _measured(config) / 2**20
            planned[recompute, loops] = _planned(config) / 2**20
    print(f"step peak [MiB] at R̃ = {', '.join(map(str, LOOPS))} (planned in brackets)")
    for recompute in RECOMPUTE:
        cells = "  ".join(f"{measured[recompute, r]:8.1f} ({planned[recompute, r]:7.1f})"
                          for r in LOOPS)
        print(f"{recompute:<10}{cells}")
    summary = {"bench": "recompute_memory", "seq": SEQ, "rows": ROWS, "loops": list(LOOPS)}
    for recompute in RECOMPUTE:
        summary[f"{recompute}_step_peak_mib"] = [round(measured[recompute, r], 1) for r in LOOPS]
        summary[f"{recompute}_planned_mib"] = [round(planned[recompute, r], 1) for r in LOOPS]
    for recompute in ("selective", "full"):
        summary[f"{recompute}_over_none"] = [round(measured[recompute, r] / measured["none", r], 3)
                                             for r in LOOPS]
    summary["plan_error_max"] = round(max(abs(planned[k] / measured[k] - 1) for k in measured), 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
