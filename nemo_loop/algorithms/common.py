"""Training plumbing shared by every algorithm: DDP, the distributed optimizer, one step (and\nits loss-normalization contract, :func:`train_step`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from nemo_loop.losses.normalization import LossNormalizer
from nemo_loop.models.looplm.model import LoopGPTModel, LoopOutput, build_loop_model
from nemo_loop.models.looplm.pipeline import forward_backward_loops


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    decay_steps: int = 1000
    decay_style: str = "cosine"
    use_distributed_optimizer: bool = True

    def validate(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"optim: need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, "
                             f"min_lr={self.min_lr}")
        if self.decay_style not in ("constant", "linear", "cosine"):
            raise ValueError(f"optim.decay_style must be constant, linear or cosine, got "
                             f"{self.decay_style!r}")
        if self.warmup_steps < 0 or self.decay_steps < 1:
            raise ValueError("optim: warmup_steps must be >= 0 and decay_steps >= 1")


@dataclass
class TrainableModel:
    model: LoopGPTModel  # this rank's stage
    ddp_model: DistributedDataParallel
    optimizer: object
    scheduler: OptimizerParamScheduler

    def frozen_copy(self) -> LoopGPTModel:
        """A gradient-free copy of the current weights (EMA / frozen teacher, KL reference)."""
        copy = build_loop_model(self.model.config).requires_grad_(False).eval()
        copy.load_state_dict(self.model.state_dict())
        return copy


def build_trainable_model(config, run, train_only: str | None = None) -> TrainableModel:
    """Parallel state, this rank's stage of ``config.model``, its initial weights
    (``run.load_initial_weights``: before DDP and the optimizer copy them into their buffers and
    master params), DDP and the optimizer with its LR schedule. ``train_only``: a parameter
    name prefix; the other parameters are frozen, so DDP and the optimizer hold these alone."""
    from nemo_loop.utils.distributed import initialize_model_parallel

    parallel = config.parallel
    initialize_model_parallel(parallel, seed=config.trainer.seed)
    model = build_loop_model(config.model.transformer_config(
        parallel.tensor_parallel, parallel.pipeline_parallel, parallel.sequence_parallel))
    run.load_initial_weights(model)
    if train_only is not None:
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith(train_only))
    ddp_model = wrap_data_parallel(model, config.optim.use_distributed_optimizer)
    optimizer, scheduler = build_optimizer(ddp_model, config.optim)
    return TrainableModel(model, ddp_model, optimizer, scheduler)


def wrap_data_parallel(model: torch.nn.Module, use_distributed_optimizer: bool = True):
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer)
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def build_optimizer(ddp_model, optim: OptimConfig):
    optim.validate()
    config = ddp_model.module.config
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=optim.lr, min_lr=optim.min_lr,
                        weight_decay=optim.weight_decay, adam_beta1=optim.adam_beta1,
                        adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
                        clip_grad=optim.clip_grad, bf16=config.bf16, fp16=config.fp16,
                        params_dtype=config.params_dtype,
                        use_distributed_optimizer=optim.use_distributed_optimizer),
        [ddp_model])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if optim.warmup_steps else optim.lr, max_lr=optim.lr,
        min_lr=optim.min_lr, lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=max(optim.decay_steps, optim.warmup_steps + 1),
        lr_decay_style=optim.decay_style, start_wd=optim.weight_decay,
        end_wd=optim.weight_decay, wd_incr_steps=1, wd_incr_style="constant")
    return optimizer, scheduler


def check_token_budget(max_tokens_per_micro_batch: int | None, max_sequence_length: int) -> None:
    """``trainer.max_tokens_per_micro_batch`` holds any one row (null: fixed micro-batches)."""
    if max_tokens_per_micro_batch is not None and \
            max_tokens_per_micro_batch < max_sequence_length:
        raise ValueError(f"trainer.max_tokens_per_micro_batch {max_tokens_per_micro_batch} must "
                         f"be >= model.max_sequence_length {max_sequence_length} (a micro-batch "
                         f"must hold the longest row), or null for trainer.micro_batch_size rows "
                         f"per micro-batch")


# loss_func(micro_batch, output, normalizer) → (this micro-batch's share of the step's loss,
# its metrics), see train_step.
TrainLossFunc = Callable[[dict, LoopOutput, LossNormalizer], tuple[torch.Tensor, dict]]


def train_step(ddp_model, optimizer, scheduler, micro_batches: Sequence[dict],
               loss_func: TrainLossFunc, num_loops: int | None = None, logit_loops=None,
               compute_logits: bool = True) -> dict:
    """Gradient accumulation over ``micro_batches``, grad sync, clip, optimizer and LR step.

    The normalization contract of every algorithm: each micro-batch carries ``loss_mask``
    ``[b, ...]`` (batch-first, non-zero at the tokens its loss averages over); this function
    counts them once per step over all micro-batches and data-parallel ranks
    (:class:`~nemo_loop.losses.normalization.LossNormalizer`) and calls
    ``loss_func(micro_batch, output, normalizer)``, which returns the micro-batch's *share* of
    the step's loss — Σ weights·ℓ with ``normalizer.weights(...)`` — and metrics that are shares
    (or counts) likewise. The shares of every micro-batch and rank add up to the step's loss, so
    it and the update do not depend on the micro-batch size, packing or data-parallel layout.
    The returned metrics are those sums (on the last pipeline stage; empty elsewhere; ``loss``
    defaults to the loss's share) plus the grad norm and learning rate. ``logit_loops`` /
    ``compute_logits`` choose what the ``LoopOutput`` holds (see ``forward_backward_loops``).
    """
    started = time.perf_counter()
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    # Only the last pipeline stage computes a loss (other stages may lack its masks).
    normalizer = LossNormalizer.count(
        [batch["loss_mask"] for batch in micro_batches],
        parallel_state.get_data_parallel_group()) \
        if parallel_state.is_pipeline_last_stage() else None
    data_parallel = parallel_state.get_data_parallel_world_size()

    def share_of_the_step(micro_batch, output):
        loss, metrics = loss_func(micro_batch, output, normalizer)
        metrics.setdefault("loss", loss.detach())
        # DDP averages gradients over the data-parallel group; the shares must add up instead.
        return loss * data_parallel, metrics

    metrics = forward_backward_loops(ddp_model, micro_batches, share_of_the_step,
                                     num_loops=num_loops, logit_loops=logit_loops,
                                     compute_logits=compute_logits)
    finalize_model_grads([ddp_model])
    backward_done = time.perf_counter()
    loss_bad, grads_bad = non_finite_step(ddp_model, metrics)
    if loss_bad or grads_bad:
        # megatron's fp32 and bf16 optimizers apply NaN gradients (only fp16's loss scaler
        # checks for them): skipped here, on every rank alike — no update, no LR step.
        update_ok, grad_norm = False, float("nan") if grads_bad else None
    else:
        update_ok, grad_norm, _ = optimizer.step()
    if update_ok:
        scheduler.step(increment=1)
    summary = sum_metrics(metrics)
    summary["time_forward_backward_s"] = backward_done - started
    summary["time_optimizer_s"] = time.perf_counter() - backward_done
    summary["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    summary["lr"] = optimizer.param_groups[0]["lr"]
    summary["update_skipped"] = not update_ok
    summary["nonfinite_loss"], summary["nonfinite_grads"] = loss_bad, grads_bad
    return summary


def non_finite_step(ddp_model, micro_batch_metrics: list[dict]) -> tuple[bool, bool]:
    """Whether any rank's loss (the ``loss`` metric of its micro-batches, on the last stage)
    or gradients (its reduced grad buffers) hold a NaN or infinity: one all-reduce and one
    host copy, so every rank and stage decides alike. Under fp16 the loss scaler owns
    overflowing gradients."""
    device = torch.device("cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
    bad = [torch.zeros((), dtype=torch.bool, device=device)] * 2
    for metrics in micro_batch_metrics:
        if "loss" in metrics:
            loss = torch.as_tensor(metrics["loss"], device=device)
            bad[0] = bad[0] | ~torch.isfinite(loss).all()
    buffers = getattr(ddp_model, "buffers", None)  # megatron DDP's grad buffers
    if isinstance(buffers, list) and not getattr(ddp_model.module.config, "fp16", False):
        for buffer in buffers + ddp_model.expert_parallel_buffers:
            if buffer.grad_data is not None and buffer.grad_data.numel():
                # min and max propagate NaN and keep ±inf, without a full-size temporary
                low, high = torch.aminmax(buffer.grad_data)
                bad[1] = bad[1] | ~(torch.isfinite(low) & torch.isfinite(high)).to(device)
    flags = torch.stack(bad).to(torch.int32)
    if torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    loss_bad, grads_bad = flags.tolist()
    return bool(loss_bad), bool(grads_bad)


def sum_metrics(per_micro_batch: list[dict]) -> dict:
    """Sum over micro-batches, then over the data-parallel group. Tensors become lists/floats.

    Every metric travels in one flat vector: one all-reduce and one device-to-host copy per
    step, not one per metric (each host copy of a GPU tensor waits for the device).
    """
    if not per_micro_batch:
        return {}
    keys = list(per_micro_batch[0])
    device = next((m[key].device for m in per_micro_batch for key in keys
                   if isinstance(m[key], torch.Tensor)), torch.device("cpu"))
    sums = [torch.stack([torch.as_tensor(m[key], dtype=torch.float64, device=device)
                         for m in per_micro_batch]).sum(0) for key in keys]
    flat = torch.cat([total.reshape(-1) for total in sums])
    if parallel_state.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(flat, group=parallel_state.get_data_parallel_group())
    values = flat.cpu().split([total.numel() for total in sums])
    return {key: value.view(total.shape).tolist()
            for key, value, total in zip(keys, values, sums)}


@torch.no_grad()
def update_ema(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """θ′ ← τ·θ′ + (1 − τ)·θ, shard by shard (both models have the same layout)."""
    for teacher_param, student_param in zip(teacher.parameters(), student.parameters()):
        teacher_param.mul_(decay).add_(student_param.detach(), alpha=1.0 - decay)
