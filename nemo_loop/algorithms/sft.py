"""Supervised fine-tuning (SFT) at the student's loop budget R̃: config, setup, step and train.

The baseline LLOPSD has to beat with the same data and no teacher: teacher-forced next-token
training on reference responses — the task's :meth:`~nemo_loop.tasks.base.Task.sft_target`
(a math record's worked solution, ``data.solution_field``; the shell game's answer word) — in
the task's prompt format, running R̃ = ``trainer.student_loops`` loops. ``loss.kind``:
``ouro`` = Ouro's per-loop loss under the exit distribution over the R̃ loops, ``final_loop`` =
cross-entropy of loop R̃ alone (``nemo_loop.losses.supervised``).

Every target token weighs 1/(target tokens of the global batch) (``token_mean``) or
1/(|y|·sequences) (``sequence_mean``), counted by ``train_step`` over all micro-batches and the
data-parallel group, so a step's loss and update do not depend on the micro-batch or
data-parallel layout (nor on ``trainer.max_tokens_per_micro_batch`` packing). Records are drawn by the
seeded, resumable :class:`~nemo_loop.data.prompts.PromptSampler`, so a resumed run sees the
same batches. Checkpoints, resume, preemption and logging go through
:class:`~nemo_loop.algorithms.training_run.TrainingRun`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from nemo_loop.algorithms import step_flops
from nemo_loop.algorithms.common import (
    OptimConfig,
    build_trainable_model,
    check_token_budget,
    train_step,
)
from nemo_loop.algorithms.rollouts import data_parallel_share
from nemo_loop.algorithms.training_run import (
    CheckpointConfig,
    CheckpointedTrainerConfig,
    TrainerState,
    TrainingRun,
    check_global_batch,
    validate_run_sections,
)
from nemo_loop.data.chat import ChatTokenizer
from nemo_loop.data.prompts import PromptSampler, PromptSetConfig, load_prompt_set
from nemo_loop.data.sequences import micro_batch_rows, teacher_forced_batch
from nemo_loop.losses.normalization import check_aggregation
from nemo_loop.losses.supervised import (
    check_supervised_loss_kind,
    logit_loops_for,
    supervised_loop_loss,
)
from nemo_loop.models.looplm.config import LoopModelConfig
from nemo_loop.models.looplm.model import LoopOutput
from nemo_loop.tasks import Task, TaskConfig, build_task
from nemo_loop.utils.distributed import ParallelConfig
from nemo_loop.utils.logging import WandbConfig

@dataclass
class SFTLossConfig:
    kind: str = "ouro"  # ouro | final_loop
    entropy_beta: float = 0.05  # ouro: weight of the exit distribution's entropy bonus
    aggregation: str = "token_mean"  # token_mean | sequence_mean, over the global batch

    def validate(self) -> None:
        check_supervised_loss_kind(self.kind)
        if self.entropy_beta < 0:
            raise ValueError(f"loss.entropy_beta must be >= 0, got {self.entropy_beta}")
        check_aggregation("loss.aggregation", self.aggregation)


@dataclass
class SFTTrainerConfig(CheckpointedTrainerConfig):
    # save_interval, checkpoint_dir, resume, overwrite, init_from: CheckpointedTrainerConfig
    max_steps: int = 100
    examples_per_step: int = 16  # global, across data-parallel ranks
    micro_batch_size: int = 8  # examples per micro-batch (at most, with a token budget)
    # Token budget of a micro-batch (rows × padded length; NeMo-RL's dynamic batching): examples
    # sorted by length and packed; null: micro_batch_size examples each, in order.
    max_tokens_per_micro_batch: int | None = None
    student_loops: int = 2  # R̃: the loops the model runs, as the LLOPSD student's
    log_interval: int = 10
    seed: int = 1234  # model init and the order the records are drawn in


@dataclass
class SFTConfig:
    model: LoopModelConfig = field(default_factory=LoopModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: SFTTrainerConfig = field(default_factory=SFTTrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: SFTLossConfig = field(default_factory=SFTLossConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: PromptSetConfig = field(default_factory=PromptSetConfig)  # records with references
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    output_dir: str = "runs/sft"

    def validate(self, world_size: int | None = None, check_paths: bool = True) -> None:
        """``check_paths=False`` skips the checks on files an earlier pipeline phase writes."""
        parallel = self.parallel
        self.model.validate(parallel.tensor_parallel, parallel.pipeline_parallel)
        trainer = self.trainer
        if parallel.sequence_parallel:
            # the loss reads the readouts of the target columns, which SP splits over ranks
            raise ValueError("SFT does not support parallel.sequence_parallel yet")
        if not 1 <= trainer.student_loops <= self.model.num_loops:
            raise ValueError(f"trainer.student_loops (R̃={trainer.student_loops}) must be in "
                             f"[1, model.num_loops (R={self.model.num_loops})]")
        self.loss.validate()
        self.task.validate()
        task = build_task(self.task)
        if task.sft_needs_solutions and not self.data.solution_field:
            raise ValueError(
                f"SFT on task {task.name!r} trains on reference solutions, but "
                f"data.solution_field is not set: name the field that holds them (GSM8K: "
                f"'answer', MATH: 'solution'); {self.data.path} without solutions cannot be "
                f"used for SFT")
        validate_run_sections(self, check_paths)
        self.data.validate(check_path=check_paths)
        if trainer.max_steps < 1 or trainer.micro_batch_size < 1 or trainer.log_interval < 1:
            raise ValueError("trainer.max_steps, trainer.micro_batch_size and "
                             "trainer.log_interval must be >= 1")
        check_token_budget(trainer.max_tokens_per_micro_batch, self.model.max_sequence_length)
        if world_size is not None:  # with a token budget, micro-batches need not be full
            check_global_batch("examples_per_step", trainer.examples_per_step,
                               trainer.micro_batch_size
                               if trainer.max_tokens_per_micro_batch is None else 1,
                               parallel.data_parallel(world_size))


@dataclass
class SFTExample:
    prompt: list[int]
    response: list[int]  # the reference, then the end of turn


@dataclass(kw_only=True)
class SFTState(TrainerState):
    task: Task
    tokenizer: ChatTokenizer
    examples: list[SFTExample]


def load_examples(config: SFTConfig, task: Task, tokenizer: ChatTokenizer) -> list[SFTExample]:
    """Every record of ``data`` as (prompt ids, reference ids). A record without a reference,
    or one longer than the model's maximum sequence length, is an error naming the file and
    the records: nothing is dropped silently."""
    records = load_prompt_set(config.data)
    path = config.data.resolved_path()
    missing = [record.id for record in records if task.sft_target(record) is None]
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} of {len(records)} records have no reference solution in "
            f"field {config.data.solution_field!r} (record ids {missing[:5]}"
            f"{' …' if len(missing) > 5 else ''}); SFT needs one for every record")
    examples = [SFTExample(tokenizer.encode_prompt(record.problem),
                           tokenizer.encode_response(task.sft_target(record)))
                for record in records]
    limit = config.model.max_sequence_length
    too_long = [(record.id, len(e.prompt) + len(e.response))
                for record, e in zip(records, examples) if len(e.prompt) + len(e.response) > limit]
    if too_long:
        raise ValueError(f"{path}: {len(too_long)} records exceed model.max_sequence_length "
                         f"{limit} as prompt + reference (id, tokens: {too_long[:5]}); raise "
                         f"the limit or leave them out of the file")
    return examples


def setup(config: SFTConfig) -> SFTState:
    config.validate(torch.distributed.get_world_size())
    task = build_task(config.task)
    tokenizer = task.tokenizer()
    tokenizer.check_fits(config.model.vocab_size)
    examples = load_examples(config, task, tokenizer)  # before any work: bad data fails fast
    run = TrainingRun(config, tokenizer)
    state = SFTState(config, build_trainable_model(config, run), run,
                     PromptSampler(len(examples), config.trainer.seed), task=task,
                     tokenizer=tokenizer, examples=examples)
    run.resume(state)
    return state


def my_micro_batches(state: SFTState) -> list[dict]:
    """This data-parallel rank's micro-batches of the next step."""
    config = state.config
    indices = state.sampler.next_indices(config.trainer.examples_per_step)
    mine = data_parallel_share([state.examples[i] for i in indices])
    return teacher_forced_micro_batches(mine, config.trainer, state.tokenizer.pad_id)


