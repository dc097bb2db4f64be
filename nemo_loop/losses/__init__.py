"""Losses for looped language models: cross-loop distillation across loops and vocab shards."""

from nemo_loop.losses.config import DIVERGENCES, REDUCTIONS, TOP_K_MODES, LoopDistillConfig
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

__all__ = [
    "DIVERGENCES", "MAPPING_KINDS", "REDUCTIONS", "TOP_K_MODES", "WEIGHTING_KINDS",
    "LoopDistillConfig", "adaptive_loop_weights", "cross_loop_distillation_loss",
    "fused_head_distillation_loss", "loop_mapping", "loop_weights", "response_token_weights",
    "sampled_token_distillation_loss", "validate_loop_mapping",
]
