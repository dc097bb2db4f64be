"""Configuration of the cross-loop distillation loss."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from nemo_loop.losses.loop_mapping import (
    MAPPING_KINDS,
    WEIGHTING_KINDS,
    loop_mapping,
    loop_weights,
)
from nemo_loop.losses.normalization import check_aggregation

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TOP_K_MODES = ("tail", "renormalize")
NONFINITE_POLICIES = ("error", "skip")
# "full": the divergence between the loops' whole next-token distributions (or their top-K);
# "sampled_token": OPSD's one-sample objective on the tokens the student sampled.
OBJECTIVES = ("full", "sampled_token")


@dataclass(frozen=True)
class LoopDistillConfig:
    """What the cross-loop distillation loss computes.

    divergence: ``"forward_kl"`` = KL(p_T ‖ p_S), ``"reverse_kl"`` = KL(p_S ‖ p_T), or ``"jsd"`` =
        β·KL(p_T ‖ m) + (1−β)·KL(p_S ‖ m) with m = β·p_T + (1−β)·p_S.
    beta: the JSD's β, strictly between 0 and 1 (ignored by the KL divergences).
    temperature: τ > 0; both sides use softmax(logits / τ).
    mapping / mapping_list: φ, see :func:`nemo_loop.losses.loop_mapping.loop_mapping`.
    weighting / weights_list / gamma: α, see :func:`nemo_loop.losses.loop_mapping.loop_weights`.
    top_k: if set, the divergence runs over the teacher's global top-K tokens only.
    top_k_mode: ``"tail"`` adds one bucket holding each side's remaining mass (a proper
        divergence over K+1 buckets); ``"renormalize"`` renormalizes both sides over the K tokens.
    chunk_size: tokens processed at once; bounds the full-vocabulary fp32 temporaries to
        ``chunk_size × vocab/TP``. ``None`` processes all tokens of one loop at once.
    aggregation: ``"sequence_mean"`` averages each sequence's per-token mean over the sequences
        that have response tokens; ``"token_mean"`` averages over all response tokens; in training,
        over the whole step (:mod:`nemo_loop.losses.normalization`).
    nonfinite: what a NaN or ±inf logit (student or teacher) at a response token does.
        ``"error"`` raises naming the side, the loop and the token count; ``"skip"`` leaves those
        tokens out of the loss as if ``loss_mask`` were 0 there (the normalizers shrink with
        them) and reports their number in the ``nonfinite_tokens`` metric. Skipping costs one
        extra pass over the logits (on the fused head, one extra output-layer matmul).
    objective: which loss an algorithm calls with this config. ``"full"``: the divergence over
        the whole vocabulary (:func:`cross_loop_distillation_loss`, its fused-head form);
        ``"sampled_token"``: OPSD's sampled-token objective
        (:func:`sampled_token_distillation_loss`), which needs the sampled tokens and ignores
        ``divergence``/``beta``/``top_k`` (setting ``top_k`` with it is an error).
    """

    divergence: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    mapping: str = "shift"
    mapping_list: tuple[int, ...] | None = None
    weighting: str = "uniform"
    weights_list: tuple[float, ...] | None = None
    gamma: float = 1.0
    top_k: int | None = None
    top_k_mode: str = "tail"
    chunk_size: int | None = 1024
    aggregation: str = "sequence_mean"
    nonfinite: str = "error"
    objective: str = "full"

    @classmethod
    def terminal_only(cls, **overrides) -> LoopDistillConfig:
        """The baseline: only the student's last loop, distilled towards the teacher's last loop."""
        return replace(cls(mapping="fixed", weighting="terminal"), **overrides)

    def validate(self, student_loops: int | None = None,
                 teacher_loops: int | None = None) -> LoopDistillConfig:
        """Raise ValueError on any invalid field; with loop counts, also check φ and α."""
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {self.divergence!r}; expected one of "
                             f"{DIVERGENCES}")
        if self.divergence == "jsd" and not 0.0 < self.beta < 1.0:
            raise ValueError(f"JSD needs 0 < beta < 1, got beta={self.beta}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {self.temperature}")
        if self.mapping not in MAPPING_KINDS:
            raise ValueError(f"unknown loop mapping {self.mapping!r}; expected one of "
                             f"{MAPPING_KINDS}")
        if self.weighting not in WEIGHTING_KINDS:
            raise ValueError(f"unknown loop weighting {self.weighting!r}; expected one of "
                             f"{WEIGHTING_KINDS}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if self.top_k_mode not in TOP_K_MODES:
            raise ValueError(f"unknown top_k_mode {self.top_k_mode!r}; expected one of "
                             f"{TOP_K_MODES}")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int)
                                            or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got "
                             f"{self.chunk_size!r}")
        check_aggregation("loss.aggregation", self.aggregation)
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"unknown nonfinite policy {self.nonfinite!r}; expected one of "
                             f"{NONFINITE_POLICIES}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown loss objective {self.objective!r}; expected one of "
                             f"{OBJECTIVES}")
        if self.objective == "sampled_token" and self.top_k is not None:
            raise ValueError("top_k does not apply to objective 'sampled_token' (it scores only "
                             "the sampled token); unset top_k or use objective 'full'")
        if student_loops is not None and teacher_loops is not None:
            self.teacher_loop_for_each_student_loop(student_loops, teacher_loops)
        if student_loops is not None and self.weighting != "adaptive":
            self.fixed_loop_weights(student_loops)
        return self

    def teacher_loop_for_each_student_loop(self, student_loops: int,
                                           teacher_loops: int) -> list[int]:
        """φ as a 1-based list."""
        return loop_mapping(self.mapping, student_loops, teacher_loops, self.mapping_list)

    def resolved_terms(self, student_loops: int, teacher_loops: int) -> dict:
        """The objective with φ and α written out: ``terms`` lists (student loop, teacher loop,
        α) for every loop with α > 0, so two spellings of one objective compare equal (at R̃ = 3
        of R = 4, ``linear`` and ``shift`` are both φ = [2, 3, 4]; under ``terminal`` weights
        only φ(R̃) counts). Adaptive weights depend on the run, so they keep φ and the kind."""
        mapping = self.teacher_loop_for_each_student_loop(student_loops, teacher_loops)
        described = {name: getattr(self, name) for name in ("divergence", "temperature",
                                                            "top_k", "aggregation", "objective",
                                                            "nonfinite")}
        if self.divergence == "jsd":
            described["beta"] = self.beta
        if self.top_k is not None:
            described["top_k_mode"] = self.top_k_mode
        if self.weighting == "adaptive":
            return {**described, "mapping": mapping, "weighting": "adaptive"}
        weights = self.fixed_loop_weights(student_loops).tolist()
        return {**described, "terms": [[r, target, round(alpha, 12)] for r, (target, alpha)
                                       in enumerate(zip(mapping, weights), start=1) if alpha]}

    def fixed_loop_weights(self, student_loops: int) -> torch.Tensor:
        """α for every weighting except ``"adaptive"``, which depends on the divergences."""
        return loop_weights(self.weighting, student_loops, gamma=self.gamma,
                            explicit=self.weights_list)
