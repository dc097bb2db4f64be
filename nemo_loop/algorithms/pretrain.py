"""Ouro-style LoopLM pretraining: config, setup and train step."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state

from nemo_loop.algorithms import step_flops
from nemo_loop.algorithms.common import (
    OptimConfig,
    build_trainable_model,
    train_step,
)
from nemo_loop.algorithms.loop_accuracy import accuracy_per_loop
from nemo_loop.algorithms.pretrain_data import PretrainDataConfig, TextSource
from nemo_loop.algorithms.training_run import (
    CheckpointConfig,
    CheckpointedTrainerConfig,
    TrainerState,
    TrainingRun,
    check_global_batch,
    validate_run_sections,
)
from nemo_loop.data.chat import ChatTokenizer
from nemo_loop.data.sequences import teacher_forced_batch
from nemo_loop.losses.normalization import LossNormalizer, check_aggregation
from nemo_loop.losses.ouro_pretrain import ouro_pretraining_loss
from nemo_loop.models.looplm.config import LoopModelConfig
from nemo_loop.tasks import Task, TaskConfig, build_task
from nemo_loop.utils.distributed import ParallelConfig
from nemo_loop.utils.logging import WandbConfig


@dataclass
class TrainerConfig(CheckpointedTrainerConfig):
    # save_interval, checkpoint_dir, resume, overwrite, init_from: CheckpointedTrainerConfig
    max_steps: int = 30
    micro_batch_size: int = 16
    global_batch_size: int = 32
    log_interval: int = 5
    # Validation-split accuracy per loop every N steps (0: never). Monitoring only: the test
    # split is scored once, after the last step.
    eval_interval: int = 0
    seed: int = 1234
    data_seed: int = 0  # the stream of training sequences the task draws
    entropy_beta: float = 0.05


@dataclass
class PretrainLossConfig:
    # token_mean | sequence_mean over the loss-mask tokens of the whole step (all micro-batches
    # and data-parallel ranks, nemo_loop.losses.normalization)
    aggregation: str = "token_mean"

    def validate(self) -> None:
        check_aggregation("loss.aggregation", self.aggregation)


@dataclass
class PretrainConfig:
    model: LoopModelConfig = field(default_factory=LoopModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: PretrainLossConfig = field(default_factory=PretrainLossConfig)
    # The synthetic task (data.source=task: training sequences and held-out problems).
    task: TaskConfig = field(default_factory=lambda: TaskConfig(name="shell_game"))
    # Where training sequences come from: the task, or a tokenized text corpus (data.text).
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    # Distinct held-out games scored at every loop count.
    validation_problems: int = 256
    test_problems: int = 512
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    output_dir: str = "runs/pretrain"

    def validate(self, world_size: int | None = None, check_paths: bool = True) -> None:
        """``check_paths=False`` skips the checks on files an earlier phase writes (the text
        corpus)."""
        self.model.validate(self.parallel.tensor_parallel, self.parallel.pipeline_parallel)
        validate_run_sections(self, check_paths)
        self.loss.validate()
        self.task.validate()
        self.data.validate(self.model.vocab_size, self.model.max_sequence_length, check_paths)
        if self.data.source == "task":
            self._validate_task_source()
        if self.trainer.eval_interval < 0:
            raise ValueError("trainer.eval_interval must be >= 0")
        trainer = self.trainer
        if trainer.max_steps < 1 or trainer.micro_batch_size < 1:
            raise ValueError("trainer.max_steps and trainer.micro_batch_size must be >= 1")
        if world_size is not None:
            check_global_batch("global_batch_size", trainer.global_batch_size,
                               trainer.micro_batch_size, self.parallel.data_parallel(world_size))

    def _validate_task_source(self) -> None:
        task = build_task(self.task)
        if not task.synthetic:
            raise ValueError(f"pretraining needs a synthetic task that draws its own training "
                             f"sequences (task.name=shell_game); {task.name!r} has none")
        task.tokenizer().check_fits(self.model.vocab_size)
        longest = task.max_sequence_tokens()
        if longest > self.model.max_sequence_length:
            raise ValueError(f"task sequences of up to {longest} tokens exceed "
                             f"model.max_sequence_length {self.model.max_sequence_length}")
        for split, count in (("validation", self.validation_problems),
                             ("test", self.test_problems)):
            if count < 1:
                raise ValueError(f"{split}_problems must be >= 1")
            task.check_count(split, count)


@dataclass(kw_only=True)
class PretrainState(TrainerState):
    """The pretraining family's state (Ouro's loss, LoopRPT, the exit gate): its data is
    indexed by the step, so the trainer state holds nothing beyond it."""

    source: TaskSource | TextSource | None  # None: the caller brings the data


def setup_state(config: PretrainConfig, tokenizer: ChatTokenizer,
                source: TaskSource | TextSource | None = None) -> PretrainState:
    """The run (storage checked before the model is built), then the model from
    ``trainer.init_from`` or a fresh init, its optimizer, and the resumed checkpoint if any."""
    config.validate(torch.distributed.get_world_size())
    run = TrainingRun(config, tokenizer)
    state = PretrainState(config, build_trainable_model(config, run), run, source=source)
    run.resume(state)
    return state


def setup(config: PretrainConfig, tokenizer: ChatTokenizer):
    """For callers that drive ``train_step`` themselves: ``setup_state``'s run, DDP model,
    optimizer and scheduler."""
    state = setup_state(config, tokenizer)
    return state.run, state.ddp_model, state.optimizer, state.scheduler


def sample_batch(task: Task, tokenizer: ChatTokenizer, batch_size: int,
                 generator: torch.Generator) -> dict:
    """The task's training examples as ``prompt answer <|im_end|>``; the loss covers the answer
    and the end of turn."""
    prompts, responses = [], []
    for example in task.training_examples(batch_size, generator):
        prompts.append(tokenizer.encode_prompt(example.problem, example.context))
        responses.append(tokenizer.encode_prompt(example.answer) + [tokenizer.im_end_id])
    return teacher_forced_batch(prompts, responses, tokenizer.pad_id)


def my_micro_batches(config: PretrainConfig, task: Task, tokenizer: ChatTokenizer,
                     step: int) -> list[dict]:
    """This data-parallel rank's micro-batches of the global batch for ``step``."""
    generator = torch.Generator().manual_seed(config.trainer.data_seed * 1_000_003 + step)
    batch = sample_batch(task, tokenizer, config.trainer.global_batch_size, generator)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    per_rank = config.trainer.global_batch_size // dp_size
    size = config.trainer.micro_batch_size
    mine = {k: v[dp_rank * per_rank:(dp_rank + 1) * per_rank] for k, v in batch.items()}
    return [{k: v[i:i + size] for k, v in mine.items()} for i in range(0, per_rank, size)]


