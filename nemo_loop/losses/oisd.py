"""OISD's self-distillation terms, adapted to loops: intermediate loops r < R̃ pulled towards (or,
for below-average rollouts, pushed away from) the policy's own last loop R̃.

Per response token, with Â_i the rollout's group-normalised advantage and c the clip:

* logit term: clip(Â_i, −c, c) · JSD_τ(p^(r) ‖ sg p^(R̃)), p^(r) the loop-r readout through the
  shared final norm and head (a logit lens); JSD with β = ½ at temperature τ, exact over the
  TP-sharded vocabulary (the fused cross-loop distillation kernel, with per-token weights);
* attention term: clip(Â_i, −c, c) · JSD(a^(r) ‖ sg a^(R̃)) between the attention rows of one
  layer at loop r and at loop R̃, averaged over heads, only at a few sampled decoding steps and
  over sampled keys: the ``window`` most recent positions plus every ``stride``-th position from
  the sequence start, each row renormalised (softmax) over that set.

Both are averaged uniformly over the configured loops r and aggregated like the policy loss
(the token weights); a sampled step carries its sequence's total token weight divided by the
number of steps sampled from it. The paper's exact coefficients are not public; the defaults of
:class:`OISDLossConfig` are this project's choice (docs/baselines.md).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nemo_loop.losses.config import LoopDistillConfig
from nemo_loop.losses.fused_head import fused_head_distillation_loss


@dataclass
class OISDLossConfig:
    """Section ``oisd`` of the OISD config (defaults: this project's choice, see module doc)."""

    loops: list[int] | None = None  # intermediate student loops r, 1 <= r < R̃ (null: all)
    logit_coef: float = 0.1  # λ_logit
    attention_coef: float = 0.05  # λ_attn (0: no attention term, no probe)
    temperature: float = 1.0  # τ of the logit-lens JSD
    advantage_clip: float = 1.0  # c in clip(Â, −c, c)
    attention_layer: int = -1  # which shared layer's attention (negative: from the end)
    attention_steps: int = 4  # sampled decoding steps per rollout
    attention_window: int = 16  # most recent keys of each sampled step (itself included)
    attention_stride: int = 32  # plus every stride-th position from the sequence start

    def validate(self, student_loops: int, num_layers: int) -> None:
        for name in ("logit_coef", "attention_coef", "advantage_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"oisd.{name} must be a finite number >= 0, got {value}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"oisd.temperature must be > 0, got {self.temperature}")
        if student_loops < 2:
            raise ValueError(f"OISD needs rollout.student_loops (R̃) >= 2: its terms pull "
                             f"intermediate loops r < R̃ towards loop R̃, got R̃={student_loops}")
        loops = self.intermediate_loops(student_loops)
        bad = [r for r in loops if not 1 <= r < student_loops]
        if bad or not loops or loops != sorted(set(loops)):
            raise ValueError(f"oisd.loops must be increasing intermediate student loops r with "
                             f"1 <= r < R̃={student_loops} (loop R̃ is the target), got "
                             f"{self.loops}")
        if not -num_layers <= self.attention_layer < num_layers:
            raise ValueError(f"oisd.attention_layer {self.attention_layer} does not exist: the "
                             f"model has {num_layers} shared layers")
        for name in ("attention_steps", "attention_window", "attention_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"oisd.{name} must be >= 1, got {getattr(self, name)}")

    def intermediate_loops(self, student_loops: int) -> list[int]:
        return list(range(1, student_loops)) if self.loops is None else list(self.loops)


def logit_lens_jsd(student_hidden: torch.Tensor, output_weight: torch.Tensor,
                   final_logits: torch.Tensor, loss_mask: torch.Tensor,
                   token_weights: torch.Tensor, temperature: float,
                   tp_group: dist.ProcessGroup | None = None, chunk_size: int | None = 1024
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over the k loops of Σ_tokens weight · JSD_τ(p^(r) ‖ p^(R̃)), per-loop values [k]).

    ``student_hidden`` ``[k, T, b, h]`` readouts of the loops r; ``final_logits``
    ``[1, T, b, V/TP]`` the last loop's logits (no gradient flows into them);
    ``token_weights`` ``[T, b]`` (clipped advantage × aggregation weight, may be negative).
    """
    loops = student_hidden.shape[0]
    # Every one of the k rows maps onto the single target row ("fixed" with R = k).
    config = LoopDistillConfig(divergence="jsd", beta=0.5, temperature=temperature,
                               mapping="fixed", weighting="uniform", chunk_size=chunk_size)
    loss, metrics = fused_head_distillation_loss(
        student_hidden, output_weight, final_logits.detach(), loss_mask, config, tp_group,
        teacher_loop_ids=[loops], num_teacher_loops=loops, token_weights=token_weights)
    return loss, metrics["loss_per_loop"]


# ----- the attention term -----

@dataclass
class AttentionSamples:
    """K sampled (sequence, decoding step) pairs and their key sets, for one micro-batch."""

    rows: torch.Tensor  # [K] batch row of each sample
    query_columns: torch.Tensor  # [K] the column whose attention row is compared
    key_columns: torch.Tensor  # [K, W] sampled keys (padded with the query column)
    key_valid: torch.Tensor  # [K, W] bool
    weights: torch.Tensor  # [K] aggregation weight × clipped advantage


def sampled_key_columns(query_column: int, first_column: int, window: int,
                        stride: int) -> list[int]:
    """The ``window`` most recent columns up to the query, plus every ``stride``-th column from
    the sequence's first real column before that window."""
    local_start = max(first_column, query_column - window + 1)
    strided = range(first_column, local_start, stride)
    return list(strided) + list(range(local_start, query_column + 1))


def sample_attention_steps(response_lengths: list[int], prompt_length: int,
                           prompt_lengths: list[int], uids: list[str], seed: str,
                           config: OISDLossConfig, sequence_weights: torch.Tensor
                           ) -> AttentionSamples:
    """``config.attention_steps`` decoding steps per response (all when shorter), drawn from a
    stream seeded by ``seed`` and the rollout's uid — the same whatever the batch layout.

    Columns follow ``nemo_loop.data.sequences``: prompts end at column P − 1, response token j
    is predicted at column P − 1 + j. ``sequence_weights`` ``[b]`` is each rollout's weight,
    split evenly over its sampled steps.
    """
    rows, queries, key_lists, weights = [], [], [], []
    for row, (length, own_prompt, uid) in enumerate(zip(response_lengths, prompt_lengths, uids)):
        if length == 0:
            continue
        generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{uid}".encode()))
        steps = sorted(torch.randperm(length, generator=generator)[:config.attention_steps]
                       .tolist())
        first = prompt_length - own_prompt
        for step in steps:
            query = prompt_length - 1 + step
            rows.append(row)
            queries.append(query)
            key_lists.append(sampled_key_columns(query, first, config.attention_window,
                                                 config.attention_stride))
            weights.append(sequence_weights[row] / len(steps))
    width = max((len(keys) for keys in key_lists), default=1)
    key_columns = torch.tensor([keys + [q] * (width - len(keys))
                                for keys, q in zip(key_lists, queries)], dtype=torch.long)
    key_valid = torch.tensor([[True] * len(keys) + [False] * (width - len(keys))
                              for keys in key_lists], dtype=torch.bool)
    return AttentionSamples(torch.tensor(rows, dtype=torch.long),
                            torch.tensor(queries, dtype=torch.long),
                            key_columns.view(-1, width), key_valid.view(-1, width),
                            torch.stack(weights) if weights else torch.zeros(0))


def sampled_attention_log_rows(query: torch.Tensor, key: torch.Tensor,
                               samples: AttentionSamples, scale: float) -> torch.Tensor:
    """``[K, heads, W]`` log attention rows over the sampled keys (−inf at padding).

    ``query`` ``[s, b, heads, d]``, ``key`` ``[s, b, groups, d]`` (this rank's heads)."""
    dtype = torch.promote_types(query.dtype, torch.float32)
    q = query[samples.query_columns, samples.rows].to(dtype)  # [K, heads, d]
    k = key[samples.key_columns, samples.rows[:, None]].to(dtype)  # [K, W, groups, d]
    heads, groups = q.shape[1], k.shape[2]
    if heads != groups:
        k = k.repeat_interleave(heads // groups, dim=2)
    scores = torch.einsum("khd,kwhd->khw", q, k) * scale
    scores = scores.masked_fill(~samples.key_valid[:, None, :], float("-inf"))
    return torch.log_softmax(scores, dim=-1)


def jsd_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor,
                       valid: torch.Tensor) -> torch.Tensor:
    """JSD with β = ½ over the last dimension, counting only ``valid`` entries (the others hold
    −inf; they are replaced before any arithmetic so that no NaN reaches the gradient)."""
    log_p, log_q = log_p.masked_fill(~valid, 0.0), log_q.masked_fill(~valid, 0.0)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    terms = log_p.exp() * (log_p - log_m) + log_q.exp() * (log_q - log_m)
    return 0.5 * (terms * valid).sum(-1)


def attention_jsd(query: torch.Tensor, key: torch.Tensor, final_query: torch.Tensor,
                  final_key: torch.Tensor, samples: AttentionSamples, scale: float,
                  total_heads: int) -> torch.Tensor:
    """Σ_samples weight · (1/total_heads) Σ_{this rank's heads} JSD(a^(r) ‖ sg a^(R̃)).

    Under tensor parallelism each rank sums its own heads, so the ranks' values add up to the
    head average; as a loss term this gives each head's parameters exactly their gradient (the
    query/key projections are column-parallel and their input gradient is summed over TP).
    """
    if samples.rows.numel() == 0:
        return query.sum() * 0.0
    log_rows = sampled_attention_log_rows(query, key, samples, scale)
    with torch.no_grad():
        final_rows = sampled_attention_log_rows(final_query, final_key, samples, scale)
    per_head = jsd_from_log_probs(log_rows, final_rows, samples.key_valid[:, None, :])
    return (samples.weights.to(per_head.dtype) * per_head.sum(-1)).sum() / total_heads
