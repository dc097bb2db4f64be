"""LoopRPT's objective: reinforcement pre-training of a LoopLM's intermediate loops
(arXiv 2603.19714, "Reinforcement Pre-Training for Looped Language Models").

Per token s (predicting the gold next token x_{s+1}) with R loops; p^(t) is the distribution read
out after loop t, π(t) the exit distribution over loops, T the EMA teacher, S the student:

1. **Hard tokens**: per sequence, the ⌈ρ·n⌉ of its n loss-mask positions with the highest
   entropy of the teacher's final-loop distribution (ρ = ``hard_token_ratio``). Every term below
   is a mean over hard tokens only.
2. **Teacher reference**: t_ref = the first loop whose teacher exit CDF reaches
   ``exit_threshold`` (else loop R); b_s = log p_T^(t_ref)(x_{s+1});
   λ_s = λ₀·(1 + κ·(1 − d_s)) with λ₀ = ``lambda_base``, κ = ``lambda_difficulty_scale`` and the
   difficulty d_s = H(π_T)/log R, the normalised entropy of the teacher's exit distribution
   (``difficulty: exit_entropy``; ``token_entropy`` is H(p_T^(t_ref))/log V, what the authors'
   code computes).
3. **Per-loop rewards** r_{s,t} = log p^(t)(x_{s+1}) − b_s − λ_s·(t − t_ref), no gradient.
4. **Backbone loss** Σ_t −log p_S^(t)(x_{s+1})·sg(π_S(t))·(1 + ReLU(Â_{s,t})), Â the student's
   clean rewards normalised over the R loops of the token.
5. **Noisy latent rollouts**: G copies of the sequence whose readouts got Gaussian noise after
   the final norm of every loop (the model's readout transform); rewards r^g recomputed on each
   trajectory, an exit t^g drawn from its exit distribution π^g (inverse CDF of given uniforms),
   and REINFORCE on that decision: −A^g·log π^g(t^g), A^g = r^g_{s,t^g} normalised over the G
   copies of the token.
6. **Gate entropy bonus** H(π_S) on the clean pass, and 7. a **k3 KL** to the teacher per loop
   on the gold token, Σ_t k3(log p_T^(t) − log p^{g,(t)}) on the rollouts (the authors' default),
   each k3 clamped at ``kl_clamp``.

"A mean over hard tokens" is a weighted sum with the caller's ``hard_weights``: a training step
passes weights normalised over all its micro-batches and ranks
(:mod:`nemo_loop.losses.normalization`), so the loss does not depend on the layout.

loss = c_pg·policy + c_bb·backbone − c_H·H(π_S) + c_KL·KL.

Layout: sequence-first ``[R, s, n]`` tensors; the student's n = (1 + G)·b columns are the clean
sequences (the first b) and then the G noisy copies, copy-major (column g·b + i of the noisy
block is copy g of sequence i).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nemo_loop.losses.policy_gradient import group_advantages, k3_kl
from nemo_loop.losses.vocab_parallel import VocabShard

DIFFICULTIES = ("exit_entropy", "token_entropy")


@dataclass
class LoopRPTLossConfig:
    hard_token_ratio: float = 0.2  # ρ: share of each sequence's positions trained on
    exit_threshold: float = 0.5  # t_ref: first loop whose teacher exit CDF reaches this
    lambda_base: float = 0.02  # λ₀: reward cost per loop beyond t_ref
    lambda_difficulty_scale: float = 0.5  # κ in λ_s = λ₀·(1 + κ·(1 − d_s))
    difficulty: str = "exit_entropy"  # d_s: exit_entropy | token_entropy
    policy_coef: float = 1.0  # c_pg: REINFORCE on the rollouts' exit decisions
    backbone_coef: float = 1.0  # c_bb: the advantage-weighted per-loop likelihood
    gate_entropy_coef: float = 0.01  # c_H: exit-gate entropy bonus
    kl_coef: float = 0.001  # c_KL: per-loop k3 KL to the teacher on the gold token
    kl_clamp: float = 10.0  # upper clamp of each k3 term (the authors' code)

    def validate(self, num_loops: int) -> None:
        if num_loops < 2:
            raise ValueError(f"LoopRPT shapes the exit decision over loops: model.num_loops "
                             f"must be >= 2, got {num_loops}")
        if not 0.0 < self.hard_token_ratio <= 1.0:
            raise ValueError(f"looprpt.hard_token_ratio must be in (0, 1], got "
                             f"{self.hard_token_ratio}")
        if not 0.0 < self.exit_threshold <= 1.0:
            raise ValueError(f"looprpt.exit_threshold must be in (0, 1], got "
                             f"{self.exit_threshold}")
        if self.difficulty not in DIFFICULTIES:
            raise ValueError(f"looprpt.difficulty must be one of {DIFFICULTIES}, got "
                             f"{self.difficulty!r}")
        for name in ("lambda_base", "lambda_difficulty_scale", "policy_coef", "backbone_coef",
                     "gate_entropy_coef", "kl_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"looprpt.{name} must be >= 0, got {getattr(self, name)}")
        if self.kl_clamp <= 0:
            raise ValueError(f"looprpt.kl_clamp must be > 0, got {self.kl_clamp}")


@dataclass
class TeacherReference:
    """What the teacher fixes for a micro-batch of b sequences (all ``[s, b]`` unless noted)."""

    gold_logp: torch.Tensor  # [R, s, b] log p_T^(t)(x_{s+1})
    exit_probs: torch.Tensor  # [R, s, b] π_T
    exit_loop: torch.Tensor  # t_ref − 1 (0-based), long
    baseline: torch.Tensor  # b_s
    time_penalty: torch.Tensor  # λ_s
    hard: torch.Tensor  # bool: the hard tokens


def hard_token_mask(entropy: torch.Tensor, loss_mask: torch.Tensor, ratio: float
                    ) -> torch.Tensor:
    """bool ``[s, b]``: per sequence (column), the ⌈ratio·n⌉ of its n loss-mask positions with
    the highest ``entropy`` (ties: the earlier position)."""
    valid = loss_mask > 0
    counts = valid.sum(0)
    # rounded first so that e.g. 0.7·10 = 7.000000000000001 does not become 8
    wanted = torch.ceil(torch.round(counts.double() * ratio, decimals=6)).long()
    wanted = torch.where(counts > 0, wanted.clamp_min(1), wanted)
    scores = entropy.float().masked_fill(~valid, float("-inf"))
    order = scores.argsort(dim=0, descending=True, stable=True)
    positions = torch.arange(scores.shape[0], device=scores.device)[:, None].expand_as(order)
    ranks = torch.empty_like(order).scatter_(0, order, positions)
    return valid & (ranks < wanted[None])


def teacher_reference(gold_logp: torch.Tensor, token_entropy: torch.Tensor,
                      exit_probs: torch.Tensor, loss_mask: torch.Tensor,
                      config: LoopRPTLossConfig, vocab_size: int) -> TeacherReference:
    """The teacher's t_ref, b_s, λ_s and hard tokens from its per-loop gold log-probs,
    distribution entropies and exit distribution (``[R, s, b]``); ``loss_mask`` ``[s, b]``."""
    num_loops = exit_probs.shape[0]
    reached = exit_probs.cumsum(0) >= config.exit_threshold
    exit_loop = torch.where(reached.any(0), reached.float().argmax(0),
                            torch.full_like(reached[0], num_loops - 1, dtype=torch.long))
    baseline = gold_logp.gather(0, exit_loop[None])[0]
    if config.difficulty == "exit_entropy":
        exit_entropy = -(exit_probs * exit_probs.clamp_min(1e-12).log()).sum(0)
        difficulty = exit_entropy / math.log(num_loops)
    else:
        difficulty = token_entropy.gather(0, exit_loop[None])[0] / math.log(vocab_size)
    time_penalty = config.lambda_base * (
        1.0 + config.lambda_difficulty_scale * (1.0 - difficulty.clamp(0.0, 1.0)))
    return TeacherReference(gold_logp, exit_probs, exit_loop, baseline, time_penalty,
                            hard_token_mask(token_entropy[-1], loss_mask,
                                            config.hard_token_ratio))


def loop_rewards(gold_logp: torch.Tensor, baseline: torch.Tensor, time_penalty: torch.Tensor,
                 exit_loop: torch.Tensor) -> torch.Tensor:
    """r_{s,t} = log p^(t)(x_{s+1}) − b_s − λ_s·(t − t_ref), ``[R, s, n]``, no gradient."""
    loops = torch.arange(gold_logp.shape[0], device=gold_logp.device)[:, None, None]
    return (gold_logp.detach() - baseline[None]
            - time_penalty[None] * (loops - exit_loop[None]).to(gold_logp.dtype))


def normalised_over(values: torch.Tensor, dim: int) -> torch.Tensor:
    """(v − mean)/(std + ε) along ``dim`` (0 where all values agree), via GRPO's
    :func:`group_advantages`."""
    moved = values.detach().movedim(dim, -1)
    flat = group_advantages(moved.reshape(-1), moved.shape[-1])
    return flat.view(moved.shape).movedim(-1, dim).to(values.dtype).contiguous()


def sample_exit_loops(exit_probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """0-based loop t with CDF(t − 1) < u ≤ CDF(t), per column: a draw from π given u ~ U(0, 1)."""
    below = (exit_probs.detach().cumsum(0) < uniforms[None]).sum(0)
    return below.clamp_max(exit_probs.shape[0] - 1)


def looprpt_loss(student_logp: torch.Tensor, student_exit_logp: torch.Tensor,
                 reference: TeacherReference, uniforms: torch.Tensor, loss_mask: torch.Tensor,
                 config: LoopRPTLossConfig, hard_weights: torch.Tensor | None = None,
                 token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The LoopRPT loss of one micro-batch and its metrics.

    ``student_logp`` ``[R, s, (1+G)·b]``: log p^(t)(x_{s+1}) of the clean and noisy passes
    (differentiable); ``student_exit_logp`` the same layout's log π (differentiable);
    ``uniforms`` ``[s, G·b]`` the draws that pick each rollout's exit; ``loss_mask`` ``[s, b]``.
    ``hard_weights`` ``[s, b]`` weigh the hard tokens in every term (default: 1/hard tokens of
    this micro-batch; a training step passes its global ones,
    :mod:`nemo_loop.losses.normalization`), ``token_weights`` the loss-mask tokens in the
    metrics over all tokens (default: 1/loss-mask tokens).
    """
    num_loops, seq, columns = student_logp.shape
    batch = reference.hard.shape[1]
    copies = columns // batch - 1
    if copies < 2 or columns != (copies + 1) * batch:
        raise ValueError(f"student columns ({columns}) must be (1 + G)·b with b = {batch} "
                         f"sequences and G >= 2 noisy copies")

    def tile(tensor):  # [.., b] → [.., G·b], copy-major like the noisy block
        return tensor.repeat(*([1] * (tensor.dim() - 1)), copies)

    hard = reference.hard.to(student_logp.dtype)
    mask = loss_mask.to(student_logp.dtype)
    hard_weights = hard / hard.sum().clamp_min(1.0) if hard_weights is None \
        else hard_weights.to(student_logp.dtype)
    token_weights = mask / mask.sum().clamp_min(1.0) if token_weights is None \
        else token_weights.to(student_logp.dtype)
    rollout_weights = tile(hard_weights) / copies  # each of the G copies of a token

    clean_logp, noisy_logp = student_logp[..., :batch], student_logp[..., batch:]
    clean_exit_logp, noisy_exit_logp = (student_exit_logp[..., :batch],
                                        student_exit_logp[..., batch:])
    rewards = loop_rewards(clean_logp, reference.baseline, reference.time_penalty,
                           reference.exit_loop)
    loop_advantages = normalised_over(rewards, dim=0)
    exit_probs = clean_exit_logp.exp()
    backbone_per_token = (-clean_logp * exit_probs.detach()
                          * (1.0 + torch.relu(loop_advantages))).sum(0)
    backbone = (backbone_per_token * hard_weights).sum()
    gate_entropy = ((-(exit_probs * clean_exit_logp).sum(0)) * hard_weights).sum()

    rollout_rewards = loop_rewards(noisy_logp, tile(reference.baseline),
                                   tile(reference.time_penalty), tile(reference.exit_loop))
    exits = sample_exit_loops(noisy_exit_logp.exp(), uniforms)
    returns = rollout_rewards.gather(0, exits[None])[0]  # [s, G·b]
    # normalised over the G copies of each token
    advantages = normalised_over(returns.view(seq, copies, batch), dim=1).reshape(seq, -1)
    chosen_logp = noisy_exit_logp.gather(0, exits[None])[0]
    policy = (-(advantages * chosen_logp) * rollout_weights).sum()
    kl_per_token = k3_kl(noisy_logp, tile(reference.gold_logp), clamp=config.kl_clamp)
    kl = (kl_per_token.sum(0) * rollout_weights).sum()

    loss = (config.policy_coef * policy + config.backbone_coef * backbone
            - config.gate_entropy_coef * gate_entropy + config.kl_coef * kl)
    with torch.no_grad():
        metrics = {
            "loss": loss.detach(), "policy_loss": policy.detach(),
            "backbone_loss": backbone.detach(), "gate_entropy": gate_entropy.detach(),
            "kl": kl.detach(),
            "ce_per_loop": (-clean_logp * token_weights).sum((1, 2)),
            "hard_ce_per_loop": (-clean_logp * hard_weights).sum((1, 2)),
            "exit_prob_per_loop": (exit_probs * token_weights).sum((1, 2)),
            "teacher_exit_prob_per_loop": (reference.exit_probs * token_weights).sum((1, 2)),
            "teacher_exit_loop": ((reference.exit_loop + 1) * hard_weights).sum(),
            "reward_per_loop": (rewards * hard_weights).sum((1, 2)),
            "rollout_return": (returns * rollout_weights).sum(),
            "rollout_exit_loop": ((exits + 1) * rollout_weights).sum(),
            "hard_tokens": hard.sum(), "num_tokens": mask.sum(),
        }
    return loss, metrics


@torch.no_grad()
def gold_is_argmax(logits: torch.Tensor, targets: torch.Tensor,
                   tp_group: torch.distributed.ProcessGroup | None = None) -> torch.Tensor:
    """bool ``[...]``: whether the gold id is the arg-max of vocab-parallel ``logits``
    ``[..., V/TP]`` (ties count as correct); only two per-token maxima cross the TP group."""
    shard = VocabShard.from_group(tp_group, logits.shape[-1])
    is_owned, local = shard.owned(targets)
    gold = torch.where(is_owned, logits.gather(-1, local[..., None])[..., 0],
                       torch.full_like(logits[..., 0], float("-inf")))
    both = shard.all_reduce(torch.stack([logits.amax(-1), gold]),
                            op=torch.distributed.ReduceOp.MAX)
    return both[1] >= both[0]