def pretrain_step(state: PretrainState) -> dict:
    config, step = state.config, state.step + 1
    micro_batches = state.source.micro_batches(step)
    started = time.perf_counter()
    metrics = train_step(state.ddp_model, state.optimizer, state.scheduler, micro_batches,
                         lambda batch, output, normalizer: ouro_loss(config, batch, output,
                                                                     normalizer))
    metrics["step_time_s"] = time.perf_counter() - started
    metrics.update(step_flops.teacher_forced(config, micro_batches, config.model.num_loops,
                                             None, metrics["step_time_s"]))
    state.step = step
    return metrics


def pretrain(config: PretrainConfig) -> list[dict]:
    """Train to ``trainer.max_steps`` (resuming from the newest checkpoint), saving checkpoints
    at ``trainer.save_interval``, at the end and on preemption; held-out scores every
    ``trainer.eval_interval`` steps and after the last; then the model-only checkpoint at
    ``<output_dir>/model``."""
    source = training_source(config)
    state = setup_state(config, source.tokenizer, source)
    history = state.run.train(state, pretrain_step, format_step, log_first_step=True,
                              heldout=heldout_scores(state))
    state.run.save_final_model(state.model)
    return history


def heldout_scores(state: PretrainState):
    """``TrainingRun.train``'s held-out hook: the source's scores of the model on a split."""
    return lambda split: state.source.heldout_metrics(state.ddp_model, split)


