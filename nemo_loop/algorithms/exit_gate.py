"""Ouro's Stage II: train the exit gate of a trained LoopLM, everything else frozen — config,
setup, step and train.

The gate decides at inference when a token stops looping (``generation.exit.policy=q_exit``).
Pretraining learns it under Ouro's entropy-regularised loss, and a model post-trained afterwards
(LLOPSD, SFT, …) has loops that no longer match the gate it inherited. Stage II re-fits the gate
to the model's own loops: the loss (:mod:`nemo_loop.losses.exit_gate`) pushes the gate after
loop r towards "continue" exactly when loop r+1 still lowers the token's cross-entropy by more
than γ.

Data: the pretraining plumbing (``data.source``: the synthetic task's training sequences or a
tokenized text corpus, :func:`nemo_loop.algorithms.pretrain.training_source`). Weights:
``trainer.init_from`` (required) — any checkpoint the project writes; only ``exit_gate.*``
requires grad, so DDP and the optimizer hold the gate alone, and the frozen layers build no
autograd graph. Output: checkpoints as every algorithm, and the model-only checkpoint
``<output_dir>/model`` (the whole model with the new gate) for evaluation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from nemo_loop.algorithms import step_flops
from nemo_loop.algorithms.common import build_trainable_model, train_step
from nemo_loop.algorithms.pretrain import (
    PretrainConfig,
    PretrainState,
    TrainerConfig,
    training_source,
)
from nemo_loop.algorithms.training_run import TrainingRun
from nemo_loop.losses.exit_gate import exit_gate_loss

GATE_PARAMETERS = "exit_gate."


@dataclass
class ExitGateLossConfig:
    slope: float = 50.0  # k in w = σ(k·(I − γ))
    margin: float = 0.005  # γ: the loss improvement a further loop must bring

    def validate(self) -> None:
        if not self.slope > 0:
            raise ValueError(f"gate.slope (k) must be > 0, got {self.slope}")
        if self.margin < 0:
            raise ValueError(f"gate.margin (γ) must be >= 0, got {self.margin}")


@dataclass
class ExitGateConfig(PretrainConfig):
    gate: ExitGateLossConfig = field(default_factory=ExitGateLossConfig)
    output_dir: str = "runs/exit_gate"

    def validate(self, world_size: int | None = None, check_paths: bool = True) -> None:
        super().validate(world_size, check_paths)
        self.gate.validate()
        if not self.trainer.init_from:
            raise ValueError("trainer.init_from is required: Stage II trains the exit gate of a "
                             "trained model (a run directory, its checkpoints, a step or a "
                             "model-only directory)")
        if self.parallel.pipeline_parallel > 1:
            raise ValueError("exit-gate training needs parallel.pipeline_parallel=1: only the "
                             "last stage holds the gate, the others would train nothing")
        if self.model.num_loops < 2:
            raise ValueError("exit-gate training needs model.num_loops >= 2")
        if self.trainer.entropy_beta != TrainerConfig.entropy_beta:
            raise ValueError("trainer.entropy_beta is Ouro's pretraining loss; Stage II does "
                             "not use it (its loss is set in the gate section)")


def setup(config: ExitGateConfig) -> PretrainState:
    """The data source, the run (storage checked first), the model from ``trainer.init_from``
    with everything but the gate frozen, the gate's optimizer, and the resumed checkpoint."""
    source = training_source(config)
    config.validate(torch.distributed.get_world_size())
    run = TrainingRun(config, source.tokenizer)
    state = PretrainState(config, build_trainable_model(config, run, train_only=GATE_PARAMETERS),
                          run, source=source)
    run.resume(state)
    return state


def gate_step(state: PretrainState) -> dict:
    config, step = state.config, state.step + 1
    micro_batches = state.source.micro_batches(step)

    def loss_func(batch, output, normalizer):
        return exit_gate_loss(output, batch["labels"], batch["loss_mask"], config.gate.slope,
                              config.gate.margin, normalizer)

    started = time.perf_counter()
    metrics = train_step(state.ddp_model, state.optimizer, state.scheduler, micro_batches,
                         loss_func)
    metrics["step_time_s"] = time.perf_counter() - started
    metrics.update(step_flops.exit_gate(config, micro_batches, metrics["step_time_s"]))
    state.step = step
    return metrics


def train(config: ExitGateConfig) -> list[dict]:
    """Train the gate to ``trainer.max_steps`` (resuming from the newest checkpoint), saving at
    ``trainer.save_interval``, at the end and on preemption; then ``<output_dir>/model``."""
    state = setup(config)
    history = state.run.train(state, gate_step, format_step, log_first_step=True)
    state.run.save_final_model(state.model)
    return history


def format_step(step: int, metrics: dict) -> str:
    def per_loop(key):
        return " ".join(f"{v:.2f}" for v in metrics[key])

    return (f"step {step:4d} | gate BCE {metrics['loss']:.4f} | continue target "
            f"[{per_loop('continue_target_per_loop')}] | gate exit p "
            f"[{per_loop('gate_exit_prob_per_loop')}] | CE per loop "
            f"[{per_loop('ce_per_loop')}] | {metrics['step_time_s']:.2f}s")
