"""Ouro's pretraining objective for a LoopLM.

Per token: Σ_r p_r · CE_r − β · H(p), where p is the early-exit distribution over the loops
that ran and CE_r the next-token cross-entropy of loop r's logits. The result is the masked mean
over tokens (a training step's, :mod:`nemo_loop.losses.normalization`). Cross-entropy is computed across the tensor-parallel vocabulary shards by
megatron-core's ``vocab_parallel_cross_entropy`` (never with label smoothing, which is wrong at
TP > 1 upstream).
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from nemo_loop.losses.normalization import LossNormalizer
from nemo_loop.models.looplm.model import LoopOutput, exit_distribution


def per_loop_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[n, s, b, V/TP] logits and [b, s] labels → [n, s, b] token cross-entropies."""
    targets = labels.transpose(0, 1).contiguous()
    # The kernel overwrites its input with the softmax; keep the caller's logits intact.
    return torch.stack([vocab_parallel_cross_entropy(loop_logits.to(torch.float32, copy=True),
                                                     targets)
                        for loop_logits in logits])


def ouro_token_losses(output: LoopOutput, labels: torch.Tensor, entropy_beta: float = 0.05
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ouro's objective at every token, before masking: (Σ_r p_r·CE_r − β·H(p) [s, b], CE_r
    [n, s, b], p_r [n, s, b], H(p) [s, b]) over the n loops that ran (the last takes the
    remaining exit mass, so a run cut at R̃ < R loops is a proper distribution over R̃)."""
    if output.logits is None or len(output.loops) != output.exit_logits.shape[0]:
        raise ValueError("the Ouro loss needs logits for every loop that ran")
    token_ce = per_loop_cross_entropy(output.logits, labels)  # [n, s, b]
    exit_probs = exit_distribution(output.exit_logits)  # [n, s, b]
    entropy = -(exit_probs * torch.log(exit_probs.clamp_min(1e-12))).sum(0)
    per_token = (exit_probs * token_ce).sum(0) - entropy_beta * entropy  # [s, b]
    return per_token, token_ce, exit_probs, entropy


def ouro_pretraining_loss(output: LoopOutput, labels: torch.Tensor, loss_mask: torch.Tensor,
                          entropy_beta: float = 0.05, normalizer: LossNormalizer | None = None,
                          aggregation: str = "token_mean") -> tuple[torch.Tensor, dict]:
    """Expected per-token CE under the exit distribution minus β·entropy, averaged over the
    ``loss_mask`` ``[b, s]`` tokens: with ``normalizer`` (a training step's counts) this
    micro-batch's share of the step's mean, else the mean over this mask. Metrics are weighted
    the same way; ``num_tokens`` counts the mask's tokens."""
    per_token, token_ce, exit_probs, entropy = ouro_token_losses(output, labels, entropy_beta)
    normalizer = normalizer or LossNormalizer.count([loss_mask])
    weights = normalizer.weights(loss_mask, aggregation).transpose(0, 1).to(per_token)
    loss = (per_token * weights).sum()
    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "ce_per_loop": (token_ce * weights).sum((1, 2)),
            "exit_prob_per_loop": (exit_probs * weights).sum((1, 2)),
            "exit_entropy": (entropy * weights).sum(),
            "num_tokens": loss_mask.ne(0).sum(),
        }
    return loss, metrics