def ouro_loss(config: PretrainConfig, batch: dict, output, normalizer: LossNormalizer):
    """A micro-batch's share of the step's Ouro loss Σ_r p_r·CE_r − β·H(p) (``train_step``'s
    contract)."""
    return ouro_pretraining_loss(output, batch["labels"], batch["loss_mask"],
                                 config.trainer.entropy_beta, normalizer, config.loss.aggregation)


class TaskSource:
    """The synthetic task's training sequences and held-out problems (``data.source=task``);
    :mod:`nemo_loop.algorithms.pretrain_data` has the text source and the interface."""

    def __init__(self, config: PretrainConfig):
        self.config, self.task = config, build_task(config.task)
        self.tokenizer = self.task.tokenizer()

    def micro_batches(self, step: int) -> list[dict]:
        return my_micro_batches(self.config, self.task, self.tokenizer, step)

    def heldout_metrics(self, model, split: str) -> dict:
        return split_accuracy(self.config, self.task, self.tokenizer, model, split)


def training_source(config: PretrainConfig) -> TaskSource | TextSource:
    """``data.source``: the synthetic task, or the text corpus (built collectively here)."""
    return TextSource(config) if config.data.source == "text" else TaskSource(config)


def split_accuracy(config: PretrainConfig, task: Task, tokenizer: ChatTokenizer, model,
                   split: str) -> dict:
    """Greedy accuracy of the first answer token at loops 1..R on held-out problems of
    ``split`` (teacher-forced: one forward scores every loop)."""
    count = config.validation_problems if split == "validation" else config.test_problems
    problems = task.heldout_problems(split, count)
    answers = [tokenizer.encode_prompt(p.answer)[0] for p in problems]
    accuracy = accuracy_per_loop(model, [tokenizer.encode_prompt(p.problem) for p in problems],
                                 answers, tokenizer.pad_id)
    return {} if accuracy is None else {f"{split}_accuracy_per_loop": accuracy}


def format_step(step: int, metrics: dict) -> str:
    """The step line (when the record has the step's training metrics) and the held-out line
    (when it has held-out scores)."""
    lines = []
    if "ce_per_loop" in metrics:
        per_loop = " ".join(f"L{r + 1}={ce:.3f}" for r, ce in enumerate(metrics["ce_per_loop"]))
        exits = " ".join(f"{p:.2f}" for p in metrics["exit_prob_per_loop"])
        skipped = " | update skipped (non-finite)" if metrics.get("update_skipped") else ""
        lines.append(f"step {step:4d} | loss {metrics['loss']:.4f} | CE per loop {per_loop} | "
                     f"exit p [{exits}] | grad_norm {metrics['grad_norm']:.3f} | lr "
                     f"{metrics['lr']:.2e} | {metrics['step_time_s']:.2f}s{skipped}")
    return "\n".join(lines + format_heldout(metrics))


def format_heldout(metrics: dict) -> list[str]:
    """The held-out line of a record with held-out scores: <split>_accuracy_per_loop (task) or
    <split>_ce_per_loop (text)."""
    heldout = [key for key in metrics if key.startswith(("validation_", "test_"))
               and key.endswith("_per_loop")]
    if not heldout:
        return []
    return [" | ".join(
        f"{key.removesuffix('_per_loop').replace('_', ' ', 1)} per loop: " + " ".join(
            f"L{r + 1}={a:.3f}" for r, a in enumerate(metrics[key])) for key in heldout)]
