"""Cross-loop distillation fused with the student's output layer.

The student's logits ``hidden @ W^T`` exist only one token chunk at a time, so the
``[R̃, T, V/TP]`` student logits are never materialized; the gradients with respect to the hidden
states and the (vocab-parallel) output weight are formed chunk by chunk in the same pass.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nemo_loop.losses.config import LoopDistillConfig
from nemo_loop.losses.distillation import run_distillation


def fused_head_distillation_loss(student_hidden: torch.Tensor, output_weight: torch.Tensor,
                                 teacher_logits: torch.Tensor, loss_mask: torch.Tensor,
                                 config: LoopDistillConfig,
                                 tp_group: dist.ProcessGroup | None = None, *,
                                 num_sequences: int | None = None,
                                 num_tokens: int | None = None, teacher_loop_ids=None,
                                 num_teacher_loops: int | None = None
                                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Same loss and metrics as :func:`cross_loop_distillation_loss` on ``hidden @ W^T``.

    Args:
        student_hidden: ``[R̃, seq, batch, h]`` final hidden states of each student loop (after
            the final norm), replicated across the tensor-parallel group.
        output_weight: ``[V/TP, h]``, this rank's rows of the vocab-parallel output layer (no
            bias, as in megatron's GPT output layer).
        teacher_logits: ``[R, seq, batch, V/TP]`` teacher logits (no gradient flows), or only
            the loops named by ``teacher_loop_ids`` with ``num_teacher_loops`` = R.

    Gradients: the hidden-state gradient is all-reduced over ``tp_group`` (as in the backward of
    megatron's ColumnParallelLinear), the weight gradient stays local to the shard.
    """
    if output_weight.dim() != 2 or output_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"output_weight must be [V/TP, h={student_hidden.shape[-1]}], got "
                         f"{tuple(output_weight.shape)}")
    return run_distillation(student_hidden, output_weight, teacher_logits, loss_mask, config,
                            tp_group, num_sequences=num_sequences, num_tokens=num_tokens,
                            teacher_loop_ids=teacher_loop_ids,
                            num_teacher_loops=num_teacher_loops)
