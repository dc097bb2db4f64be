"""Per-token divergences over a vocabulary sharded across the tensor-parallel group.

Each kernel takes one token chunk of student and teacher logits, ``[C, V/TP]`` in the compute
dtype, and returns per-token values plus the gradient of the per-token loss with respect to the
*temperature-scaled* student logits s = z/τ of the local shard. Only per-token scalars (maxima,
partition functions, partial sums) and, for top-K, K candidates per rank cross the group; the
full vocabulary is never gathered.

Every gradient has the softmax form ∂ℓ/∂s_j = G_j − p_j·Σ_i G_i with G_j = ∂ℓ/∂log p_j, so the
local shard of the gradient needs only local logits plus already-reduced per-token scalars.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice [start, start + local_vocab) of the vocabulary and its TP group."""

    group: dist.ProcessGroup | None
    rank: int
    world_size: int
    local_vocab: int

    @classmethod
    def from_group(cls, group: dist.ProcessGroup | None, local_vocab: int) -> VocabShard:
        if group is None or dist.get_world_size(group) == 1:
            return cls(None, 0, 1, local_vocab)
        return cls(group, dist.get_rank(group), dist.get_world_size(group), local_vocab)

    @property
    def start(self) -> int:
        return self.rank * self.local_vocab

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """[world_size, *tensor.shape]."""
        if self.world_size == 1:
            return tensor.unsqueeze(0)
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.stack(parts)

    def owned(self, global_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask of ids in this shard, local ids clamped into range so they can index)."""
        local = global_ids - self.start
        is_owned = (local >= 0) & (local < self.local_vocab)
        return is_owned, local.clamp(0, self.local_vocab - 1)


@dataclass(frozen=True)
class KernelSpec:
    divergence: str
    beta: float
    inv_tau: float
    top_k: int | None
    top_k_mode: str


@dataclass
class ChunkResult:
    loss: torch.Tensor        # [C] per-token loss ℓ
    divergence: torch.Tensor  # [C] per-token divergence reported as a metric
    student_entropy: torch.Tensor
    teacher_entropy: torch.Tensor
    grad: torch.Tensor        # [C, V/TP] ∂ℓ/∂(z_S/τ)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product without materializing a ⊙ b."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


@dataclass
class _Softmaxes:
    p_student: torch.Tensor  # [C, V/TP], normalized with the global partition function
    p_teacher: torch.Tensor
    lse_student: torch.Tensor  # [C] global log-sum-exp of s = z/τ
    lse_teacher: torch.Tensor
    student_entropy: torch.Tensor
    teacher_entropy: torch.Tensor
    extra_sums: torch.Tensor  # [C, n] the caller's partial sums, reduced with the softmax sums


def _sharded_softmaxes(z_s: torch.Tensor, z_t: torch.Tensor, inv_tau: float, shard: VocabShard,
                       extra_partial_sums: torch.Tensor | None = None) -> _Softmaxes:
    """Both softmaxes over the full vocabulary with two collectives (one MAX, one SUM).

    Entropies ride along for free: H = lse − Σ p·s, and Σ e·z is reduced with Σ e.
    """
    maxima = shard.all_reduce(torch.stack([z_s.amax(-1), z_t.amax(-1)]), op=dist.ReduceOp.MAX)
    e_s, e_t = torch.sub(z_s, maxima[0, :, None]), torch.sub(z_t, maxima[1, :, None])
    if inv_tau != 1.0:  # a full [C, V/TP] pass each, skipped at the usual τ = 1
        e_s.mul_(inv_tau)
        e_t.mul_(inv_tau)
    e_s.exp_()
    e_t.exp_()
    columns = [e_s.sum(-1), e_t.sum(-1), _dot(e_s, z_s), _dot(e_t, z_t)]
    if extra_partial_sums is not None:
        columns.extend(extra_partial_sums.unbind(-1))
    sums = shard.all_reduce(torch.stack(columns, dim=-1))
    partition_s, partition_t = sums[:, 0], sums[:, 1]
    lse_s = maxima[0] * inv_tau + partition_s.log()
    lse_t = maxima[1] * inv_tau + partition_t.log()
    return _Softmaxes(
        p_student=e_s.div_(partition_s[:, None]),
        p_teacher=e_t.div_(partition_t[:, None]),
        lse_student=lse_s,
        lse_teacher=lse_t,
        student_entropy=lse_s - sums[:, 2] * inv_tau / partition_s,
        teacher_entropy=lse_t - sums[:, 3] * inv_tau / partition_t,
        extra_sums=sums[:, 4:],
    )


def dense_divergence(z_s: torch.Tensor, z_t: torch.Tensor, spec: KernelSpec,
                     shard: VocabShard) -> ChunkResult:
    """Exact divergence over the full (sharded) vocabulary."""
    sm = _sharded_softmaxes(z_s, z_t, spec.inv_tau, shard)
    p_s, p_t = sm.p_student, sm.p_teacher
    lse_gap = sm.lse_teacher - sm.lse_student
    if spec.divergence == "forward_kl":
        # KL(p_T‖p_S) = CE(p_T, p_S) − H(p_T) = lse_S − Σ p_T·s − H(p_T): H(p_T) already holds
        # Σ p_T·t, so one dot product remains; ∂/∂s = p_S − p_T
        cross = shard.all_reduce(_dot(p_t, z_s)) * spec.inv_tau
        divergence = sm.lse_student - cross - sm.teacher_entropy
        grad = p_s.sub_(p_t)
    elif spec.divergence == "reverse_kl":
        # KL(p_S‖p_T) = Σ p_S·(s − t) + (lse_T − lse_S); ∂/∂s = p_S ⊙ (log p_S − log p_T − KL)
        partial = _dot(p_s, z_s) - _dot(p_s, z_t)
        divergence = shard.all_reduce(partial) * spec.inv_tau + lse_gap
        log_ratio = torch.sub(z_s, z_t).mul_(spec.inv_tau)
        grad = log_ratio.add_((lse_gap - divergence)[:, None]).mul_(p_s)
    elif spec.divergence == "jsd":
        divergence, grad = _dense_jsd(z_s, z_t, sm, spec, shard)
    else:
        raise ValueError(f"unknown divergence {spec.divergence!r}")
    return ChunkResult(divergence, divergence, sm.student_entropy, sm.teacher_entropy, grad)


def _dense_jsd(z_s, z_t, sm: _Softmaxes, spec: KernelSpec, shard: VocabShard):
    # JSD = β·KL(p_T‖m) + (1−β)·KL(p_S‖m). Since Σ_j ∂/∂p_S,j of the m-terms cancels,
    # ∂JSD/∂log p_S = (1−β)·p_S ⊙ (log p_S − log m), hence
    # ∂JSD/∂s = (1−β)·p_S ⊙ (log p_S − log m − KL(p_S‖m)).
    beta = spec.beta
    log_p_s = (z_s * spec.inv_tau).sub_(sm.lse_student[:, None])
    log_p_t = (z_t * spec.inv_tau).sub_(sm.lse_teacher[:, None])
    # logaddexp keeps log m finite where both probabilities underflow
    log_m = torch.logaddexp(log_p_t + math.log(beta), log_p_s + math.log1p(-beta))
    kl_teacher_m = _dot(sm.p_teacher, log_p_t.sub_(log_m))
    log_ratio_s = log_p_s.sub_(log_m)
    kl_student_m = _dot(sm.p_student, log_ratio_s)
    kls = shard.all_reduce(torch.stack([kl_teacher_m, kl_student_m]))
    divergence = beta * kls[0] + (1 - beta) * kls[1]
    grad = log_ratio_s.sub_(kls[1][:, None]).mul_(sm.p_student).mul_(1 - beta)
    return divergence, grad


def bucket_terms(log_q_s: torch.Tensor, log_q_t: torch.Tensor, divergence: str,
                 beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bucket divergence terms f and G = ∂f/∂log q_S for small bucket distributions.

    Buckets of zero probability contribute 0 (0·log 0 = 0), which the K=V tail bucket needs.
    """
    q_s, q_t = log_q_s.exp(), log_q_t.exp()
    zero = torch.zeros((), dtype=q_s.dtype, device=q_s.device)
    if divergence == "forward_kl":
        return torch.where(q_t > 0, q_t * (log_q_t - log_q_s), zero), -q_t
    if divergence == "reverse_kl":
        terms = torch.where(q_s > 0, q_s * (log_q_s - log_q_t), zero)
        return terms, torch.where(q_s > 0, terms + q_s, zero)
    if divergence == "jsd":
        log_m = torch.logaddexp(log_q_t + math.log(beta), log_q_s + math.log1p(-beta))
        teacher_terms = torch.where(q_t > 0, q_t * (log_q_t - log_m), zero)
        student_terms = torch.where(q_s > 0, q_s * (log_q_s - log_m), zero)
        return beta * teacher_terms + (1 - beta) * student_terms, (1 - beta) * student_terms
    raise ValueError(f"unknown divergence {divergence!r}")


