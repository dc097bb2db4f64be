"""LoopRPT — reinforcement pre-training of a LoopLM's loops (arXiv 2603.19714): config, setup,
step and train.

A pretraining method: it reads the same sequences as Ouro pretraining (``data.source``: the
synthetic task or a tokenized text corpus, :mod:`nemo_loop.algorithms.pretrain_data`) and
replaces Ouro's loss by LoopRPT's (:mod:`nemo_loop.losses.looprpt`). Each step, per micro-batch
of b sequences:

1. the EMA teacher runs all R loops, forward only → per-loop gold log-probs and entropies
   through the fused head, its exit distribution → hard tokens, t_ref, b_s, λ_s;
2. the student runs (1 + G)·b rows in one pass through the loop pipeline: the clean sequences
   and G noisy copies of each, whose readouts get σ·ε after the final norm of every loop
   (:class:`LatentNoise`, passed to the model's loop API as the micro-batch's
   ``readout_transform``); the loss reads every row's per-loop gold log-prob and exit
   distribution, backward, optimizer step;
3. θ_T ← τ·θ_T + (1 − τ)·θ_S.

Cost per step relative to Ouro pretraining on the same batch: one teacher forward plus G + 1
student forwards and backwards (G + 2 forwards in all) instead of one forward and backward —
about (1 + 3·(G + 1))/3 ≈ 9.3× the model FLOPs at G = 8 (``flops_teacher``/``flops_student``
in the metrics), and G + 1 times the activation memory of a micro-batch.

Noise and the exit draws are seeded by (``trainer.seed``, step, global row, loop): every TP rank
adds the same noise, the micro-batch and DP layouts do not change it, and, with step-indexed
data, a resumed run repeats the uninterrupted one exactly. Checkpoints hold the EMA teacher.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state

from nemo_loop.algorithms import step_flops
from nemo_loop.algorithms.common import build_trainable_model, train_step, update_ema
from nemo_loop.algorithms.pretrain import (
    PretrainConfig,
    PretrainState,
    TrainerConfig,
    format_heldout,
    heldout_scores,
    training_source,
)
from nemo_loop.algorithms.pretrain_data import my_rows
from nemo_loop.algorithms.training_run import TrainingRun
from nemo_loop.losses.looprpt import (
    LoopRPTLossConfig,
    TeacherReference,
    gold_is_argmax,
    looprpt_loss,
    teacher_reference,
)
from nemo_loop.losses.normalization import LossNormalizer
from nemo_loop.losses.token_logprobs import token_logprobs
from nemo_loop.models.looplm.model import exit_log_distribution
from nemo_loop.models.looplm.pipeline import forward_backward_loops

EXIT_DRAWS = 0  # seed stream of the exit draws; loops 1..R are the noise streams


@dataclass
class LoopRPTSettings(LoopRPTLossConfig):
    """The ``looprpt`` section: the loss coefficients and the rollouts and teacher."""

    num_rollouts: int = 8  # G noisy latent rollouts per sequence
    noise_std: float = 0.1  # σ of the Gaussian noise after the final norm of every loop
    ema_decay: float = 0.995  # τ: θ_T ← τ·θ_T + (1 − τ)·θ_S after each step

    def validate(self, num_loops: int) -> None:
        super().validate(num_loops)
        if self.num_rollouts < 2:
            raise ValueError(f"looprpt.num_rollouts must be >= 2 (returns are normalised over "
                             f"the G rollouts of a token), got {self.num_rollouts}")
        if self.noise_std < 0:
            raise ValueError(f"looprpt.noise_std must be >= 0, got {self.noise_std}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"looprpt.ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class LoopRPTConfig(PretrainConfig):
    looprpt: LoopRPTSettings = field(default_factory=LoopRPTSettings)
    output_dir: str = "runs/looprpt"

    def validate(self, world_size: int | None = None, check_paths: bool = True) -> None:
        super().validate(world_size, check_paths)
        self.looprpt.validate(self.model.num_loops)
        if self.parallel.sequence_parallel:
            raise ValueError("LoopRPT does not support parallel.sequence_parallel: its loss "
                             "reads every loop through the fused head, which needs the whole "
                             "sequence on each tensor-parallel rank")
        if self.trainer.entropy_beta != TrainerConfig.entropy_beta:
            raise ValueError("trainer.entropy_beta is Ouro's loss and LoopRPT does not use it; "
                             "its exit-gate entropy bonus is looprpt.gate_entropy_coef")


@dataclass(kw_only=True)
class LoopRPTState(PretrainState):
    teacher: torch.nn.Module  # the EMA teacher

    def extra_modules(self) -> dict:
        return {"teacher": self.teacher}


def setup(config: LoopRPTConfig) -> LoopRPTState:
    """The data source, the run (storage checked first), the student from ``trainer.init_from``
    or a fresh init, its optimizer, the EMA teacher (a copy of the student), and the resumed
    checkpoint if any."""
    source = training_source(config)
    config.validate(torch.distributed.get_world_size())
    run = TrainingRun(config, source.tokenizer, model_copies=2)
    trainable = build_trainable_model(config, run)
    state = LoopRPTState(config, trainable, run, source=source,
                         teacher=trainable.frozen_copy())
    run.resume(state)
    return state


def _generator(seed: int, step: int, row: int, stream: int, device=None) -> torch.Generator:
    # Python hashes tuples of ints the same in every process (no hash randomisation for ints).
    # On the readout's device: GPU runs draw the noise there (same values on every TP rank).
    return torch.Generator(device=device or "cpu").manual_seed(
        hash((seed, step, row, stream)) & (2 ** 63 - 1))


class LatentNoise:
    """The readout transform of the noisy copies: σ·ε after the final norm of every loop on
    the columns b.. of a micro-batch (the clean rows 0..b−1 untouched), ε ~ N(0, 1) drawn per
    (seed, step, global row, loop)."""

    def __init__(self, std: float, rows: range, copies: int, seed: int, step: int):
        self.std, self.rows, self.copies, self.seed, self.step = std, rows, copies, seed, step

    def __call__(self, readout: torch.Tensor, loop: int) -> torch.Tensor:
        seq, _, hidden = readout.shape
        clean = len(self.rows)
        device = readout.device
        noise = torch.stack([torch.randn(self.copies, seq, hidden, device=device,
                                         generator=_generator(self.seed, self.step, row, loop,
                                                              device))
                             for row in self.rows], dim=2)  # [G, s, b, h]
        noise = noise.transpose(0, 1).reshape(seq, self.copies * clean, hidden)
        return torch.cat([readout[:, :clean],
                          readout[:, clean:] + self.std * noise.to(readout)], dim=1)


def exit_uniforms(rows: range, copies: int, seq: int, seed: int, step: int) -> torch.Tensor:
    """``[s, G·b]`` U(0, 1) draws that pick each noisy trajectory's exit loop."""
    draws = torch.stack([torch.rand(copies, seq, generator=_generator(seed, step, row,
                                                                        EXIT_DRAWS))
                         for row in rows], dim=2)  # [G, s, b]
    return draws.transpose(0, 1).reshape(seq, copies * len(rows))


