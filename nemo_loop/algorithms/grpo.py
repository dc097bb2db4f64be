"""GRPO on the LoopLM's student loop budget R̃: config, setup, step and train.

Each step: sample prompts; generate G = ``rollout.samples_per_prompt`` rollouts per prompt at R̃
loops with the engine (``nemo_loop.algorithms.rollouts``); reward 1/0 from the task's verifier;
group-normalised advantages Â_i = (r_i − mean)/(std + ε) on every token of y_i; then
``trainer.updates_per_batch`` optimizer steps on the PPO-clip objective at loop R̃ with the
rollout-time log-probs as π_old (with one update the policy is the one that sampled: ρ = 1 up
to the engine's numerics and the gradient is the plain policy gradient), plus β·k3 KL to a
frozen reference (the initial weights; none when β = 0); finally the engine is refit. π_θ,
π_old and π_ref are all the final loop's distribution at ``rollout.temperature`` (greedy and
top-k/top-p sampling are refused at load time, :func:`check_sampled_distribution`), and the
loss is normalized over the whole step (``common.train_step``).

RLTT (``rltt.py``) and OISD (``oisd.py``) are the same loop with another :class:`Objective`: it
names the loops the loss reads out, computes one micro-batch's loss and may hold trainable
state of its own (RLTT's learned loop weights, checkpointed through :class:`GRPOState`).
Everything else — rollouts, micro-batches, reference log-probs, the optimizer step — is this
file's; checkpoints, resume, the loop and logging are ``TrainingRun``'s.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from megatron.core import parallel_state

from nemo_loop.algorithms import step_flops
from nemo_loop.algorithms.common import (
    OptimConfig,
    build_trainable_model,
    train_step,
)
from nemo_loop.algorithms.rollouts import (
    RolloutBatch,
    RolloutConfig,
    collect_rollouts,
    training_rows,
    validate_rollout_run,
)
from nemo_loop.algorithms.training_run import (
    CheckpointConfig,
    CheckpointedTrainerConfig,
    TrainerState,
    TrainingRun,
)
from nemo_loop.data.chat import ChatTokenizer
from nemo_loop.data.prompts import PromptSampler, PromptSetConfig, load_prompt_set
from nemo_loop.generation.backend import GenerationConfig, build_engine
from nemo_loop.generation.engine import GenerationEngine
from nemo_loop.losses.normalization import LossNormalizer
from nemo_loop.losses.policy_gradient import (
    PolicyLossConfig,
    group_advantages,
    grpo_loss,
)
from nemo_loop.losses.token_logprobs import token_logprobs
from nemo_loop.models.looplm.config import LoopModelConfig
from nemo_loop.models.looplm.model import LoopOutput
from nemo_loop.models.looplm.pipeline import forward_backward_loops
from nemo_loop.tasks import Task, TaskConfig, build_task
from nemo_loop.utils.distributed import ParallelConfig
from nemo_loop.utils.logging import WandbConfig


@dataclass
class GRPOTrainerConfig(CheckpointedTrainerConfig):
    # save_interval, checkpoint_dir, resume, overwrite, init_from: CheckpointedTrainerConfig
    max_steps: int = 4
    prompts_per_step: int = 4  # global, across data-parallel ranks; G rollouts each
    micro_batch_size: int = 8  # rollouts per micro-batch (at most, with a token budget)
    # Token budget of a micro-batch (rows × padded length; NeMo-RL's dynamic batching): rollouts
    # sorted by length and packed; null: micro_batch_size rollouts each, in order.
    max_tokens_per_micro_batch: int | None = None
    updates_per_batch: int = 1  # optimizer steps on each batch of rollouts (1: on-policy)
    log_interval: int = 1
    seed: int = 1234


@dataclass
class GRPOConfig:
    ALGORITHM: ClassVar[str] = "GRPO"

    model: LoopModelConfig = field(default_factory=LoopModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: GRPOTrainerConfig = field(default_factory=GRPOTrainerConfig)
    # Defaults: the published RLTT code's (G = 8, lr 1e-6, KL 0.001, grad clip 0.1,
    # temperature 1.0), so that GRPO and RLTT differ only in their objective.
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=1e-6, min_lr=1e-6, clip_grad=0.1, decay_style="constant"))
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)  # kl_coef 0.001
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(
        samples_per_prompt=8, temperature=1.0))
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # rollout engine
    task: TaskConfig = field(default_factory=TaskConfig)  # prompts, verifier → rewards
    data: PromptSetConfig = field(default_factory=PromptSetConfig)  # the training prompts
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    output_dir: str = "runs/grpo"

    def validate(self, world_size: int | None = None, check_paths: bool = True) -> None:
        validate_rollout_run(self, world_size, check_paths, self.ALGORITHM)
        self.loss.validate()
        if self.rollout.samples_per_prompt < 2:
            raise ValueError(f"rollout.samples_per_prompt (G) must be >= 2 for "
                             f"{self.ALGORITHM}: group-normalised advantages need a group, got "
                             f"G={self.rollout.samples_per_prompt}")
        if self.trainer.updates_per_batch < 1:
            raise ValueError(f"trainer.updates_per_batch must be >= 1, got "
                             f"{self.trainer.updates_per_batch}")
        check_sampled_distribution(self.rollout, self.ALGORITHM)


def check_sampled_distribution(rollout: RolloutConfig, algorithm: str) -> None:
    """The policy gradient is taken on the distribution the rollouts were drawn from: the
    trainer's log-probs are softmax(logits / rollout.temperature), π_old the engine's log-prob
    under that same distribution. Greedy decoding and top-k/top-p truncation have no such
    log-prob on the trainer's side, so they are refused here, before any work."""
    if rollout.temperature == 0:
        raise ValueError(
            f"rollout.temperature=0 (greedy) cannot train {algorithm}: a greedy rollout is a "
            f"point mass with no log-prob gradient, and the G rollouts of a prompt would be "
            f"identical (every group-normalised advantage 0); sample with a temperature > 0")
    if rollout.top_p < 1 or rollout.top_k > 0:
        raise ValueError(
            f"rollout.top_p={rollout.top_p} / rollout.top_k={rollout.top_k}: {algorithm}'s "
            f"ratio π_θ/π_old would compare the full distribution with a truncated one; set "
            f"rollout.top_p=1 and rollout.top_k=0 (temperature alone is matched exactly)")