def teacher_forced_micro_batches(examples: list[SFTExample], trainer, pad_id: int
                                 ) -> list[dict]:
    """``examples`` in micro-batches of ``trainer.micro_batch_size``, or packed by
    ``trainer.max_tokens_per_micro_batch``; each padded to its own longest prompt and
    reference, with the columns that predict reference tokens as ``target_window``."""
    micro_batches = []
    for rows in micro_batch_rows([len(e.prompt) for e in examples],
                                 [len(e.response) for e in examples], trainer.micro_batch_size,
                                 trainer.max_tokens_per_micro_batch):
        chosen = [examples[row] for row in rows]
        batch = teacher_forced_batch([example.prompt for example in chosen],
                                     [example.response for example in chosen], pad_id)
        # The columns that predict reference tokens: the head and the loss run on these only,
        # not on the prompt.
        columns = batch["loss_mask"].ne(0).any(0).nonzero().squeeze(1)
        batch["target_window"] = slice(int(columns[0]), int(columns[-1]) + 1)
        micro_batches.append(batch)
    return micro_batches


def supervised_loss_function(loss_config: SFTLossConfig, student):
    """``train_step``'s loss: the micro-batch's share of the step's supervised loss, on the
    target columns only."""

    def loss_func(micro_batch, output, normalizer):
        window = micro_batch["target_window"]
        readouts = output.readouts[:, window]
        on_targets = LoopOutput(output.loops, readouts, student.logits(readouts),
                                output.exit_logits[:, window])
        weights = normalizer.weights(micro_batch["loss_mask"][:, window], loss_config.aggregation)
        loss, metrics = supervised_loop_loss(on_targets, micro_batch["labels"][:, window],
                                             weights, loss_config.kind, loss_config.entropy_beta)
        metrics.pop("target_weight")
        metrics["target_tokens"] = micro_batch["loss_mask"].ne(0).sum()
        return loss, metrics

    return loss_func


