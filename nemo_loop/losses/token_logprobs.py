"""log p(y) of given tokens through the vocab-parallel head, without the full vocabulary.

    logp, entropy = token_logprobs(hidden, output_weight, token_ids, tp_group, temperature=τ)

``hidden`` ``[..., h]`` are loop readouts (replicated over TP), ``output_weight`` ``[V/TP, h]``
this rank's rows of the head and ``token_ids`` ``[...]`` global vocabulary ids. As in megatron's
``vocab_parallel_cross_entropy``, each rank owns a slice of the vocabulary and only per-token
scalars cross the tensor-parallel group: the maximum (one MAX all-reduce), then the partition
function, Σ e·z for the entropy and the target logit, which only its owner contributes (one SUM
all-reduce). Unlike it, the logits ``hidden @ W^T`` exist one token chunk at a time, in the
forward and again in the backward, so ``[N, V/TP]`` is never stored — a policy-gradient loss
over R̃ loops costs R̃ chunked passes, not R̃ logit tensors.

With ``temperature`` τ the distribution is softmax(z/τ): the one a sampler at temperature τ drew
from, which a policy ratio against that sampler's log-probs needs.

Gradient: ∂ log p(y)/∂z_j = ([j = y] − p_j)/τ, formed chunk by chunk from the saved
log-sum-exp; the hidden-state gradient is all-reduced over TP (the backward of
ColumnParallelLinear), the weight gradient stays with its shard. The entropy (of the same
distribution) is a metric and carries no gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nemo_loop.losses.vocab_parallel import VocabShard


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _chunks(total: int, chunk_size: int | None) -> list[slice]:
    size = chunk_size or max(total, 1)
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, token_ids, shard: VocabShard, chunk_size, inv_temperature):
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        count = hidden.shape[0]
        logp = torch.empty(count, dtype=dtype, device=hidden.device)
        entropy = torch.empty_like(logp)
        lse = torch.empty_like(logp)
        for rows in _chunks(count, chunk_size):
            z = _scaled_logits(hidden[rows], weight, dtype, inv_temperature)
            is_owned, local = shard.owned(token_ids[rows])
            maximum = shard.all_reduce(z.amax(-1), op=dist.ReduceOp.MAX)
            e = torch.sub(z, maximum[:, None]).exp_()
            target = torch.where(is_owned, z.gather(-1, local[:, None]).squeeze(-1),
                                 torch.zeros((), dtype=dtype, device=z.device))
            sums = shard.all_reduce(torch.stack([e.sum(-1), _dot(e, z), target], dim=-1))
            lse[rows] = maximum + sums[:, 0].log()
            logp[rows] = sums[:, 2] - lse[rows]
            entropy[rows] = lse[rows] - sums[:, 1] / sums[:, 0]
        ctx.save_for_backward(hidden, weight, token_ids, lse)
        ctx.shard, ctx.chunk_size, ctx.inv_temperature = shard, chunk_size, inv_temperature
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, unused_entropy_grad):
        hidden, weight, token_ids, lse = ctx.saved_tensors
        shard = ctx.shard
        dtype = lse.dtype
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=dtype) if want_weight else None
        zero = torch.zeros((), dtype=dtype, device=hidden.device)
        for rows in _chunks(hidden.shape[0], ctx.chunk_size):
            z = _scaled_logits(hidden[rows], weight, dtype, ctx.inv_temperature)
            g = grad_logp[rows].to(dtype)
            grad_z = z.sub_(lse[rows, None]).exp_().mul_(-g[:, None])  # −g·p
            is_owned, local = shard.owned(token_ids[rows])
            grad_z.scatter_add_(-1, local[:, None], torch.where(is_owned, g, zero)[:, None])
            if ctx.inv_temperature != 1.0:
                grad_z.mul_(ctx.inv_temperature)  # z/τ
            if want_hidden:
                grad_hidden[rows] = (grad_z @ weight.to(dtype)).to(hidden.dtype)
            if want_weight:
                grad_weight.addmm_(grad_z.t(), hidden[rows].to(dtype))
        if want_hidden:
            shard.all_reduce(grad_hidden)  # hidden is replicated over TP
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None, None, None, None)


def _scaled_logits(hidden: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype,
                   inv_temperature: float) -> torch.Tensor:
    z = (hidden @ weight.t()).to(dtype)
    return z if inv_temperature == 1.0 else z.mul_(inv_temperature)


def token_logprobs(hidden: torch.Tensor, output_weight: torch.Tensor, token_ids: torch.Tensor,
                   tp_group: dist.ProcessGroup | None = None, chunk_size: int | None = 1024,
                   temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(token_ids), entropy) of softmax(logits / ``temperature``), both shaped like
    ``token_ids`` and in fp32 (or fp64).

    Only ``log p`` is differentiable (w.r.t. ``hidden`` and ``output_weight``). Every id must
    lie in [0, V) with V = V/TP × TP — padding included, so pad with a valid id and mask later.
    """
    if output_weight.dim() != 2 or output_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"output_weight must be [V/TP, h={hidden.shape[-1]}], got "
                         f"{tuple(output_weight.shape)}")
    if hidden.shape[:-1] != token_ids.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and token_ids {tuple(token_ids.shape)} "
                         f"must agree on every dimension but the last")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (greedy decoding has no "
                         f"log-probs to train on)")
    shard = VocabShard.from_group(tp_group, output_weight.shape[0])
    vocab = output_weight.shape[0] * shard.world_size
    ids = token_ids.reshape(-1).long()
    bad = ids[(ids < 0) | (ids >= vocab)]
    if bad.numel():
        raise ValueError(f"token_ids must lie in [0, {vocab}) (vocabulary of {vocab} = "
                         f"{output_weight.shape[0]} per rank × TP {shard.world_size}); "
                         f"{bad.numel()} do not, e.g. {bad[:5].tolist()}")
    logp, entropy = _TokenLogProbs.apply(hidden.reshape(-1, hidden.shape[-1]), output_weight,
                                         ids, shard, chunk_size, 1.0 / temperature)
    return logp.view(token_ids.shape), entropy.view(token_ids.shape)


@torch.no_grad()
def token_is_argmax(hidden: torch.Tensor, output_weight: torch.Tensor, token_ids: torch.Tensor,
                    tp_group: dist.ProcessGroup | None = None, chunk_size: int | None = 1024
                    ) -> torch.Tensor:
    """Whether each of ``token_ids`` is the argmax of its logits (greedy decoding would pick it;
    a tie counts as picked), shaped like ``token_ids``; same inputs as :func:`token_logprobs`.

    Per token only two scalars cross the tensor-parallel group: the shard maxima (MAX) and the
    target logit, which only its owner contributes (SUM).
    """
    shard = VocabShard.from_group(tp_group, output_weight.shape[0])
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    ids = token_ids.reshape(-1).long()
    result = torch.empty(ids.shape, dtype=torch.bool, device=hidden.device)
    for rows in _chunks(ids.shape[0], chunk_size):
        z = (flat_hidden[rows] @ output_weight.t()).float()
        is_owned, local = shard.owned(ids[rows])
        maximum = shard.all_reduce(z.amax(-1), op=dist.ReduceOp.MAX)
        target = shard.all_reduce(torch.where(is_owned, z.gather(-1, local[:, None]).squeeze(-1),
                                              torch.zeros((), device=z.device)))
        result[rows] = target >= maximum
    return result.view(token_ids.shape)