class Objective:
    """GRPO's objective at the final loop R̃. Subclasses change what the loss reads and adds."""

    def __init__(self, config: GRPOConfig, model: torch.nn.Module):
        self.config = config
        self.model = model  # this rank's LoopGPTModel (not the DDP wrapper)
        self.student_loops = config.rollout.student_loops
        self.tp_group = parallel_state.get_tensor_model_parallel_group()

    def logit_loops(self) -> list[int]:
        """The loops whose readouts the loss reads (the LoopOutput's ``readouts`` rows)."""
        return [self.student_loops]

    def extra_modules(self) -> dict:
        """Trainable or fixed modules to checkpoint beside the model."""
        return {}

    def state_dict(self) -> dict:
        """JSON state to checkpoint (e.g. a small optimizer's moments)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def recording(self):
        """A context active during each update's forward/backward (e.g. an attention probe)."""
        return contextlib.nullcontext()

    def before_update(self) -> None:
        pass

    def after_update(self) -> None:
        pass

    def logprobs(self, readout: torch.Tensor, micro_batch: dict
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log π(y), entropy) ``[T, b]`` of one loop's readout at the rollout temperature: the
        distribution the engine sampled from, π_old's."""
        return token_logprobs(readout[micro_batch["response_window"]],
                              self.model.output_weight(), micro_batch["token_ids"],
                              self.tp_group, self.config.loss.chunk_size,
                              self.config.rollout.temperature)

    def token_weights(self, micro_batch: dict, normalizer: LossNormalizer) -> torch.Tensor:
        """``[T, b]`` aggregation weights of the response tokens over the whole step."""
        return normalizer.weights(micro_batch["loss_mask"], self.config.loss.aggregation).t()

    def loss(self, micro_batch: dict, output: LoopOutput, normalizer: LossNormalizer
             ) -> tuple[torch.Tensor, dict]:
        """This micro-batch's share of the step's loss and metrics (``train_step``'s
        contract)."""
        weights = self.token_weights(micro_batch, normalizer)
        logp, entropy = self.logprobs(output.readouts[-1], micro_batch)
        loss, metrics = grpo_loss(logp, micro_batch["old_logprobs"], micro_batch["advantages"],
                                  weights, self.config.loss, micro_batch.get("reference_logprobs"))
        metrics["entropy"] = (weights * entropy).sum()
        return loss, metrics


