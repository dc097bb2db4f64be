"""Ouro-style LoopLM pretraining: config, setup and train step."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from megatron.core import parallel_state

from nemo_loop.algorithms.common import (
    OptimConfig,
    build_optimizer,
    train_step,
    wrap_data_parallel,
)
from nemo_loop.data import pointer_chase
from nemo_loop.data.pointer_chase import PointerChaseConfig, sample_batch
from nemo_loop.checkpointing import load_model_checkpoint, save_model_checkpoint
from nemo_loop.evaluation.loop_accuracy import accuracy_per_loop
from nemo_loop.losses.ouro_pretrain import ouro_pretraining_loss
from nemo_loop.models.looplm.config import LoopModelConfig
from nemo_loop.models.looplm.model import build_loop_model
from nemo_loop.models.looplm.pipeline import unwrap_model
from nemo_loop.utils.distributed import ParallelLayout, initialize_model_parallel
from nemo_loop.utils.logging import MetricsLogger, WandbConfig


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_parallel: bool = False

    def layout(self) -> ParallelLayout:
        return ParallelLayout(self.tensor_parallel, self.pipeline_parallel, self.sequence_parallel)


@dataclass
class TrainerConfig:
    max_steps: int = 30
    micro_batch_size: int = 16
    global_batch_size: int = 32
    log_interval: int = 5
    seed: int = 1234
    entropy_beta: float = 0.05
    init_from: str | None = None  # a dist_checkpointing dir with a "model" entry (any TP/PP)


@dataclass
class PretrainConfig:
    model: LoopModelConfig = field(default_factory=LoopModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: PointerChaseConfig = field(default_factory=PointerChaseConfig)
    eval_problems: int = 256  # held-out test problems scored at every loop budget
    wandb: WandbConfig = field(default_factory=WandbConfig)
    output_dir: str = "runs/pretrain"

    def validate(self, world_size: int | None = None) -> None:
        self.model.validate(self.parallel.tensor_parallel, self.parallel.pipeline_parallel)
        self.optim.validate()
        self.wandb.validate()
        self.data.validate(self.model.vocab_size)
        if pointer_chase.sequence_length(self.data) > self.model.max_sequence_length:
            raise ValueError(f"data sequences of {pointer_chase.sequence_length(self.data)} "
                             f"tokens exceed "
                             f"model.max_sequence_length {self.model.max_sequence_length}")
        trainer = self.trainer
        if trainer.max_steps < 1 or trainer.micro_batch_size < 1:
            raise ValueError("trainer.max_steps and trainer.micro_batch_size must be >= 1")
        if world_size is not None:
            data_parallel = self.parallel.layout().data_parallel(world_size)
            if trainer.global_batch_size % (trainer.micro_batch_size * data_parallel):
                raise ValueError(
                    f"trainer.global_batch_size {trainer.global_batch_size} is not divisible by "
                    f"micro_batch_size × data_parallel = {trainer.micro_batch_size} × "
                    f"{data_parallel}")


def setup(config: PretrainConfig):
    config.validate(torch.distributed.get_world_size())
    initialize_model_parallel(config.parallel.layout(), seed=config.trainer.seed)
    model = build_loop_model(config.model.transformer_config(
        config.parallel.tensor_parallel, config.parallel.pipeline_parallel,
        config.parallel.sequence_parallel))
    if config.trainer.init_from:
        load_model_checkpoint(model, config.trainer.init_from)
    ddp_model = wrap_data_parallel(model, config.optim.use_distributed_optimizer)
    optimizer, scheduler = build_optimizer(ddp_model, config.optim)
    return ddp_model, optimizer, scheduler


def my_micro_batches(config: PretrainConfig, step: int) -> list[dict]:
    """This data-parallel rank's micro-batches of the global batch for ``step``."""
    generator = torch.Generator().manual_seed(config.data.train_seed * 1_000_003 + step)
    batch = sample_batch(config.data, config.trainer.global_batch_size, generator)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    per_rank = config.trainer.global_batch_size // dp_size
    size = config.trainer.micro_batch_size
    mine = {k: v[dp_rank * per_rank:(dp_rank + 1) * per_rank] for k, v in batch.items()}
    return [{k: v[i:i + size] for k, v in mine.items()} for i in range(0, per_rank, size)]


def pretrain(config: PretrainConfig) -> list[dict]:
    ddp_model, optimizer, scheduler = setup(config)
    logger = MetricsLogger(config.wandb, config, Path(config.output_dir), format_step)
    history = []
    for step in range(1, config.trainer.max_steps + 1):
        micro_batches = my_micro_batches(config, step)

        def loss_func(batch, output, count=len(micro_batches)):
            loss, metrics = ouro_pretraining_loss(output, batch["labels"], batch["loss_mask"],
                                                  config.trainer.entropy_beta)
            return loss / count, metrics

        started = time.perf_counter()
        metrics = train_step(ddp_model, optimizer, scheduler, micro_batches, loss_func)
        metrics["step_time_s"] = time.perf_counter() - started
        metrics["step"] = step
        history.append(metrics)
        if step % config.trainer.log_interval == 0 or step in (1, config.trainer.max_steps):
            logger.log(step, metrics)
    test_accuracy = evaluate(config, ddp_model)
    if test_accuracy is not None:
        logger.log(config.trainer.max_steps, {"test_accuracy_per_loop": test_accuracy})
    save_model_checkpoint(unwrap_model(ddp_model), Path(config.output_dir) / "model")
    logger.close()
    return history


def evaluate(config: PretrainConfig, model) -> list[float] | None:
    """Held-out accuracy at loops 1..R (test split, never trained on)."""
    test = pointer_chase.problems(config.data, config.eval_problems, "test")
    return accuracy_per_loop(model, [list(p.prompt) for p in test], [p.answer for p in test],
                             pointer_chase.PAD)


def format_step(step: int, metrics: dict) -> str:
    if "test_accuracy_per_loop" in metrics:
        return "test accuracy per loop: " + " ".join(
            f"L{r + 1}={a:.3f}" for r, a in enumerate(metrics["test_accuracy_per_loop"]))
    per_loop = " ".join(f"L{r + 1}={ce:.3f}" for r, ce in enumerate(metrics["ce_per_loop"]))
    exits = " ".join(f"{p:.2f}" for p in metrics["exit_prob_per_loop"])
    return (f"step {step:4d} | loss {metrics['loss']:.4f} | CE per loop {per_loop} | "
            f"exit p [{exits}] | grad_norm {metrics['grad_norm']:.3f} | lr {metrics['lr']:.2e} | "
            f"{metrics['step_time_s']:.2f}s")

