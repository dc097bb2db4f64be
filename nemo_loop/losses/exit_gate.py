"""Ouro's Stage II exit-gate loss (arXiv 2510.25741, §3.4): the gate learns when looping on
stops paying, with the language model frozen.

Per token, with L_r the cross-entropy of loop r (no gradient: the LM is frozen),

    I_{r+1} = max(0, L_r − L_{r+1})        how much loop r+1 still improves the token
    w_{r+1} = σ(k · (I_{r+1} − γ))         the ideal probability of continuing past loop r
    ℓ_r = −[(1 − w_{r+1}) · log λ_r + w_{r+1} · log(1 − λ_r)],   λ_r = σ(g_r)

for the gates read after loops r = 1..R−1 (after loop R every token exits, so the last gate is
not trained), averaged over loops and over the masked tokens of the training step. k = 50 and γ = 0.005 are the
paper's. The gate after loop r decides whether to run loop r+1, so its label is the improvement
loop r+1 would bring.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nemo_loop.losses.normalization import LossNormalizer
from nemo_loop.losses.ouro_pretrain import per_loop_cross_entropy
from nemo_loop.models.looplm.model import LoopOutput


def exit_gate_loss(output: LoopOutput, labels: torch.Tensor, loss_mask: torch.Tensor,
                   slope: float = 50.0, margin: float = 0.005,
                   normalizer: LossNormalizer | None = None) -> tuple[torch.Tensor, dict]:
    """BCE of the gates toward the continue targets, averaged over loops 1..R−1 and over the
    ``loss_mask`` ``[b, s]`` tokens: with ``normalizer`` (a training step's counts) this
    micro-batch's share of the step's mean (:mod:`nemo_loop.losses.normalization`), else the
    mean over this mask; metrics likewise. ``output`` needs the logits of every loop that ran
    (at least 2)."""
    num_loops = output.exit_logits.shape[0]
    if output.logits is None or len(output.loops) != num_loops or num_loops < 2:
        raise ValueError("the exit-gate loss needs logits of every loop that ran (>= 2 loops)")
    with torch.no_grad():
        token_ce = per_loop_cross_entropy(output.logits, labels)  # [R, s, b]
        improvement = (token_ce[:-1] - token_ce[1:]).clamp_min(0)  # I_{r+1}, r = 1..R−1
        keep_going = torch.sigmoid(slope * (improvement - margin))  # w_{r+1}
    gates = output.exit_logits[:-1].float()  # g_r, r = 1..R−1
    bce = -((1 - keep_going) * F.logsigmoid(gates) + keep_going * F.logsigmoid(-gates))
    normalizer = normalizer or LossNormalizer.count([loss_mask])
    weights = normalizer.weights(loss_mask, "token_mean").transpose(0, 1).to(bce)  # [s, b]
    loss = (bce * weights).sum() / (num_loops - 1)
    with torch.no_grad():
        per_loop = lambda values: (values * weights).sum((1, 2))  # noqa: E731
        metrics = {
            "loss": loss.detach(),
            "ce_per_loop": per_loop(token_ce),
            "continue_target_per_loop": per_loop(keep_going),
            "gate_exit_prob_per_loop": per_loop(torch.sigmoid(gates)),
            "num_tokens": loss_mask.ne(0).sum(),
        }
    return loss, metrics