@dataclass(kw_only=True)
class GRPOState(TrainerState):
    reference_model: torch.nn.Module | None  # the initial weights; None when loss.kl_coef = 0
    objective: Objective
    task: Task
    tokenizer: ChatTokenizer
    records: list
    engine: GenerationEngine | None = None  # built once the weights are final (after resume)

    def extra_modules(self) -> dict:
        modules = dict(self.objective.extra_modules())
        if self.reference_model is not None:
            modules["reference"] = self.reference_model
        return modules

    def state_dict(self) -> dict:
        return {**super().state_dict(), "objective": self.objective.state_dict()}

    def load_state_dict(self, saved: dict) -> None:
        super().load_state_dict(saved)
        self.objective.load_state_dict(saved.get("objective", {}))


def setup(config: GRPOConfig, objective_class: type[Objective] = Objective) -> GRPOState:
    config.validate(torch.distributed.get_world_size())
    task = build_task(config.task)
    tokenizer = task.tokenizer()
    tokenizer.check_fits(config.model.vocab_size)
    uses_reference = config.loss.kl_coef > 0
    run = TrainingRun(config, tokenizer, model_copies=2 if uses_reference else 1)
    trainable = build_trainable_model(config, run)
    records = load_prompt_set(config.data)
    state = GRPOState(
        config, trainable, run, PromptSampler(len(records), config.trainer.seed),
        reference_model=trainable.frozen_copy() if uses_reference else None,
        objective=objective_class(config, trainable.model), task=task, tokenizer=tokenizer,
        records=records)
    run.resume(state)
    # After resume: a vLLM engine starts with a copy of the weights it is built from.
    state.engine = build_engine(config.generation, state.model)
    return state


def policy_micro_batches(state: GRPOState, rollouts: RolloutBatch) -> list[dict]:
    """This rank's micro-batches (:meth:`RolloutBatch.micro_batch`: aligned sequences, response
    ids, loss mask, rollout-time log-probs as π_old) with group-normalised advantages."""
    config = state.config
    advantages = group_advantages(rollouts.rewards(), rollouts.samples_per_prompt,
                                  config.loss.advantage_eps)
    micro_batches = []
    for rows in training_rows(rollouts, config.trainer):
        micro_batch = rollouts.micro_batch(rows, state.tokenizer.pad_id)
        micro_batch.update(advantages=advantages[rows], step=state.step)
        micro_batches.append(micro_batch)
    return micro_batches


@torch.no_grad()
def add_reference_logprobs(state: GRPOState, micro_batches: list[dict]) -> None:
    """log π_ref(y) at loop R̃ of the frozen reference and the rollout temperature, per
    micro-batch (for the k3 KL)."""
    reference, loops = state.reference_model, state.config.rollout.student_loops
    outputs = forward_backward_loops(reference, micro_batches, None, num_loops=loops,
                                     logit_loops=[loops], compute_logits=False, forward_only=True)
    group = parallel_state.get_tensor_model_parallel_group()
    for micro_batch, output in zip(micro_batches, outputs):
        logp, _ = token_logprobs(output.readouts[-1, micro_batch["response_window"]],
                                 reference.output_weight(), micro_batch["token_ids"], group,
                                 state.config.loss.chunk_size, state.config.rollout.temperature)
        micro_batch["reference_logprobs"] = logp


