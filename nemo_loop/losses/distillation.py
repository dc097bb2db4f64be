"""Cross-loop distillation: student loop r learns the teacher's distribution at loop φ(r).

    loss = Σ_r α_r · mean_y D(p_S^(r) ‖ p_T^(φ(r)))

where the mean runs over response tokens (``loss_mask``) per sequence and then over sequences
(``aggregation="sequence_mean"``), or over all response tokens (``"token_mean"``), with the
counts of a whole training step when the caller passes them (``normalizer``). Logits are
megatron's ``[s, b, v]`` layout with a leading loop dimension and the vocabulary sharded over the
tensor-parallel group. The teacher is a constant (stop-gradient), and so is the adaptive α.

Memory: one autograd function runs the whole loss token chunk by token chunk and writes the
gradient of each chunk as it goes (it depends only on the chunk plus per-token scalars), so the
only full-size tensor it keeps is the gradient itself; nothing else of size [R̃, T, V] is saved.
Backward only scales that gradient by the incoming scalar. Either side may come as readouts plus
its output weight instead of logits; its logits then exist one token chunk at a time.

Non-finite logits at response tokens are caught where each chunk's logits are formed (for the
fused head, right after its matmul) and raise, or with ``nonfinite="skip"`` are found by a first
pass and left out of the loss; see :mod:`nemo_loop.losses.input_guards`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from nemo_loop.losses.config import LoopDistillConfig
from nemo_loop.losses.input_guards import (
    STUDENT,
    TEACHER,
    check_token_ids,
    describe_nonfinite,
    flagged_tokens,
    has_nonfinite,
    nonfinite_error,
    nonfinite_token_flags,
    reduce_flags,
)
from nemo_loop.losses.loop_mapping import adaptive_loop_weights
from nemo_loop.losses.normalization import LossNormalizer
from nemo_loop.losses.vocab_parallel import (
    ChunkResult,
    KernelSpec,
    VocabShard,
    dense_divergence,
    sampled_token_objective,
    top_k_divergence,
)

METRIC_NAMES = ("loss_per_loop", "divergence_per_loop", "student_entropy_per_loop",
                "teacher_entropy_per_loop")


@dataclass(frozen=True)
class _Chunk:
    first: int  # position in the list of response tokens
    end: int
    rows: slice | torch.Tensor  # rows of the flattened [s·b] token axis


@dataclass
class _Plan:
    chunks: list[_Chunk]
    token_weights: torch.Tensor  # [N] normalizer of each response token
    teacher_index: list[int]  # 0-based φ(r) − 1
    fixed_alpha: torch.Tensor | None  # None: adaptive
    spec: KernelSpec
    shard: VocabShard
    compute_dtype: torch.dtype
    token_ids: torch.Tensor | None  # flattened [s·b] sampled tokens, sampled-token objective only
    teacher_loop_of: list[int]  # 1-based φ(r), for error messages
    # [V/TP, h_T]: the teacher tensor holds readouts and its logits are formed chunk by chunk
    teacher_weight: torch.Tensor | None = None


def _take_rows(matrix: torch.Tensor, rows: slice | torch.Tensor) -> torch.Tensor:
    return matrix[rows] if isinstance(rows, slice) else matrix.index_select(0, rows)


def _put_rows(matrix: torch.Tensor, rows: slice | torch.Tensor, values: torch.Tensor) -> None:
    if isinstance(rows, slice):
        matrix[rows] = values
    else:
        matrix.index_copy_(0, rows, values.to(matrix.dtype))


def _chunk_logits(student, output_weight, teacher, r: int, chunk: _Chunk, plan: _Plan):
    """(student rows, z_S, z_T) of one chunk of student loop r, in the compute dtype."""
    rows = _take_rows(student[r], chunk.rows)
    z_s = (rows if output_weight is None else rows @ output_weight.t()).to(plan.compute_dtype)
    teacher_rows = _take_rows(teacher[plan.teacher_index[r]], chunk.rows)
    if plan.teacher_weight is not None:
        teacher_rows = teacher_rows @ plan.teacher_weight.t()
    return rows, z_s, teacher_rows.to(plan.compute_dtype)


def _flag_chunk(flags: torch.Tensor, r: int, chunk: _Chunk, z_s, z_t) -> None:
    flags[STUDENT, r, chunk.first:chunk.end] = has_nonfinite(z_s)
    flags[TEACHER, r, chunk.first:chunk.end] = has_nonfinite(z_t)


def _raise_on_nonfinite(flags: torch.Tensor, plan: _Plan) -> None:
    description = describe_nonfinite(reduce_flags(flags, plan.shard), plan.teacher_loop_of)
    if description is not None:
        raise nonfinite_error(description)


@torch.no_grad()
def _find_nonfinite(student, output_weight, teacher, plan: _Plan) -> torch.Tensor:
    """``[2, R̃, N]`` flags of every response token, before any token is weighted (skip mode)."""
    flags = nonfinite_token_flags(student.shape[0], plan.token_weights.numel(), student.device)
    for r in range(student.shape[0]):
        for chunk in plan.chunks:
            _, z_s, z_t = _chunk_logits(student, output_weight, teacher, r, chunk, plan)
            _flag_chunk(flags, r, chunk, z_s, z_t)
    return reduce_flags(flags, plan.shard)


def _run_kernel(z_s, z_t, chunk: _Chunk, plan: _Plan) -> ChunkResult:
    if plan.token_ids is not None:
        return sampled_token_objective(z_s, z_t, _take_rows(plan.token_ids, chunk.rows),
                                       plan.spec, plan.shard)
    if plan.spec.top_k is not None:
        return top_k_divergence(z_s, z_t, plan.spec, plan.shard)
    return dense_divergence(z_s, z_t, plan.spec, plan.shard)


class _LoopDistillation(torch.autograd.Function):
    """Loss, gradients and metrics in one chunked pass.

    ``student`` is either logits ``[R̃, T, V/TP]`` or, with ``output_weight`` ``[V/TP, h]``,
    hidden states ``[R̃, T, h]`` whose logits are formed chunk by chunk and never stored whole.
    ``teacher`` likewise: logits, or readouts with ``plan.teacher_weight`` (no gradient).
    """

    @staticmethod
    def forward(ctx, student, output_weight, teacher, plan: _Plan):
        fused = output_weight is not None
        want_grad = any(ctx.needs_input_grad[:2])
        dtype = plan.compute_dtype
        student_loops = student.shape[0]
        per_loop = torch.zeros(len(METRIC_NAMES), student_loops, dtype=dtype,
                               device=student.device)
        grad_student = torch.zeros_like(student) if want_grad else None
        weight_grads = _WeightGradAccumulator(output_weight, plan, dtype) \
            if fused and want_grad else None
        flags = nonfinite_token_flags(student_loops, plan.token_weights.numel(), student.device)

        for r in range(student_loops):
            scale = plan.spec.inv_tau * (1.0 if plan.fixed_alpha is None else plan.fixed_alpha[r])
            for chunk in plan.chunks:
                rows, z_s, z_t = _chunk_logits(student, output_weight, teacher, r, chunk, plan)
                _flag_chunk(flags, r, chunk, z_s, z_t)
                result = _run_kernel(z_s, z_t, chunk, plan)
                w = plan.token_weights[chunk.first:chunk.end]
                per_loop[:, r] += torch.stack([result.loss, result.divergence,
                                               result.student_entropy,
                                               result.teacher_entropy]) @ w
                if not want_grad:
                    continue
                token_scale = (w * scale)[:, None]
                if fused:
                    # both products in the head's dtype, as megatron's linear layers do; the
                    # scaling writes straight into that dtype (one pass), the weight gradient
                    # is summed in the compute dtype
                    head_grad = result.grad.mul_(token_scale) \
                        if result.grad.dtype == output_weight.dtype \
                        else torch.mul(result.grad, token_scale, out=torch.empty_like(
                            result.grad, dtype=output_weight.dtype))
                    _put_rows(grad_student[r], chunk.rows, head_grad @ output_weight)
                    weight_grads.add(head_grad, rows)
                else:
                    _put_rows(grad_student[r], chunk.rows, result.grad.mul_(token_scale))
            if weight_grads is not None:
                weight_grads.end_loop(per_loop[1, r])
        # After the pass, so one collective covers every chunk; NaNs only flowed into values
        # that are now discarded. In skip mode the first pass already removed these tokens.
        _raise_on_nonfinite(flags, plan)

        alpha = plan.fixed_alpha if plan.fixed_alpha is not None \
            else adaptive_loop_weights(per_loop[1])
        grad_weight = None
        if want_grad:
            if plan.fixed_alpha is None:
                grad_student.mul_(alpha.to(grad_student.dtype).view(-1, *[1] * (student.dim() - 1)))
            if fused:
                # hidden states are replicated over TP: their gradient is the sum of every
                # rank's partial product, as in ColumnParallelLinear's backward
                plan.shard.all_reduce(grad_student)
                grad_weight = weight_grads.result()
        ctx.grads = (grad_student, grad_weight)
        loss = (alpha * per_loop[0]).sum()
        metrics = (*per_loop, alpha.clone())
        ctx.mark_non_differentiable(*metrics)
        return (loss, *metrics)

    @staticmethod
    def backward(ctx, grad_loss, *unused_metric_grads):
        grad_student, grad_weight = ctx.grads
        # out of place so backward stays re-entrant (retain_graph, gradcheck)
        return (None if grad_student is None else grad_student * grad_loss.to(grad_student.dtype),
                None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype),
                None, None)


class _WeightGradAccumulator:
    """Σ_r α_r ∂ℓ_r/∂W for the fused head; adaptive α is known only after the last loop."""

    def __init__(self, output_weight: torch.Tensor, plan: _Plan, dtype: torch.dtype):
        self.output_weight = output_weight
        self.adaptive = plan.fixed_alpha is None
        self.dtype = dtype
        self.current = torch.zeros_like(output_weight, dtype=dtype)
        if self.adaptive:
            self.divergence_weighted = torch.zeros_like(self.current)
            self.unweighted = torch.zeros_like(self.current)
            self.divergence_total = 0.0
            self.loops = 0

    def add(self, grad_logits: torch.Tensor, hidden_rows: torch.Tensor) -> None:
        """``grad_logits`` [C, V/TP] and ``hidden_rows`` [C, h], both in the head's dtype."""
        if grad_logits.dtype == self.dtype:
            self.current.addmm_(grad_logits.t(), hidden_rows)
        else:  # a bf16/fp16 GEMM (several times faster on CPU and GPU), fp32 accumulation
            self.current.add_(grad_logits.t() @ hidden_rows)

    def end_loop(self, divergence: torch.Tensor) -> None:
        if not self.adaptive:
            return  # fixed α is already folded into grad_logits
        clamped = max(divergence.item(), 0.0)
        self.divergence_weighted.add_(self.current, alpha=clamped)
        self.divergence_total += clamped
        self.unweighted.add_(self.current)
        self.current.zero_()
        self.loops += 1

    def result(self) -> torch.Tensor:
        if not self.adaptive:
            return self.current.to(self.output_weight.dtype)
        # mirrors adaptive_loop_weights: α_r = d_r / Σ d_j, uniform when every d_r is 0
        if self.divergence_total > 0:
            combined = self.divergence_weighted.div_(self.divergence_total)
        else:
            combined = self.unweighted.div_(self.loops)
        return combined.to(self.output_weight.dtype)