def _global_teacher_top_k(z_t: torch.Tensor, k: int, shard: VocabShard):
    """(values, global ids) of the teacher's top-K, merging K candidates from every rank."""
    local_values, local_ids = z_t.topk(min(k, shard.local_vocab), dim=-1)
    # one collective: values and ids travel together; float64 holds both exactly
    packed = torch.cat([local_values.double(), (local_ids + shard.start).double()], dim=-1)
    gathered = shard.all_gather(packed)  # [TP, C, 2k']
    half = local_values.shape[-1]
    candidate_values = gathered[..., :half].permute(1, 0, 2).reshape(z_t.shape[0], -1)
    candidate_ids = gathered[..., half:].permute(1, 0, 2).reshape(z_t.shape[0], -1)
    values, position = candidate_values.topk(k, dim=-1)
    return values.to(z_t.dtype), candidate_ids.gather(-1, position).long()


def top_k_divergence(z_s: torch.Tensor, z_t: torch.Tensor, spec: KernelSpec,
                     shard: VocabShard) -> ChunkResult:
    """Divergence over the teacher's global top-K tokens (+ one tail bucket in ``"tail"`` mode)."""
    k = spec.top_k
    sm = _sharded_softmaxes(z_s, z_t, spec.inv_tau, shard)
    teacher_values, ids = _global_teacher_top_k(z_t, k, shard)
    is_owned, local_ids = shard.owned(ids)
    zero = torch.zeros((), dtype=z_s.dtype, device=z_s.device)
    student_partial = torch.where(is_owned, z_s.gather(-1, local_ids), zero)
    # scatter_add, not scatter: clamped ids of other ranks may collide with owned ones
    in_top_k = torch.zeros_like(z_s, dtype=torch.int32).scatter_add_(
        -1, local_ids, is_owned.int()) > 0
    tail_mass = [torch.where(in_top_k, zero, p).sum(-1) for p in (sm.p_student, sm.p_teacher)]
    sums = shard.all_reduce(torch.cat([student_partial, torch.stack(tail_mass, -1)], dim=-1))
    s_top, tail_s, tail_t = sums[:, :k] * spec.inv_tau, sums[:, k], sums[:, k + 1]
    t_top = teacher_values * spec.inv_tau

    if spec.top_k_mode == "tail":
        log_q_s = torch.cat([s_top - sm.lse_student[:, None], tail_s.log()[:, None]], dim=-1)
        log_q_t = torch.cat([t_top - sm.lse_teacher[:, None], tail_t.log()[:, None]], dim=-1)
    else:
        log_q_s = torch.log_softmax(s_top, dim=-1)
        log_q_t = torch.log_softmax(t_top, dim=-1)
    terms, g = bucket_terms(log_q_s, log_q_t, spec.divergence, spec.beta)
    divergence = terms.sum(-1)
    g_total = g.sum(-1)

    if spec.top_k_mode == "tail":
        # ∂ℓ/∂s_j = [j∈K]·G_k(j) + [j∉K]·G_tail·p_j/q_tail − p_j·ΣG
        g_tail = g[:, k]
        tail_coefficient = torch.where(tail_s > 0, g_tail / torch.where(tail_s > 0, tail_s, 1),
                                       zero)
        p_top = (s_top - sm.lse_student[:, None]).exp()
        at_top = g[:, :k] - tail_coefficient[:, None] * p_top
        grad = sm.p_student.mul_((tail_coefficient - g_total)[:, None])
    else:
        # ∂ℓ/∂s_j = [j∈K]·(G_k(j) − q_k(j)·ΣG)
        at_top = g - log_q_s.exp() * g_total[:, None]
        grad = sm.p_student.zero_()
    grad.scatter_add_(-1, local_ids, torch.where(is_owned, at_top, zero))
    return ChunkResult(divergence, divergence, sm.student_entropy, sm.teacher_entropy, grad)