def train_on_rollouts(state: GRPOState, rollouts: RolloutBatch) -> dict:
    """``trainer.updates_per_batch`` optimizer steps on this rank's rollouts, then the engine
    is refit and the step counted. Metrics are averaged over the updates."""
    config = state.config
    timings = {}
    micro_batches = policy_micro_batches(state, rollouts)
    phase = time.perf_counter()
    if state.reference_model is not None:
        add_reference_logprobs(state, micro_batches)
    timings["time_reference_s"] = time.perf_counter() - phase

    objective = state.objective
    updates = []
    for _ in range(config.trainer.updates_per_batch):
        objective.before_update()
        with objective.recording():
            updates.append(train_step(state.ddp_model, state.optimizer, state.scheduler,
                                      micro_batches, objective.loss,
                                      num_loops=config.rollout.student_loops,
                                      logit_loops=objective.logit_loops(),
                                      compute_logits=False))
        objective.after_update()
    metrics = _mean_over_updates(updates)
    timings["time_update_s"] = metrics.pop("time_forward_backward_s") + metrics.pop(
        "time_optimizer_s")

    phase = time.perf_counter()
    refit = state.engine.refit(state.model)
    timings["time_refit_s"] = time.perf_counter() - phase
    state.step += 1
    metrics.update(timings)
    metrics.update(rollouts.metrics())
    metrics["refit_s"] = getattr(refit, "seconds", float("nan"))
    return metrics


def _mean_over_updates(updates: list[dict]) -> dict:
    if len(updates) == 1:
        return updates[0]
    merged = {}
    for key, value in updates[0].items():
        values = [update[key] for update in updates]
        if isinstance(value, list):
            merged[key] = [sum(column) / len(values) for column in zip(*values)]
        elif isinstance(value, bool):
            merged[key] = any(values)
        else:
            merged[key] = sum(values) / len(values)
    return merged


def policy_step(state: GRPOState) -> dict:
    """One step of GRPO (or of RLTT/OISD, whose states carry their objective)."""
    started = time.perf_counter()
    rollouts = collect_rollouts(state)
    generated = time.perf_counter()
    metrics = train_on_rollouts(state, rollouts)
    metrics["time_generate_s"] = generated - started
    metrics["step_time_s"] = time.perf_counter() - started
    metrics.update(step_flops.policy(state.config, rollouts, state.objective.logit_loops(),
                                     state.reference_model is not None, metrics["step_time_s"]))
    return metrics


def format_step(step: int, metrics: dict) -> str:
    kl = f" | kl {metrics['kl']:.4f}" if "kl" in metrics else ""
    return (f"step {step:4d} | loss {metrics.get('loss', float('nan')):.4f} | reward "
            f"{metrics['rollout_accuracy']:.2f} | len {metrics['rollout_length']:.1f} | entropy "
            f"{metrics.get('entropy', float('nan')):.3f}{kl} | clip "
            f"{metrics.get('clip_fraction', 0.0):.2f} | {metrics['step_time_s']:.2f}s")


def train_policy(config: GRPOConfig, objective_class: type[Objective] = Objective
                 ) -> list[dict]:
    """Train to ``trainer.max_steps`` (resuming from the newest checkpoint), saving at
    ``trainer.save_interval``, at the end and on preemption."""
    state = setup(config, objective_class)
    return state.run.train(state, policy_step, format_step)


def train(config: GRPOConfig) -> list[dict]:
    return train_policy(config, Objective)
