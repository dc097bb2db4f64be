"""Supervised next-token loss of a LoopLM at a loop budget R̃ (the SFT baseline).

Two kinds, both on reference responses:

* ``ouro``: Ouro's per-loop objective Σ_r p_r·CE_r − β·H(p) per token, p the exit distribution
  over the R̃ loops that ran (the last loop takes the remaining mass);
* ``final_loop``: the cross-entropy of loop R̃'s logits alone.

Tokens carry caller-given weights (e.g. 1 / the number of target tokens of the whole global
batch), and the loss is Σ w·ℓ: a sum, so micro-batches and data-parallel ranks add up to the same
number whatever the layout. Cross-entropy runs across the tensor-parallel vocabulary shards
(megatron's ``vocab_parallel_cross_entropy``).
"""

from __future__ import annotations

import torch

from nemo_loop.losses.ouro_pretrain import ouro_token_losses, per_loop_cross_entropy
from nemo_loop.models.looplm.model import LoopOutput

SUPERVISED_LOSS_KINDS = ("ouro", "final_loop")


def check_supervised_loss_kind(kind: str) -> str:
    if kind not in SUPERVISED_LOSS_KINDS:
        raise ValueError(f"unknown supervised loss kind {kind!r}; expected one of "
                         f"{SUPERVISED_LOSS_KINDS}")
    return kind


def logit_loops_for(kind: str, num_loops: int) -> list[int]:
    """The loops whose logits the loss reads: all R̃ for ``ouro``, only R̃ for ``final_loop``."""
    check_supervised_loss_kind(kind)
    return list(range(1, num_loops + 1)) if kind == "ouro" else [num_loops]


def supervised_loop_loss(output: LoopOutput, labels: torch.Tensor, token_weights: torch.Tensor,
                         kind: str = "ouro", entropy_beta: float = 0.05
                         ) -> tuple[torch.Tensor, dict]:
    """Σ_tokens w·ℓ with ℓ the per-token loss of ``kind``.

    ``labels`` and ``token_weights`` are ``[b, s]`` (weight 0: not a target). ``output`` needs
    the logits of every loop that ran for ``ouro`` and of the last one for ``final_loop``
    (:func:`logit_loops_for`). Metrics are the same weighted sums: ``ce_per_loop`` (the loops
    read), ``exit_prob_per_loop`` and ``exit_entropy`` (``ouro``), ``target_weight`` (Σ w).
    """
    check_supervised_loss_kind(kind)
    if output.logits is None:
        raise ValueError("the supervised loss needs head logits (compute_logits=True)")
    weights = token_weights.transpose(0, 1)  # [s, b], the megatron layout of the losses
    metrics = {}
    if kind == "ouro":
        per_token, token_ce, exit_probs, entropy = ouro_token_losses(output, labels,
                                                                     entropy_beta)
        weights = weights.to(per_token.dtype)
        with torch.no_grad():
            metrics["exit_prob_per_loop"] = (exit_probs * weights).sum((1, 2))
            metrics["exit_entropy"] = (entropy * weights).sum()
    else:
        last = output.exit_logits.shape[0]
        if output.loops[-1] != last:
            raise ValueError(f"final_loop needs the logits of loop {last} (the last that ran), "
                             f"got loops {output.loops}")
        token_ce = per_loop_cross_entropy(output.logits[-1:], labels)  # [1, s, b]
        per_token = token_ce[0]
        weights = weights.to(per_token.dtype)
    loss = (per_token * weights).sum()
    with torch.no_grad():
        metrics["ce_per_loop"] = (token_ce * weights).sum((1, 2))
        metrics["target_weight"] = weights.sum()
        metrics["loss"] = loss.detach()
    return loss, metrics
