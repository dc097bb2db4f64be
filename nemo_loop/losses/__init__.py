"""Losses for looped language models: cross-loop distillation across loops and vocab shards;
policy gradients on group rollouts (GRPO, RLTT; OISD's terms in ``nemo_loop.losses.oisd``); the
one normalization rule of every training loss (``nemo_loop.losses.normalization``)."""

from nemo_loop.losses.config import (
    DIVERGENCES,
    OBJECTIVES,
    TOP_K_MODES,
    LoopDistillConfig,
)
from nemo_loop.losses.distillation import (
    cross_loop_distillation_loss,
    response_token_weights,
    sampled_token_distillation_loss,
)
from nemo_loop.losses.fused_head import fused_head_distillation_loss
from nemo_loop.losses.loop_mapping import (
    MAPPING_KINDS,
    WEIGHTING_KINDS,
    adaptive_loop_weights,
    loop_mapping,
    loop_weights,
    validate_loop_mapping,
)
from nemo_loop.losses.normalization import AGGREGATIONS, LossNormalizer
from nemo_loop.losses.policy_gradient import (
    RLTT_WEIGHTINGS,
    PolicyLossConfig,
    clipped_surrogate,
    group_advantages,
    grpo_loss,
    k3_kl,
    rltt_loop_weights,
    rltt_loss,
)
from nemo_loop.losses.token_logprobs import token_logprobs

__all__ = [
    "DIVERGENCES", "MAPPING_KINDS", "OBJECTIVES", "TOP_K_MODES", "WEIGHTING_KINDS",
    "LoopDistillConfig", "adaptive_loop_weights", "cross_loop_distillation_loss",
    "fused_head_distillation_loss", "loop_mapping", "loop_weights", "response_token_weights",
    "sampled_token_distillation_loss", "validate_loop_mapping",
    # normalization
    "AGGREGATIONS", "LossNormalizer",
    # policy gradients
    "RLTT_WEIGHTINGS", "PolicyLossConfig", "clipped_surrogate",
    "group_advantages", "grpo_loss", "k3_kl", "rltt_loop_weights", "rltt_loss", "token_logprobs",
]