def response_token_weights(loss_mask: torch.Tensor, aggregation: str,
                           normalizer: LossNormalizer | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices of response tokens in the s·b token axis, each token's float64 weight).

    ``loss_mask`` is ``[seq, batch]``; the weights follow
    :meth:`~nemo_loop.losses.normalization.LossNormalizer.weights` with ``normalizer`` (a training
    step's counts over all its micro-batches and ranks), or with this mask's own counts.
    """
    by_row = loss_mask.t()
    normalizer = normalizer or LossNormalizer.count([by_row])
    grid = normalizer.weights(by_row, aggregation, torch.float64).t()
    index = loss_mask.ne(0).reshape(-1).nonzero().squeeze(1)
    return index, grid.reshape(-1)[index]


def _token_chunks(index: torch.Tensor, chunk_size: int | None) -> list[_Chunk]:
    total = index.numel()
    size = chunk_size or max(total, 1)
    starts = list(range(0, total, size))
    if not starts:
        return []
    ends = [min(s + size, total) for s in starts]
    # one host transfer for every chunk boundary; runs of consecutive tokens become slices (views)
    firsts, lasts = index[starts].tolist(), index[[e - 1 for e in ends]].tolist()
    chunks = []
    for a, b, first, last in zip(starts, ends, firsts, lasts):
        rows = slice(first, last + 1) if last - first == b - a - 1 else index[a:b]
        chunks.append(_Chunk(a, b, rows))
    return chunks


def _check_shapes(student: torch.Tensor, teacher: torch.Tensor, loss_mask: torch.Tensor,
                  local_vocab: int, teacher_weight: torch.Tensor | None) -> None:
    if teacher.dim() != 4 or student.dim() != 4:
        raise ValueError("student and teacher tensors must be [n_loops, seq, batch, ·], got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if teacher.shape[1:3] != student.shape[1:3] or loss_mask.shape != student.shape[1:3]:
        raise ValueError(f"[seq, batch] must agree: student {tuple(student.shape[1:3])}, teacher "
                         f"{tuple(teacher.shape[1:3])}, loss_mask "
                         f"{tuple(loss_mask.shape)}")
    if teacher_weight is None:
        if teacher.shape[3] != local_vocab:
            raise ValueError(f"teacher vocab shard has {teacher.shape[3]} entries, the student "
                             f"{local_vocab}")
    elif teacher_weight.dim() != 2 or teacher_weight.shape != (local_vocab, teacher.shape[3]):
        raise ValueError(f"teacher_output_weight must be [V/TP={local_vocab}, h={teacher.shape[3]}]"
                         f" (the student's vocab shard × the teacher readouts' width), got "
                         f"{tuple(teacher_weight.shape)}")


def _teacher_rows(teacher_logits: torch.Tensor, teacher_loop_ids, num_teacher_loops):
    """R and the 1-based teacher loop held by each row of ``teacher_logits``.

    By default the rows are loops 1..R. A teacher that only ran (and read out) the mapped loops
    passes ``teacher_loop_ids`` (its rows' loops) with ``num_teacher_loops`` = R.
    """
    if (teacher_loop_ids is None) != (num_teacher_loops is None):
        raise ValueError("teacher_loop_ids and num_teacher_loops go together")
    if teacher_loop_ids is None:
        return teacher_logits.shape[0], list(range(1, teacher_logits.shape[0] + 1))
    rows = list(teacher_loop_ids)
    if len(rows) != teacher_logits.shape[0]:
        raise ValueError(f"teacher_loop_ids names {len(rows)} loops but teacher_logits has "
                         f"{teacher_logits.shape[0]} rows")
    if any(not 1 <= r <= num_teacher_loops for r in rows):
        raise ValueError(f"teacher_loop_ids {rows} must lie in [1, {num_teacher_loops}]")
    return num_teacher_loops, rows


def _rows_for(mapping: list[int], teacher_rows: list[int]) -> list[int]:
    missing = sorted(set(mapping) - set(teacher_rows))
    if missing:
        raise ValueError(f"the loop mapping needs teacher loops {missing}, which teacher_logits "
                         f"does not hold (it holds {teacher_rows})")
    return [teacher_rows.index(t) for t in mapping]


def run_distillation(student: torch.Tensor, output_weight: torch.Tensor | None,
                     teacher_logits: torch.Tensor, loss_mask: torch.Tensor,
                     config: LoopDistillConfig, tp_group: dist.ProcessGroup | None,
                     token_ids: torch.Tensor | None = None,
                     normalizer: LossNormalizer | None = None, teacher_loop_ids=None,
                     num_teacher_loops: int | None = None,
                     token_weights: torch.Tensor | None = None,
                     teacher_output_weight: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Shared entry of the logits, fused-head and sampled-token losses.

    With ``teacher_output_weight`` ``[V/TP, h]``, ``teacher_logits`` holds the teacher's readouts
    ``[n, seq, batch, h]`` instead, and teacher logits exist one chunk at a time.

    ``token_weights`` ``[seq, batch]``, if given, replaces the aggregation's per-token normaliser:
    each response token counts with its own weight, which may be negative (OISD weights the
    divergence by a clipped advantage). Metrics are weighted the same way.
    """
    local_vocab = student.shape[-1] if output_weight is None else output_weight.shape[0]
    _check_shapes(student, teacher_logits, loss_mask, local_vocab, teacher_output_weight)
    student_loops = student.shape[0]
    teacher_loops, teacher_rows = _teacher_rows(teacher_logits, teacher_loop_ids,
                                                num_teacher_loops)
    config.validate(student_loops, teacher_loops)
    if config.top_k is not None and token_ids is None:
        shard_vocab = local_vocab * (dist.get_world_size(tp_group) if tp_group else 1)
        if config.top_k > shard_vocab:
            raise ValueError(f"top_k={config.top_k} exceeds the vocabulary size {shard_vocab}")
    compute_dtype = torch.promote_types(student.dtype, torch.float32)
    shard = VocabShard.from_group(tp_group, local_vocab)
    if token_ids is not None:
        check_token_ids(token_ids, loss_mask, local_vocab, shard)
    mapping = config.teacher_loop_for_each_student_loop(student_loops, teacher_loops)
    fixed_alpha = None if config.weighting == "adaptive" \
        else config.fixed_loop_weights(student_loops).to(compute_dtype)
    if token_weights is not None and token_weights.shape != loss_mask.shape:
        raise ValueError(f"token_weights {tuple(token_weights.shape)} must match loss_mask "
                         f"{tuple(loss_mask.shape)}")

    def weights_of(mask):
        index, weights = response_token_weights(mask, config.aggregation, normalizer)
        if token_weights is not None:
            weights = token_weights.reshape(-1)[index.to(token_weights.device)].double()
        return index, weights

    index, weights = weights_of(loss_mask)
    plan = _Plan(
        chunks=_token_chunks(index, config.chunk_size),
        token_weights=weights.to(device=student.device, dtype=compute_dtype),
        teacher_index=_rows_for(mapping, teacher_rows),
        fixed_alpha=None if fixed_alpha is None else fixed_alpha.to(student.device),
        spec=KernelSpec(config.divergence, config.beta, 1.0 / config.temperature,
                        config.top_k, config.top_k_mode),
        shard=shard,
        compute_dtype=compute_dtype,
        token_ids=None if token_ids is None else token_ids.reshape(-1).long(),
        teacher_loop_of=mapping,
        # the teacher is a constant even when it is the student's own head (teacher mode "same")
        teacher_weight=None if teacher_output_weight is None else teacher_output_weight.detach(),
    )
    seq, batch = loss_mask.shape
    flat_student = student.reshape(student_loops, seq * batch, student.shape[-1])
    flat_teacher = teacher_logits.detach().reshape(len(teacher_rows), seq * batch,
                                                   teacher_logits.shape[-1])
    skipped = 0
    if config.nonfinite == "skip":
        bad = flagged_tokens(_find_nonfinite(flat_student, output_weight, flat_teacher, plan))
        skipped = int(bad.sum())
        if skipped:
            # as if loss_mask were 0 there: the per-sequence and per-batch normalizers shrink too
            kept = loss_mask.flatten().clone()
            kept[index[bad.to(index.device)]] = 0
            index, weights = weights_of(kept.view(loss_mask.shape))
            plan.chunks = _token_chunks(index, config.chunk_size)
            plan.token_weights = weights.to(device=student.device, dtype=compute_dtype)
    loss, *values = _LoopDistillation.apply(flat_student, output_weight, flat_teacher, plan)
    metrics = dict(zip((*METRIC_NAMES, "loop_weights"), values))
    metrics["nonfinite_tokens"] = torch.tensor(float(skipped), device=loss.device)
    return loss, metrics


def cross_loop_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                                 loss_mask: torch.Tensor, config: LoopDistillConfig,
                                 tp_group: dist.ProcessGroup | None = None, *,
                                 normalizer: LossNormalizer | None = None, teacher_loop_ids=None,
                                 num_teacher_loops: int | None = None
                                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ_r α_r · masked-mean D(p_S^(r) ‖ p_T^(φ(r))), exact over the TP-sharded vocabulary.

    Args:
        student_logits: ``[R̃, seq, batch, V/TP]``, this rank's vocabulary shard
            [rank·V/TP, (rank+1)·V/TP) for student loops 1..R̃.
        teacher_logits: ``[R, seq, batch, V/TP]`` for teacher loops 1..R (no gradient flows).
        loss_mask: ``[seq, batch]``, nonzero at response tokens; other tokens contribute nothing
            and get zero gradient. Sequences without response tokens are left out of the mean.
        config: :class:`LoopDistillConfig`.
        tp_group: the tensor-parallel group the vocabulary is sharded over; ``None`` means the
            full vocabulary is local.
        normalizer: the counts ``config.aggregation`` divides by: a training step's, over all
            its micro-batches and data-parallel ranks (default: this mask's own).
        teacher_loop_ids / num_teacher_loops: when ``teacher_logits`` holds only some teacher
            loops (e.g. just the mapped ones), their 1-based ids and the teacher's R.

    Returns:
        The scalar loss and detached metrics, each ``[R̃]`` and reduced like the loss:
        ``loss_per_loop``, ``divergence_per_loop``, ``student_entropy_per_loop``,
        ``teacher_entropy_per_loop`` (at φ(r)) and ``loop_weights`` (α); plus the scalar
        ``nonfinite_tokens``, the response tokens ``config.nonfinite="skip"`` left out.

    Raises:
        ValueError: a NaN/±inf logit at a response token (``config.nonfinite="error"``), on
            every TP rank alike.
    """
    return run_distillation(student_logits, None, teacher_logits, loss_mask, config, tp_group,
                            normalizer=normalizer, teacher_loop_ids=teacher_loop_ids,
                            num_teacher_loops=num_teacher_loops)


def sampled_token_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                                    token_ids: torch.Tensor, loss_mask: torch.Tensor,
                                    config: LoopDistillConfig,
                                    tp_group: dist.ProcessGroup | None = None, *,
                                    normalizer: LossNormalizer | None = None,
                                    teacher_loop_ids=None,
                                    num_teacher_loops: int | None = None
                                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """OPSD's sampled-token objective per loop: Σ_r α_r · masked-mean(−A_t · log p_S^(r)(y_t)).

    ``A_t = log p_T^(φ(r))(y_t) − log p_S^(r)(y_t)`` is detached; ``token_ids`` ``[seq, batch]``
    holds the sampled tokens y_t as global vocabulary ids; at response tokens they must lie in
    [0, V) with V = V/TP × TP, else ValueError. ``config.divergence``/``top_k`` are
    not used. ``divergence_per_loop`` reports masked-mean(log p_S(y) − log p_T(y)), a one-sample
    estimate of KL(p_S ‖ p_T); ``"adaptive"`` weighting uses it, clamped at 0.
    """
    if token_ids.shape != loss_mask.shape:
        raise ValueError(f"token_ids {tuple(token_ids.shape)} must match loss_mask "
                         f"{tuple(loss_mask.shape)}")
    return run_distillation(student_logits, None, teacher_logits, loss_mask, config, tp_group,
                            token_ids=token_ids, normalizer=normalizer,
                            teacher_loop_ids=teacher_loop_ids,
                            num_teacher_loops=num_teacher_loops)
