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
from nemo_loop.checkpointing import load_model_checkpoint, save_model_checkpoint
from nemo_loop.data import shell_game
from nemo_loop.data.chat import ChatTokenizer
from nemo_loop.data.sequences import build_batch
from nemo_loop.data.shell_game import ShellGameConfig
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
    # Validation-split accuracy per loop every N steps (0: never). Monitoring only: the test
    # split is scored once, after the last step.
    eval_interval: int = 0
    seed: int = 1234
    entropy_beta: float = 0.05
    init_from: str | None = None  # a dist_checkpointing dir with a "model" entry (any TP/PP)


@dataclass
class PretrainConfig:
    model: LoopModelConfig = field(default_factory=LoopModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: ShellGameConfig = field(default_factory=ShellGameConfig)
    # Distinct held-out games scored at every loop count.
    validation_problems: int = 256
    test_problems: int = 512
    wandb: WandbConfig = field(default_factory=WandbConfig)
    output_dir: str = "runs/pretrain"

    def validate(self, world_size: int | None = None) -> None:
        self.model.validate(self.parallel.tensor_parallel, self.parallel.pipeline_parallel)
        self.optim.validate()
        self.wandb.validate()
        self.data.validate()
        vocabulary = len(shell_game.vocabulary(self.data))
        if vocabulary > self.model.vocab_size:
            raise ValueError(f"the task has {vocabulary} words but model.vocab_size is "
                             f"{self.model.vocab_size}")
        longest = self.data.max_prompt_words() + 2  # + answer and end of turn
        if longest > self.model.max_sequence_length:
            raise ValueError(f"data sequences of up to {longest} tokens exceed "
                             f"model.max_sequence_length {self.model.max_sequence_length}")
        if self.trainer.eval_interval < 0:
            raise ValueError("trainer.eval_interval must be >= 0")
        for split, count in (("validation", self.validation_problems),
                             ("test", self.test_problems)):
            if count < 1:
                raise ValueError(f"{split}_problems must be >= 1")
            shell_game.check_count(self.data, split, count)
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


def task_tokenizer(config: PretrainConfig) -> ChatTokenizer:
    """The task's word-level tokenizer, written into the run (LLOPSD and evaluation read it)."""
    directory = Path(config.output_dir) / "tokenizer"
    if torch.distributed.get_rank() == 0:
        shell_game.write_tokenizer(config.data, directory)
    torch.distributed.barrier()
    return ChatTokenizer(shell_game.chat_config(directory))


def sample_batch(config: ShellGameConfig, tokenizer: ChatTokenizer, batch_size: int,
                 generator: torch.Generator) -> dict:
    """Training games of mixed length as ``prompt answer <|im_end|>``; the loss covers the
    answer and the end of turn. ``hint_fraction`` of them state the answer first (the OPSD
    teacher's context), so the teacher knows what the hint means."""
    prompts, responses = [], []
    for _ in range(batch_size):
        problem = shell_game.draw(config, "train", generator)
        hinted = float(torch.rand((), generator=generator)) < config.hint_fraction
        context = shell_game.HINT_TEMPLATE.format(answer=problem.answer) if hinted else None
        prompts.append(tokenizer.encode_prompt(problem.text, context))
        responses.append(tokenizer.encode_prompt(problem.answer) + [tokenizer.im_end_id])
    batch = build_batch(prompts, responses, tokenizer.pad_id)
    loss_mask = torch.zeros(batch_size, batch.input_ids.shape[1] - 1)
    loss_mask[:, batch.response_window] = 1.0
    return dict(input_ids=batch.input_ids[:, :-1], labels=batch.input_ids[:, 1:],
                position_ids=batch.position_ids[:, :-1],
                attention_mask=batch.attention_mask[:, :, :-1, :-1], loss_mask=loss_mask)


def my_micro_batches(config: PretrainConfig, tokenizer: ChatTokenizer, step: int) -> list[dict]:
    """This data-parallel rank's micro-batches of the global batch for ``step``."""
    generator = torch.Generator().manual_seed(config.data.seed * 1_000_003 + step)
    batch = sample_batch(config.data, tokenizer, config.trainer.global_batch_size, generator)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    per_rank = config.trainer.global_batch_size // dp_size
    size = config.trainer.micro_batch_size
    mine = {k: v[dp_rank * per_rank:(dp_rank + 1) * per_rank] for k, v in batch.items()}
    return [{k: v[i:i + size] for k, v in mine.items()} for i in range(0, per_rank, size)]


def pretrain(config: PretrainConfig) -> list[dict]:
    ddp_model, optimizer, scheduler = setup(config)
    tokenizer = task_tokenizer(config)
    logger = MetricsLogger(config.wandb, config, Path(config.output_dir), format_step)
    history = []
    for step in range(1, config.trainer.max_steps + 1):
        micro_batches = my_micro_batches(config, tokenizer, step)

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
        interval = config.trainer.eval_interval
        if interval and step % interval == 0 and step < config.trainer.max_steps:
            logger.log(step, split_accuracy(config, tokenizer, ddp_model, "validation"))
    final = split_accuracy(config, tokenizer, ddp_model, "validation")
    final.update(split_accuracy(config, tokenizer, ddp_model, "test"))
    logger.log(config.trainer.max_steps, final)
    history.append(final)
    save_model_checkpoint(unwrap_model(ddp_model), Path(config.output_dir) / "model")
    logger.close()
    return history


def split_accuracy(config: PretrainConfig, tokenizer: ChatTokenizer, model,
                   split: str) -> dict:
    """Greedy accuracy at loops 1..R on the held-out full-length games of ``split``."""
    count = config.validation_problems if split == "validation" else config.test_problems
    problems = shell_game.problems(config.data, split, count)
    answers = [tokenizer.encode_prompt(p.answer)[0] for p in problems]
    accuracy = accuracy_per_loop(model, [tokenizer.encode_prompt(p.text) for p in problems],
                                 answers, tokenizer.pad_id)
    return {} if accuracy is None else {f"{split}_accuracy_per_loop": accuracy}


def format_step(step: int, metrics: dict) -> str:
    accuracies = [key for key in metrics if key.endswith("_accuracy_per_loop")]
    if accuracies:
        return " | ".join(f"{key.removesuffix('_accuracy_per_loop')} accuracy per loop: " + " ".join(
            f"L{r + 1}={a:.3f}" for r, a in enumerate(metrics[key])) for key in accuracies)
    per_loop = " ".join(f"L{r + 1}={ce:.3f}" for r, ce in enumerate(metrics["ce_per_loop"]))
    exits = " ".join(f"{p:.2f}" for p in metrics["exit_prob_per_loop"])
    return (f"step {step:4d} | loss {metrics['loss']:.4f} | CE per loop {per_loop} | "
            f"exit p [{exits}] | grad_norm {metrics['grad_norm']:.3f} | lr {metrics['lr']:.2e} | "
            f"{metrics['step_time_s']:.2f}s")

