"""Input guards of the distillation losses: non-finite logits and out-of-range token ids.

A NaN or ±inf logit at a response token poisons the loss in ways that are easy to miss (top-K
forward KL with a NaN teacher logit gives a finite, wrong loss with NaN gradients), so the logits
of every response token are checked. Only response tokens count: prompt and padding positions
(``loss_mask`` 0) may hold anything. Per-token flags are all-reduced over the tensor-parallel
group, so a NaN on one rank's vocabulary shard makes every rank raise, or skip the same tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nemo_loop.losses.vocab_parallel import VocabShard

STUDENT, TEACHER = 0, 1  # rows of the flag tensor


def nonfinite_token_flags(student_loops: int, num_tokens: int,
                          device: torch.device) -> torch.Tensor:
    """Empty flags ``[2, R̃, N]``: (student, teacher at φ(r)) × student loop × response token."""
    # uint8 rather than bool: collectives reduce integers on every backend
    return torch.zeros(2, student_loops, num_tokens, dtype=torch.uint8, device=device)


def has_nonfinite(logits: torch.Tensor) -> torch.Tensor:
    """``[C]``: whether each token's row of ``logits`` ``[C, V/TP]`` holds a NaN or ±inf."""
    # A row's min and max are both finite exactly when every entry is (NaN propagates): one
    # pass without a [C, V/TP] temporary, 3× faster than isfinite().all() on CPU.
    low, high = torch.aminmax(logits, dim=-1)
    return ~(torch.isfinite(low) & torch.isfinite(high))


def reduce_flags(flags: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """A token is flagged on every rank once any rank's vocabulary shard flags it."""
    if flags.numel():  # the loss mask, hence the token count, is the same on every TP rank
        shard.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


def flagged_tokens(flags: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: response tokens with a non-finite logit on either side at any loop."""
    return flags.bool().flatten(0, 1).any(0)


def describe_nonfinite(flags: torch.Tensor, teacher_loop_of: list[int]) -> str | None:
    """None when nothing is flagged, else e.g. "student loop 2: 3 tokens; teacher loop 4: 1 token".

    ``teacher_loop_of[r]`` is the 1-based teacher loop compared with student loop r + 1; a teacher
    loop shared by several student loops is counted once.
    """
    flags = flags.bool()
    parts = []
    for r in range(flags.shape[1]):
        count = int(flags[STUDENT, r].sum())
        if count:
            parts.append(f"student loop {r + 1}: {_tokens(count)}")
    for loop in sorted(set(teacher_loop_of)):
        rows = [r for r, t in enumerate(teacher_loop_of) if t == loop]
        count = int(flags[TEACHER, rows].any(0).sum())
        if count:
            parts.append(f"teacher loop {loop}: {_tokens(count)}")
    return "; ".join(parts) or None


def nonfinite_error(description: str) -> ValueError:
    return ValueError(
        f"non-finite logits (NaN or ±inf) at response tokens (loss_mask set): {description}. "
        "Set LoopDistillConfig.nonfinite='skip' to leave such tokens out of the loss.")


def check_token_ids(token_ids: torch.Tensor, loss_mask: torch.Tensor, local_vocab: int,
                    shard: VocabShard) -> None:
    """Sampled token ids at response tokens must lie in [0, V) with V = local_vocab × TP.

    Without the check, an id past the vocabulary is silently "owned by no rank" under TP and its
    target logit counts as 0. Token ids are replicated over TP, so every rank raises alike.
    """
    vocab = local_vocab * shard.world_size
    ids = token_ids[loss_mask.bool()]
    bad = ids[(ids < 0) | (ids >= vocab)]
    if bad.numel():
        raise ValueError(f"token_ids must lie in [0, {vocab}) (vocabulary of {vocab} = "
                         f"{local_vocab} per rank × TP {shard.world_size}) at response tokens; "
                         f"{bad.numel()} do not, e.g. {bad[:5].tolist()}")


def _tokens(count: int) -> str:
    return f"{count} token{'s' if count != 1 else ''}"
