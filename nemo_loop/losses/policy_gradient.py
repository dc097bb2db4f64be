"""Policy-gradient losses on group rollouts: GRPO's clipped surrogate with a k3 KL, and RLTT's
loop-weighted policy gradient.

Notation: a prompt x has a group of G responses y_1..y_G with rewards r_i; tensors are
megatron's ``[T, n]`` (response token j, sequence i); ``weights`` ``[T, n]`` are the aggregation
weights of the response tokens (0 elsewhere), so a loss is Σ weights · ℓ (see
:mod:`nemo_loop.losses.normalization`: token mean or sequence mean over the training step).

* Group-normalised advantage Â_i = (r_i − mean_group r) / (std_group r + ε), broadcast over
  the response's tokens; std is the sample standard deviation (as in TRL's and verl's GRPO).
* GRPO (per token): −min(ρ·Â, clip(ρ, 1 − ε_low, 1 + ε_high)·Â) + β·k3, with
  ρ = π_θ(y_j)/π_old(y_j), both at the rollout temperature (π_old: the log-prob under the
  distribution the engine sampled from); k3 = e^{ref − logp} − (ref − logp) − 1 (Schulman's
  unbiased, non-negative KL(π_θ ‖ π_ref) estimator) against the frozen reference.
* Safety clamps (verl's and NeMo-RL's): ``max_log_ratio`` bounds log ρ and the k3 log-ratio
  before the exponential (verl: ±20); ``k3_clamp`` caps k3 (verl: 10); ``dual_clip`` c > 1
  caps the loss of a negative-advantage token at −c·Â (Ye et al. 2020, "dual-clip PPO"; verl's
  ``clip_ratio_c``, NeMo-RL's ``ratio_clip_c``), so one stale token cannot dominate a step.
* RLTT (per token): −Â · Σ_t ω_t·log p^(t)(y_j) + β·k3 on the final loop, with ω ∈
  {uniform 1/R̃, progressive t^γ / Σ s^γ, exit_pdf = the model's per-token exit distribution
  (differentiable: the gradient trains the exit gate), learned = softmax of a learnable vector}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nemo_loop.losses.loop_mapping import loop_weights
from nemo_loop.losses.normalization import check_aggregation

RLTT_WEIGHTINGS = ("uniform", "progressive", "exit_pdf", "learned")


@dataclass
class PolicyLossConfig:
    """The policy-gradient loss shared by GRPO, RLTT and OISD (section ``loss``)."""

    clip_low: float = 0.2  # ε_low of the PPO ratio clip
    clip_high: float = 0.2  # ε_high (DAPO's clip-higher when > clip_low)
    kl_coef: float = 0.001  # β of the k3 KL to the frozen reference (0: no reference model)
    aggregation: str = "sequence_mean"  # sequence_mean (GRPO/RLTT papers) | token_mean
    advantage_eps: float = 1e-6  # ε in (r − mean)/(std + ε)
    chunk_size: int | None = 1024  # tokens per chunk of the fused head (log-probs, entropy)
    # Dual-clip PPO: c > 1 caps a negative-advantage token's loss at −c·Â (null: off, the
    # DeepSeekMath/RLTT objective; verl's default is 3).
    dual_clip: float | None = None
    # |log ρ| and |log π_ref − log π| clamped here before the exponential (verl's 20; it is the
    # identity below e^20, so finite runs are unchanged; null: no clamp).
    max_log_ratio: float | None = 20.0
    # Upper clamp of each token's k3 (verl's 10; null: unclamped, this project's default).
    k3_clamp: float | None = None

    def validate(self) -> None:
        for name in ("clip_low", "clip_high", "kl_coef", "advantage_eps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"loss.{name} must be a finite number >= 0, got {value}")
        if self.clip_low >= 1:
            raise ValueError(f"loss.clip_low must be < 1 (the ratio's lower bound is "
                             f"1 − clip_low), got {self.clip_low}")
        check_aggregation("loss.aggregation", self.aggregation)
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"loss.chunk_size must be >= 1 or null, got {self.chunk_size}")
        if self.dual_clip is not None and not (math.isfinite(self.dual_clip)
                                               and self.dual_clip > 1):
            raise ValueError(f"loss.dual_clip must be a finite number > 1 (or null: off), got "
                             f"{self.dual_clip}")
        for name in ("max_log_ratio", "k3_clamp"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"loss.{name} must be a finite number > 0 (or null: off), got "
                                 f"{value}")


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Â_i = (r_i − mean) / (std + ε) within consecutive groups of ``group_size`` rewards."""
    if group_size < 2:
        raise ValueError(f"group-normalised advantages need groups of >= 2 samples, got "
                         f"{group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be a vector of whole groups of {group_size}, got shape "
                         f"{tuple(rewards.shape)}")
    groups = rewards.double().view(-1, group_size)
    centered = groups - groups.mean(1, keepdim=True)
    std = groups.std(1, keepdim=True)
    # A group whose rewards all agree has no signal: 0, also with ε = 0.
    normalised = torch.where(std > 0, centered / (std + eps), torch.zeros_like(centered))
    return normalised.reshape(-1).float()


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      clip_low: float, clip_high: float, dual_clip: float | None = None,
                      max_log_ratio: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token −min(ρÂ, clip(ρ)Â) — with ``dual_clip`` c, at most −c·Â where Â < 0 — whether a
    clip bound was taken (its gradient is 0), and ρ. log ρ is clamped to ±``max_log_ratio``
    first. ``advantages`` broadcast against ``logp`` (``[n]`` for ``[T, n]``)."""
    log_ratio = logp - old_logp
    if max_log_ratio is not None:
        log_ratio = log_ratio.clamp(-max_log_ratio, max_log_ratio)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    bounded = clipped < unclipped
    if dual_clip is not None:
        cap = -dual_clip * advantages
        capped = (advantages < 0) & (loss > cap)
        loss = torch.where(capped, cap.expand_as(loss), loss)
        bounded = bounded | capped
    return loss, bounded.detach(), ratio.detach()


def k3_kl(logp: torch.Tensor, reference_logp: torch.Tensor, max_log_ratio: float | None = None,
          clamp: float | None = None) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ ‖ π_ref) on the sampled token: e^δ − δ − 1, δ = ref − logp;
    δ clamped to ±``max_log_ratio`` and the result capped at ``clamp`` (verl's low_var_kl)."""
    delta = reference_logp - logp
    if max_log_ratio is not None:
        delta = delta.clamp(-max_log_ratio, max_log_ratio)
    kl = torch.exp(delta) - delta - 1.0
    return kl if clamp is None else kl.clamp(max=clamp)