def sft_step(state: SFTState) -> dict:
    config = state.config
    started = time.perf_counter()
    micro_batches = my_micro_batches(state)
    student_loops = config.trainer.student_loops
    metrics = train_step(state.ddp_model, state.optimizer, state.scheduler, micro_batches,
                         supervised_loss_function(config.loss, state.model),
                         num_loops=student_loops,
                         logit_loops=logit_loops_for(config.loss.kind, student_loops),
                         compute_logits=False)
    state.step += 1
    metrics["step_time_s"] = time.perf_counter() - started
    metrics.update(step_flops.teacher_forced(
        config, micro_batches, student_loops,
        len(logit_loops_for(config.loss.kind, student_loops)), metrics["step_time_s"]))
    return metrics


def format_step(step: int, metrics: dict) -> str:
    per_loop = " ".join(f"{ce:.3f}" for ce in metrics.get("ce_per_loop", []))
    return (f"step {step:4d} | loss {metrics.get('loss', float('nan')):.4f} | CE per loop "
            f"[{per_loop}] | grad_norm {metrics.get('grad_norm', float('nan')):.3f} | lr "
            f"{metrics.get('lr', float('nan')):.2e} | {metrics['step_time_s']:.2f}s")


def train(config: SFTConfig) -> list[dict]:
    """Train to ``trainer.max_steps`` (resuming from the newest checkpoint), saving at
    ``trainer.save_interval``, at the end and on preemption."""
    state = setup(config)
    return state.run.train(state, sft_step, format_step, log_first_step=True)