@torch.no_grad()
def teacher_references(teacher, micro_batches: list[dict], config: LoopRPTConfig
                       ) -> list[TeacherReference]:
    """Per micro-batch, what the teacher fixes (on the last pipeline stage; [] elsewhere)."""
    outputs = forward_backward_loops(teacher, micro_batches, None, compute_logits=False,
                                     forward_only=True)
    references = []
    for batch, output in zip(micro_batches, outputs):
        targets = batch["labels"].t().to(output.readouts.device)
        logp, entropy = token_logprobs(output.readouts, teacher.output_weight(),
                                       targets.expand(output.readouts.shape[0], *targets.shape),
                                       parallel_state.get_tensor_model_parallel_group())
        references.append(teacher_reference(logp, entropy, output.exit_probs,
                                            batch["loss_mask"].t().to(logp.device),
                                            config.looprpt, config.model.vocab_size))
    return references


def rollout_batch(batch: dict, reference: TeacherReference | None, rows: range, step: int,
                  config: LoopRPTConfig) -> dict:
    """The student's micro-batch: the b clean sequences then G noisy copies of them
    (copy-major), the latent noise, the exit draws and the teacher's reference. Its
    ``loss_mask`` (``[b, s]``, what ``train_step`` normalizes by) is the teacher's hard tokens;
    ``token_mask`` keeps every target token for the metrics over all of them."""
    copies = config.looprpt.num_rollouts
    expanded = {key: batch[key].repeat(copies + 1, *([1] * (batch[key].dim() - 1)))
                for key in ("input_ids", "position_ids", "attention_mask") if key in batch}
    seq = batch["input_ids"].shape[1]
    expanded.update(
        labels=batch["labels"], token_mask=batch["loss_mask"], teacher=reference,
        readout_transform=LatentNoise(config.looprpt.noise_std, rows, copies,
                                      config.trainer.seed, step),
        exit_uniforms=exit_uniforms(rows, copies, seq, config.trainer.seed, step))
    if reference is not None:  # the last pipeline stage
        expanded["loss_mask"] = reference.hard.t().to(batch["loss_mask"])
    return expanded


