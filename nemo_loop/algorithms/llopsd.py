"""Latent-Loop On-Policy Self-Distillation (LLOPSD): config, setup and train step.

Each step: sample prompts x (with answers a); the student samples y from its final loop at R̃
loops; the teacher θ′ (θ itself, an EMA copy or the initial weights) reads c + x + y with all
loops up to max φ(r); the student is trained on Σ_r α_r·D(p_S^(r) ‖ p_T^(φ(r))) over y; then the
optimizer steps, the EMA moves and the engine is refit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state

from nemo_loop.algorithms import step_flops
from nemo_loop.algorithms.common import (
    OptimConfig,
    build_trainable_model,
    train_step,
    update_ema,
)
from nemo_loop.algorithms.rollouts import (
    RolloutBatch,
    RolloutConfig,
    collect_rollouts,
    dp_mean,
    training_rows,
    validate_rollout_run,
)
from nemo_loop.algorithms.teacher_context import (
    TeacherContextConfig,
    context_metrics,
    teacher_contexts,
)
from nemo_loop.algorithms.training_run import (
    CheckpointConfig,
    CheckpointedTrainerConfig,
    TrainerState,
    TrainingRun,
)
from nemo_loop.config import to_dict
from nemo_loop.data.chat import ChatTokenizer
from nemo_loop.data.prompts import PromptSampler, PromptSetConfig, load_prompt_set
from nemo_loop.generation.backend import GenerationConfig, build_engine
from nemo_loop.generation.engine import GenerationEngine
from nemo_loop.losses import LoopDistillConfig, LossNormalizer, fused_head_distillation_loss
from nemo_loop.models.looplm.config import LoopModelConfig
from nemo_loop.models.looplm.pipeline import forward_backward_loops
from nemo_loop.tasks import Task, TaskConfig, build_task
from nemo_loop.utils.distributed import ParallelConfig
from nemo_loop.utils.logging import WandbConfig, is_logging_rank

log = logging.getLogger(__name__)

TEACHER_MODES = ("same", "ema", "frozen")
# A student whose entropy and loss both stay below these has collapsed onto single tokens.
COLLAPSED_ENTROPY, COLLAPSED_LOSS = 1e-3, 1e-4


@dataclass
class TeacherConfig:
    mode: str = "same"  # same | ema | frozen
    ema_decay: float = 0.99
    context: TeacherContextConfig = field(default_factory=TeacherContextConfig)


@dataclass
class LLOPSDTrainerConfig(CheckpointedTrainerConfig):
    # save_interval, checkpoint_dir, resume, overwrite, init_from: CheckpointedTrainerConfig
    # (init_from: e.g. the `model/` folder of recipes/convert_ouro.py import or of pretraining).
    max_steps: int = 4
    prompts_per_step: int = 4  # global, across data-parallel ranks
    micro_batch_size: int = 2  # rollouts per micro-batch (at most, with a token budget)
    # Token budget of a micro-batch (rows × padded length; NeMo-RL's dynamic batching): rollouts
    # sorted by length and packed; null: micro_batch_size rollouts each, in order. The teacher's
    # forward takes the same rows (its context makes them longer).
    max_tokens_per_micro_batch: int | None = None
    log_interval: int = 1
    seed: int = 1234
    # Warn (once) when the student's entropy and loss stay ≈ 0 for this many steps in a row: a
    # collapsed student (one token per position, e.g. after a far too high optim.lr) gives
    # the divergence nothing to learn while every metric looks finite. 0: never.
    collapse_steps: int = 3


@dataclass
class LLOPSDConfig:
    model: LoopModelConfig = field(default_factory=LoopModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: LLOPSDTrainerConfig = field(default_factory=LLOPSDTrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LoopDistillConfig = field(default_factory=LoopDistillConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # R̃, G, sampling
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # rollout engine
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: PromptSetConfig = field(default_factory=PromptSetConfig)  # the training prompts
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    output_dir: str = "runs/llopsd"

    def validate(self, world_size: int | None = None, check_paths: bool = True) -> None:
        """``check_paths=False`` skips the checks on files an earlier pipeline phase writes."""
        validate_rollout_run(self, world_size, check_paths, "LLOPSD")
        self.loss.validate(self.rollout.student_loops, self.model.num_loops)
        if self.teacher.mode not in TEACHER_MODES:
            raise ValueError(f"teacher.mode must be one of {TEACHER_MODES}, got "
                             f"{self.teacher.mode!r}")
        if not 0.0 <= self.teacher.ema_decay < 1.0:
            raise ValueError(f"teacher.ema_decay must be in [0, 1), got {self.teacher.ema_decay}")
        if self.trainer.collapse_steps < 0:
            raise ValueError(f"trainer.collapse_steps must be >= 0 (0: no warning), got "
                             f"{self.trainer.collapse_steps}")
        self.teacher.context.validate(build_task(self.task), self.rollout.samples_per_prompt)

    def run_identity(self) -> dict:
        """What decides this run's result, with the loss's φ and α resolved at this R̃ (a study
        refuses two cells that are one run, e.g. linear and shift mappings that coincide)."""
        identity = to_dict(self)
        identity["loss"] = self.loss.resolved_terms(self.rollout.student_loops,
                                                    self.model.num_loops)
        return identity


class CollapseMonitor:
    """Warns once when the student's entropy (every loop) and loss stay ≈ 0 for ``steps``
    steps in a row (on the rank that holds the metrics)."""

    def __init__(self, steps: int):
        self.steps, self.streak, self.warned = steps, [], False

    def observe(self, step: int, metrics: dict) -> None:
        entropy, loss = metrics.get("student_entropy_per_loop"), metrics.get("loss")
        if self.warned or not self.steps or entropy is None or loss is None or \
                not is_logging_rank():
            return
        if max(entropy) < COLLAPSED_ENTROPY and abs(loss) < COLLAPSED_LOSS:
            self.streak.append((step, entropy, loss, metrics.get("grad_norm"), metrics["lr"]))
        else:
            self.streak = []
        if len(self.streak) == self.steps:
            self.warned = True
            numbers = "; ".join(
                f"step {s}: entropy per loop [{' '.join(f'{h:.2e}' for h in e)}], loss "
                f"{v:.2e}, grad norm {g if g is None else f'{g:.2e}'}"
                for s, e, v, g, _ in self.streak)
            log.warning("the student has collapsed: its entropy and its loss stayed ≈ 0 for %d "
                        "steps in a row (%s). It puts all its mass on single tokens, so "
                        "distillation has nothing left to learn; a far too high learning rate "
                        "(now %.3g, optim.lr) is the usual cause. Training continues (warned "
                        "once; trainer.collapse_steps=0 turns this off).", self.steps, numbers,
                        self.streak[-1][-1])


@dataclass(kw_only=True)
class LLOPSDState(TrainerState):
    teacher_model: torch.nn.Module | None  # None: the student itself (mode "same")
    task: Task
    tokenizer: ChatTokenizer
    records: list
    engine: GenerationEngine | None = None  # built once the weights are final (after resume)
    collapse: CollapseMonitor = field(default_factory=lambda: CollapseMonitor(0))

    def extra_modules(self) -> dict:
        return {} if self.teacher_model is None else {"teacher": self.teacher_model}


def setup(config: LLOPSDConfig) -> LLOPSDState:
    config.validate(torch.distributed.get_world_size())
    task = build_task(config.task)
    tokenizer = task.tokenizer()
    tokenizer.check_fits(config.model.vocab_size)
    run = TrainingRun(config, tokenizer, model_copies=1 if config.teacher.mode == "same" else 2)
    trainable = build_trainable_model(config, run)
    records = load_prompt_set(config.data)
    state = LLOPSDState(
        config, trainable, run, PromptSampler(len(records), config.trainer.seed),
        teacher_model=None if config.teacher.mode == "same" else trainable.frozen_copy(),
        task=task, tokenizer=tokenizer, records=records,
        collapse=CollapseMonitor(config.trainer.collapse_steps))
    run.resume(state)
    # After resume: a vLLM engine starts with a copy of the weights it is built from.
    state.engine = build_engine(config.generation, state.model)
    return state


def teacher_of(state: LLOPSDState) -> torch.nn.Module:
    return state.teacher_model or state.model


@torch.no_grad()
def teacher_readouts_for(state: LLOPSDState, teacher_micro_batches: list[dict],
                         teacher_loops: list[int]) -> list[torch.Tensor]:
    """Teacher readouts [n mapped loops, T, b, h] over the response window, per micro-batch.

    Not logits: the loss forms them chunk by chunk through the teacher's head, so the
    [n, T, b, V/TP] teacher logits never exist (readouts are V/(TP·h) times smaller)."""
    outputs = forward_backward_loops(teacher_of(state), teacher_micro_batches, None,
                                     num_loops=max(teacher_loops), logit_loops=teacher_loops,
                                     compute_logits=False, forward_only=True)
    return [output.readouts[:, batch["response_window"]]
            for output, batch in zip(outputs, teacher_micro_batches)]


def llopsd_step(state: LLOPSDState) -> dict:
    started = time.perf_counter()
    return train_on_rollouts(state, collect_rollouts(state), started)


def train_on_rollouts(state: LLOPSDState, rollouts: RolloutBatch,
                      started: float | None = None) -> dict:
    """The teacher's readouts, one optimizer step on this rank's rollouts, the EMA and the
    engine refit; the step is counted. ``started``: when the step began (default: when the
    rollouts' generation did)."""
    config = state.config
    generated = time.perf_counter()
    started = generated - rollouts.generate_seconds if started is None else started
    timings = {"time_generate_s": generated - started}
    # None: no context for this rollout (sdpo without a correct sibling or feedback); its
    # teacher row reads the plain prompt and the rollout is masked out of the loss.
    contexts = teacher_contexts(rollouts, state.task, config.teacher.context)
    teacher_prompts = [state.tokenizer.encode_prompt(r.record.problem, context)
                       for r, context in zip(rollouts.rollouts, contexts)]
    pad = state.tokenizer.pad_id
    rows = training_rows(rollouts, config.trainer)
    mapping = config.loss.teacher_loop_for_each_student_loop(config.rollout.student_loops,
                                                             config.model.num_loops)
    teacher_loops = sorted(set(mapping))

    phase = time.perf_counter()
    teacher_readouts = teacher_readouts_for(
        state, [rollouts.micro_batch(group, pad, prompts=teacher_prompts) for group in rows],
        teacher_loops)
    timings["time_teacher_s"] = time.perf_counter() - phase

    masked = torch.tensor([context is None for context in contexts])
    student_micro_batches = []
    for group, readouts in zip(rows, teacher_readouts):
        micro_batch = rollouts.micro_batch(group, pad)
        micro_batch["loss_mask"][masked[group]] = 0.0
        micro_batch["teacher_readouts"] = readouts
        student_micro_batches.append(micro_batch)
    student = state.model
    # read before the optimizer step: a self-teacher's head is the student's own weight
    teacher_head = teacher_of(state).output_weight()

    def loss_func(micro_batch, output, normalizer):
        loss, metrics = distillation_loss(config.loss, student,
                                          output.readouts[:, micro_batch["response_window"]],
                                          micro_batch, teacher_loops, config.model.num_loops,
                                          teacher_head, normalizer)
        # α as a share too (the micro-batch's weight mass), so the step reports its weighted α
        metrics["loop_weights"] = metrics["loop_weights"] * normalizer.weights(
            micro_batch["loss_mask"], config.loss.aggregation).sum()
        return loss, metrics

    # The loss reads the readouts through the fused head: no [R̃, s, b, V/TP] logits needed.
    metrics = train_step(state.ddp_model, state.optimizer, state.scheduler,
                         student_micro_batches, loss_func,
                         num_loops=config.rollout.student_loops, compute_logits=False)
    timings["time_student_s"] = metrics.pop("time_forward_backward_s")
    timings["time_optimizer_s"] = metrics.pop("time_optimizer_s")

    phase = time.perf_counter()
    if config.teacher.mode == "ema":
        update_ema(state.teacher_model, student, config.teacher.ema_decay)
    refit = state.engine.refit(student)
    timings["time_ema_and_refit_s"] = time.perf_counter() - phase
    state.step += 1

    elapsed = time.perf_counter() - started
    metrics.update(timings)
    metrics.update(rollouts.metrics())
    metrics.update({key: dp_mean(value) for key, value in
                    context_metrics(contexts, config.teacher.context.kind).items()})
    trained_tokens = sum(float(batch["loss_mask"].sum()) for batch in student_micro_batches)
    metrics.update(
        step_time_s=elapsed,
        training_tokens_per_s=trained_tokens / max(
            timings["time_teacher_s"] + timings["time_student_s"], 1e-9),
        refit_s=getattr(refit, "seconds", float("nan")),
    )
    metrics.update(step_flops.llopsd(config, rollouts, teacher_prompts, teacher_loops, elapsed))
    state.collapse.observe(state.step, metrics)
    return metrics


def distillation_loss(loss_config: LoopDistillConfig, student, readouts: torch.Tensor,
                      micro_batch: dict, teacher_loops: list[int], num_teacher_loops: int,
                      teacher_head: torch.Tensor, normalizer: LossNormalizer | None = None):
    """The student's loss on its response-window readouts ``[R̃, T, b, h]`` through the fused
    head: the divergence over the whole vocabulary (``loss.objective: full``) or OPSD's
    sampled-token objective on the rollout's own tokens (``sampled_token``), normalized by the
    step's counts. The teacher's readouts go through ``teacher_head`` (its output weight shard)
    inside the loss as well."""
    sampled = loss_config.objective == "sampled_token"
    return fused_head_distillation_loss(
        readouts, student.output_weight(), micro_batch["teacher_readouts"],
        micro_batch["loss_mask"].t(), loss_config,
        parallel_state.get_tensor_model_parallel_group(), normalizer=normalizer,
        teacher_loop_ids=teacher_loops, num_teacher_loops=num_teacher_loops,
        token_ids=micro_batch["token_ids"] if sampled else None,
        teacher_output_weight=teacher_head)


def format_step(step: int, metrics: dict) -> str:
    divergence = " ".join(f"{d:.4f}" for d in metrics.get("divergence_per_loop", []))
    return (f"step {step:4d} | loss {metrics.get('loss', float('nan')):.4f} | D per loop "
            f"[{divergence}] | len {metrics['rollout_length']:.1f} | acc "
            f"{metrics['rollout_accuracy']:.2f} | gen {metrics['generation_tokens_per_s']:.0f} "
            f"tok/s | {metrics['step_time_s']:.2f}s")


def train(config: LLOPSDConfig) -> list[dict]:
    state = setup(config)
    return state.run.train(state, llopsd_step, format_step)