def sampled_token_objective(z_s: torch.Tensor, z_t: torch.Tensor, token_ids: torch.Tensor,
                            spec: KernelSpec, shard: VocabShard) -> ChunkResult:
    """ℓ = −A·log p_S(y) with the detached advantage A = log p_T(y) − log p_S(y).

    The target logits are looked up like megatron's vocab_parallel_cross_entropy: the rank that
    owns y contributes its logit, the others contribute 0, and the SUM rides along with the
    softmax reduction. The reported per-token divergence is log p_S(y) − log p_T(y), a one-sample
    estimate of KL(p_S‖p_T) when y is sampled from the student.
    """
    is_owned, local_ids = shard.owned(token_ids)
    zero = torch.zeros((), dtype=z_s.dtype, device=z_s.device)
    target_logits = torch.stack([
        torch.where(is_owned, z.gather(-1, local_ids[:, None]).squeeze(-1), zero)
        for z in (z_s, z_t)], dim=-1)
    sm = _sharded_softmaxes(z_s, z_t, spec.inv_tau, shard, extra_partial_sums=target_logits)
    log_p_s = sm.extra_sums[:, 0] * spec.inv_tau - sm.lse_student
    log_p_t = sm.extra_sums[:, 1] * spec.inv_tau - sm.lse_teacher
    advantage = log_p_t - log_p_s
    # ∂(−A·log p_S(y))/∂s_j = A·p_j − A·[j = y]
    grad = sm.p_student.mul_(advantage[:, None])
    grad.scatter_add_(-1, local_ids[:, None], torch.where(is_owned, -advantage, zero)[:, None])
    return ChunkResult(-advantage * log_p_s, -advantage, sm.student_entropy, sm.teacher_entropy,
                       grad)
