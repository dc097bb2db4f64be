"""One normalization rule for every training loss: a step's loss is a mean over the whole step.

    normalizer = LossNormalizer.count(masks, group)         # once per step: all micro-batches,
                                                             # all data-parallel ranks
    weights = normalizer.weights(mask, "sequence_mean")     # per micro-batch, [b, ...]
    loss = (weights * per_token_loss).sum()                  # this micro-batch's share

``token_mean`` weighs every loss-mask token 1/(loss-mask tokens of the step); ``sequence_mean``
weighs each token of sequence i 1/(|y_i| · sequences of the step that have a loss-mask token).
Either way the weights of one step sum to 1, and the shares of its micro-batches add up to the
same number whatever the micro-batch size, the micro-batch packing or the data-parallel layout —
with a per-micro-batch mean, masked rows and unequal lengths would change the objective with the
layout (the gradient-accumulation bug). The counts are NeMo-RL's ``global_valid_toks`` /
``global_valid_seqs``.

Masks are batch-first (one row per sequence, as a micro-batch's ``input_ids``); a row's tokens are
its non-zero entries in every other dimension.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

AGGREGATIONS = ("token_mean", "sequence_mean")


def check_aggregation(field: str, aggregation: str) -> str:
    """``aggregation`` if it is one of :data:`AGGREGATIONS`, else a ValueError naming ``field``."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"{field} must be one of {AGGREGATIONS}, got {aggregation!r}")
    return aggregation


@dataclass(frozen=True)
class LossNormalizer:
    """The loss-mask counts of one training step (over its micro-batches and ranks)."""

    tokens: float  # non-zero loss-mask entries
    sequences: float  # rows with at least one

    @classmethod
    def count(cls, masks: Iterable[torch.Tensor],
              group: dist.ProcessGroup | None = None) -> LossNormalizer:
        """Sum the counts of ``masks`` (each ``[b, ...]``) and, with ``group``, over its ranks
        (one all-reduce of two numbers)."""
        totals = [torch.stack([rows.sum(), rows.gt(0).sum()])
                  for rows in (mask.reshape(mask.shape[0], -1).ne(0).sum(1) for mask in masks)]
        counts = torch.stack(totals).sum(0).double() if totals \
            else torch.zeros(2, dtype=torch.float64)
        if group is not None and dist.get_world_size(group) > 1:
            if torch.cuda.is_available():  # NCCL reduces device tensors
                counts = counts.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(counts, group=group)
        tokens, sequences = counts.tolist()
        return cls(tokens, sequences)

    def weights(self, mask: torch.Tensor, aggregation: str,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Per-entry weights of ``mask`` ``[b, ...]`` (0 where the mask is 0) on the mask's
        device, computed in float64; over the whole step they sum to 1."""
        present = mask.ne(0).double()
        if aggregation == "token_mean":
            weights = present / max(self.tokens, 1.0)
        elif aggregation == "sequence_mean":
            lengths = present.reshape(present.shape[0], -1).sum(1).clamp_min(1.0)
            weights = present / (lengths.view(-1, *[1] * (mask.dim() - 1))
                                 * max(self.sequences, 1.0))
        else:
            check_aggregation("aggregation", aggregation)
        return weights.to(dtype)