def micro_batch_loss(student, batch: dict, output, config: LoopRPTConfig,
                     normalizer: LossNormalizer, token_normalizer: LossNormalizer):
    """This micro-batch's share of the step's LoopRPT loss (every row, every loop through the
    fused head; the hard tokens weighted over the whole step by ``normalizer``), plus per-loop
    accuracy on all tokens (weighted by ``token_normalizer``) and on hard tokens of the clean
    rows."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    readouts = output.readouts  # [R, s, (1+G)·b, h]
    targets = batch["labels"].t().to(readouts.device)  # [s, b]
    clean = targets.shape[1]
    rows = targets.repeat(1, readouts.shape[2] // clean)
    logp, _ = token_logprobs(readouts, student.output_weight(),
                             rows.expand(readouts.shape[0], *rows.shape), tp_group)
    reference = batch["teacher"]
    aggregation = config.loss.aggregation
    hard_weights = normalizer.weights(batch["loss_mask"], aggregation).t().to(logp)
    token_weights = token_normalizer.weights(batch["token_mask"], aggregation).t().to(logp)
    loss, metrics = looprpt_loss(logp, exit_log_distribution(output.exit_logits), reference,
                                 batch["exit_uniforms"].to(logp.device),
                                 batch["token_mask"].t().to(logp), config.looprpt,
                                 hard_weights, token_weights)
    with torch.no_grad():
        correct = torch.stack([gold_is_argmax(student.logits(readout[None, :, :clean])[0],
                                              targets, tp_group)
                               for readout in readouts]).to(logp)  # [R, s, b]
        metrics["accuracy_per_loop"] = (correct * token_weights).sum((1, 2))
        metrics["hard_accuracy_per_loop"] = (correct * hard_weights).sum((1, 2))
    return loss, metrics


def looprpt_step(state: LoopRPTState, step: int) -> dict:
    config = state.config
    started = time.perf_counter()
    clean = state.source.micro_batches(step)
    references = teacher_references(state.teacher, clean, config)
    last_stage = bool(references)
    if not last_stage:  # no loss here
        references = [None] * len(clean)
    teacher_done = time.perf_counter()
    batches = [rollout_batch(batch, reference, rows, step, config)
               for batch, reference, rows in zip(clean, references, my_rows(config, step))]
    student = state.model
    # The metrics over all target tokens are normalized by their own step-wide count.
    token_normalizer = LossNormalizer.count(
        [batch["loss_mask"] for batch in clean],
        parallel_state.get_data_parallel_group()) if last_stage else None

    def loss_func(batch, output, normalizer):
        return micro_batch_loss(student, batch, output, config, normalizer, token_normalizer)

    metrics = train_step(state.ddp_model, state.optimizer, state.scheduler, batches, loss_func)
    ema_started = time.perf_counter()
    update_ema(state.teacher, student, config.looprpt.ema_decay)
    finished = time.perf_counter()
    metrics.update(time_teacher_s=teacher_done - started, time_ema_s=finished - ema_started,
                   step_time_s=finished - started)
    metrics.update(step_flops.looprpt(config, clean, metrics["step_time_s"]))
    state.step = step
    return metrics


def train(config: LoopRPTConfig) -> list[dict]:
    """Train to ``trainer.max_steps`` (resuming from the newest checkpoint) with checkpoints at
    ``trainer.save_interval``, at the end and on preemption; held-out metrics of the source
    every ``trainer.eval_interval`` steps (validation) and after the last step (validation and
    test); then the model-only checkpoint ``<output_dir>/model``."""
    state = setup(config)
    history = state.run.train(state, lambda state: looprpt_step(state, state.step + 1),
                              format_step, log_first_step=True, heldout=heldout_scores(state))
    state.run.save_final_model(state.model)
    return history


def format_step(step: int, metrics: dict) -> str:
    """The step line (a record with the step's metrics) and the held-out line (with scores)."""
    if "hard_ce_per_loop" not in metrics:
        return "\n".join(format_heldout(metrics))

    def per_loop(key, digits=3):
        return " ".join(f"L{r + 1}={v:.{digits}f}" for r, v in enumerate(metrics[key]))

    exits = " ".join(f"{p:.2f}" for p in metrics["exit_prob_per_loop"])
    return "\n".join([
        f"step {step:4d} | loss {metrics['loss']:.4f} | hard CE {per_loop('hard_ce_per_loop')}"
        f" | hard acc {per_loop('hard_accuracy_per_loop', 2)} | exit p [{exits}] | t_ref "
        f"{metrics['teacher_exit_loop']:.2f} | grad_norm {metrics['grad_norm']:.3f} | "
        f"{metrics['step_time_s']:.2f}s", *format_heldout(metrics)])
