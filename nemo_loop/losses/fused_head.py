"""Cross-loop distillation fused with the output layer of the student (and of the teacher).

The student's logits ``hidden @ W^T`` exist only one token chunk at a time, so the
``[R̃, T, V/TP]`` student logits are never materialized; the gradients with respect to the hidden
states and the (vocab-parallel) output weight are formed chunk by chunk in the same pass. Given
the teacher's readouts and output weight, the teacher's logits are formed the same way, so no
``[n, T, V/TP]`` tensor exists on either side (LLOPSD's default).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nemo_loop.losses.config import LoopDistillConfig
from nemo_loop.losses.distillation import run_distillation
from nemo_loop.losses.normalization import LossNormalizer


def fused_head_distillation_loss(student_hidden: torch.Tensor, output_weight: torch.Tensor,
                                 teacher: torch.Tensor, loss_mask: torch.Tensor,
                                 config: LoopDistillConfig,
                                 tp_group: dist.ProcessGroup | None = None, *,
                                 normalizer: LossNormalizer | None = None, teacher_loop_ids=None,
                                 num_teacher_loops: int | None = None,
                                 token_ids: torch.Tensor | None = None,
                                 token_weights: torch.Tensor | None = None,
                                 teacher_output_weight: torch.Tensor | None = None
                                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Same loss and metrics as :func:`cross_loop_distillation_loss` on ``hidden @ W^T`` — or,
    with ``token_ids`` ``[seq, batch]`` (the sampled tokens), as
    :func:`sampled_token_distillation_loss` on ``hidden @ W^T``.

    Args:
        student_hidden: ``[R̃, seq, batch, h]`` final hidden states of each student loop (after
            the final norm), replicated across the tensor-parallel group.
        output_weight: ``[V/TP, h]``, this rank's rows of the vocab-parallel output layer (no
            bias, as in megatron's GPT output layer).
        teacher: ``[R, seq, batch, V/TP]`` teacher logits (no gradient flows), or only
            the loops named by ``teacher_loop_ids`` with ``num_teacher_loops`` = R; with
            ``teacher_output_weight``, the teacher's readouts ``[·, seq, batch, h_T]`` (hidden
            states after the final norm) of those loops instead.
        teacher_output_weight: ``[V/TP, h_T]``, the teacher's output-layer shard (same vocabulary
            layout as ``output_weight``; the student's own for a self-teacher, detached here).
        token_weights: ``[seq, batch]`` per-token weights replacing the aggregation's normaliser
            (may be negative), see :func:`~nemo_loop.losses.distillation.run_distillation`.

    Gradients: the hidden-state gradient is all-reduced over ``tp_group`` (as in the backward of
    megatron's ColumnParallelLinear), the weight gradient stays local to the shard.
    """
    if output_weight.dim() != 2 or output_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"output_weight must be [V/TP, h={student_hidden.shape[-1]}], got "
                         f"{tuple(output_weight.shape)}")
    if token_ids is not None and token_ids.shape != loss_mask.shape:
        raise ValueError(f"token_ids {tuple(token_ids.shape)} must match loss_mask "
                         f"{tuple(loss_mask.shape)}")
    return run_distillation(student_hidden, output_weight, teacher, loss_mask, config,
                            tp_group, token_ids=token_ids, normalizer=normalizer,
                            teacher_loop_ids=teacher_loop_ids,
                            num_teacher_loops=num_teacher_loops, token_weights=token_weights,
                            teacher_output_weight=teacher_output_weight)