def _checked(logp: torch.Tensor, weights: torch.Tensor, what: str) -> None:
    if not torch.isfinite(logp[weights != 0]).all():
        raise ValueError(f"non-finite {what} log-probs at response tokens: the policy's logits "
                         f"hold NaN or ±inf")


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
              weights: torch.Tensor, config: PolicyLossConfig,
              reference_logp: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ weights·(clipped surrogate + β·k3) and detached metrics, each Σ weights·(metric).

    ``logp``/``old_logp``/``reference_logp``/``weights``: ``[T, n]``; ``advantages``: ``[n]``.
    """
    _checked(logp, weights, "policy")
    surrogate, clipped, ratio = clipped_surrogate(logp, old_logp, advantages[None],
                                                  config.clip_low, config.clip_high,
                                                  config.dual_clip, config.max_log_ratio)
    per_token = surrogate
    metrics = {"policy_loss": (weights * surrogate).sum().detach(),
               "clip_fraction": (weights * clipped).sum(),
               "ratio": (weights * ratio).sum()}
    if config.kl_coef > 0:
        if reference_logp is None:
            raise ValueError("loss.kl_coef > 0 needs the reference model's log-probs")
        kl = k3_kl(logp, reference_logp, config.max_log_ratio, config.k3_clamp)
        per_token = per_token + config.kl_coef * kl
        metrics["kl"] = (weights * kl).sum().detach()
    return (weights * per_token).sum(), metrics


def rltt_loop_weights(kind: str, num_loops: int, *, gamma: float = 1.0,
                      exit_probs: torch.Tensor | None = None,
                      learned_logits: torch.Tensor | None = None) -> torch.Tensor:
    """ω over loops 1..R̃: ``[R̃]`` (uniform, progressive, learned) or ``[R̃, T, n]`` (exit_pdf).

    exit_pdf and learned keep their autograd graph (exit gate, learnable vector); the loss
    casts ω to the log-probs' dtype."""
    if kind == "uniform":
        return loop_weights("uniform", num_loops)
    if kind == "progressive":
        return loop_weights("late_heavy", num_loops, gamma=gamma)
    if kind == "exit_pdf":
        if exit_probs is None or exit_probs.shape[0] != num_loops:
            raise ValueError(f"exit_pdf loop weights need the exit distribution over "
                             f"{num_loops} loops")
        return exit_probs
    if kind == "learned":
        if learned_logits is None or learned_logits.shape != (num_loops,):
            raise ValueError(f"learned loop weights need a vector of {num_loops} logits")
        return torch.softmax(learned_logits, dim=0)
    raise ValueError(f"unknown RLTT loop weighting {kind!r}; expected one of {RLTT_WEIGHTINGS}")


def rltt_loss(per_loop_logp: torch.Tensor, omega: torch.Tensor,
              advantages: torch.Tensor, weights: torch.Tensor, config: PolicyLossConfig,
              reference_logp: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ weights·(−Â·Σ_t ω_t log p^(t)(y) + β·k3(final loop)) and detached metrics; β and the
    k3 clamps are ``config``'s (RLTT has no ratio, so the clip settings do not apply).

    ``per_loop_logp``: ``[R̃, T, n]``; ``omega`` (ω): ``[R̃]`` or ``[R̃, T, n]``;
    ``advantages``: ``[n]``; ``weights``: ``[T, n]``.
    """
    _checked(per_loop_logp, weights.expand_as(per_loop_logp), "per-loop")
    omega = omega.to(per_loop_logp.dtype)
    omega = omega if omega.dim() > 1 else omega.view(-1, 1, 1)
    weighted_logp = (omega * per_loop_logp).sum(0)
    per_token = -advantages[None] * weighted_logp
    metrics = {"policy_loss": (weights * per_token).sum().detach(),
               "loop_weights": (weights * omega.detach().expand_as(per_loop_logp)).sum((1, 2))}
    if config.kl_coef > 0:
        if reference_logp is None:
            raise ValueError("a KL coefficient > 0 needs the reference model's log-probs")
        kl = k3_kl(per_loop_logp[-1], reference_logp, config.max_log_ratio, config.k3_clamp)
        per_token = per_token + config.kl_coef * kl
        metrics["kl"] = (weights * kl).sum().detach()
    return (weights * per_token).sum(), metrics
